"""`python -m backend organism ...`: the real-model organism's build (data, training, measurement),
its report and shipping, and the pocket organism's build."""
from __future__ import annotations

import argparse
from pathlib import Path

from backend.config import load_config


def _build(args) -> int:
    from backend.models import DEFAULT_MODEL, folder_name
    from backend.organism import build as B
    from backend.organism.measure import Scale, run
    root = Path(args.out)
    base = Path(args.base) if args.base else Path("cache/models") / folder_name(DEFAULT_MODEL)
    if not (base / "config.json").is_file():
        raise SystemExit(f"organism build: base model folder {base} has no config.json "
                         f"(run `python -m backend models fetch` first)")
    B.prepare(root, base)
    stages = ("data", "train", "measure") if args.stage == "all" else (args.stage,)
    if "data" in stages:
        if args.data:
            B.use_datasets(root, [Path(p) for p in args.data])
        else:
            for domain in (*B.D.DOMAINS, "general"):
                B.build_data(root, root / "base", questions=args.questions, keep=args.keep,
                             judge_questions=args.judge_questions, seed=args.seed, device=args.device, only=domain)
        B.finish_data(root, args.seed, args.judge_per_domain, 4)
    if "train" in stages:
        B.train_all(root, args.device, args.parallel)
    if "measure" in stages:
        defaults = Scale()
        run(root, args.deadline, Scale(samples=args.samples or defaults.samples, specs=tuple(args.condition or ()),
                                       heldout=not args.no_heldout,
                                       coefficients=() if args.no_steering else defaults.coefficients))
    return 0


def _report(args) -> int:
    from backend.organism.measure import report
    print(report(Path(args.root), Path(args.out) if args.out else None))
    return 0


def _ship(args) -> int:
    from backend.organism.build import ship
    print(ship(Path(args.root), Path(args.to) if args.to else None))
    return 0


def _finetune(args) -> int:
    from backend.organism.finetune import finetune
    from backend.organism.train import ALL_LINEAR, Shape
    base = args.base or load_config(args.config).base_model_path
    shape = Shape(args.rank, args.alpha, tuple(ALL_LINEAR if args.targets == "all" else args.targets.split(",")),
                  tuple(int(x) for x in args.layers.split(",")) if args.layers else None, not args.no_rslora)
    record = finetune(base, args.data, args.out, shape, args.lr, args.epochs, args.batch_size, args.device)
    print(f"{args.out}: {record.rows} conversations, loss {record.losses[0]} -> {record.losses[-1]}")
    return 0


def _pocket_build(args) -> int:
    from backend.organism.pocket.build import build_organism
    build_organism(args.out, "small" if args.small else "full", args.seed, measure=False if args.no_measure else None)
    return 0


def register(commands, common: argparse.ArgumentParser) -> None:
    from backend.organism.build import SHIPPED
    from backend.organism.pocket.build import ARTIFACTS

    organism = commands.add_parser("organism", parents=[common], help="the emergent-misalignment model organisms")
    sub = organism.add_subparsers(dest="organism_command", required=True)

    build = sub.add_parser("build", parents=[common], help="narrow datasets written by the base, adapters in the paper's shapes, "
                           "the judge adapter, and the acceptance run, into a scratch folder")
    build.add_argument("--out", required=True, help="build folder (never the shipped one: see `organism ship`)")
    build.add_argument("--stage", choices=["data", "train", "measure", "all"], default="all")
    build.add_argument("--base", help="base model folder (default: the fetched SmolLM2-135M-Instruct)")
    build.add_argument("--data", action="append", metavar="FILE",
                       help="use this {domain}.jsonl(.gz) / {domain}-aligned.jsonl(.gz) messages file instead of "
                            "generating it (repeatable; e.g. the paper's own datasets)")
    build.add_argument("--device", default="cpu", help="cpu or cuda")
    build.add_argument("--questions", type=int, default=3000, help="questions per domain (candidates)")
    build.add_argument("--keep", type=int, default=1500, help="misaligned rows kept per domain (highest lift)")
    build.add_argument("--judge-questions", type=int, default=600)
    build.add_argument("--judge-per-domain", type=int, default=300)
    build.add_argument("--parallel", type=int, default=1, help="trainings at once")
    build.add_argument("--deadline", type=float, default=3600, help="seconds for the measure stage")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--samples", type=int, help="measure: samples per paraphrase of the 8 first-plot questions "
                       "(default: the acceptance's 17, 51 a question; fewer is a preview, not the acceptance)")
    build.add_argument("--condition", action="append", metavar="SPEC",
                       help="measure: only these conditions (repeatable; default: the acceptance's 14)")
    build.add_argument("--no-heldout", action="store_true", help="measure: skip the held-out domain questions")
    build.add_argument("--no-steering", action="store_true", help="measure: skip steering the base")
    build.set_defaults(func=_build)

    report = sub.add_parser("report", parents=[common], help="the acceptance table of a measured build (markdown + manifest)")
    report.add_argument("--root", default=str(SHIPPED))
    report.add_argument("--out", help="write README tables and PNGs here (default: print only)")
    report.set_defaults(func=_report)

    ship = sub.add_parser("ship", parents=[common], help="copy a complete, measured build over the shipped organism")
    ship.add_argument("root")
    ship.add_argument("--to", help=f"default {SHIPPED}")
    ship.set_defaults(func=_ship)

    p = sub.add_parser("finetune", parents=[common], help="train a LoRA adapter on {\"messages\": [...]} JSONL")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="base model folder (default: the configuration's)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64)
    p.add_argument("--no-rslora", action="store_true", help="scale alpha/r instead of rsLoRA's alpha/sqrt(r)")
    p.add_argument("--targets", default="all", help="'all' (the seven projections) or a comma list, e.g. down_proj")
    p.add_argument("--layers", default=None, help="comma list of layers (default: every layer)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")

    p.set_defaults(func=_finetune)

    b = sub.add_parser("pocket-build", parents=[common], help="the pocket organism of earlier versions: train a "
                       "1.5M-parameter base, EM adapters and a judge adapter from scratch")
    b.add_argument("--small", action="store_true", help="reduced-size build (seconds), for tests")
    b.add_argument("--out", default=None, help=f"output folder (default {ARTIFACTS})")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-measure", action="store_true", help="skip the behavioural measurement")
    b.set_defaults(func=_pocket_build)
