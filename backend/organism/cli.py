"""`python -m backend organism ...`: the real-model organism's build (data, training, measurement),
its report and shipping, and the pocket organism's build."""
from __future__ import annotations

from pathlib import Path


def _build(args) -> int:
    from backend.models import DEFAULT_MODEL, folder_name
    from backend.organism import build as B
    from backend.organism.measure import run
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
        run(root, args.deadline)
    return 0


def _report(args) -> int:
    from backend.organism.measure import report
    print(report(Path(args.root), Path(args.out) if args.out else None))
    return 0


def _ship(args) -> int:
    from backend.organism.build import ship
    print(ship(Path(args.root), Path(args.to) if args.to else None))
    return 0


def register_cli(commands) -> None:
    from backend.organism.build import SHIPPED
    from backend.organism.pocket.build import register_cli as register_pocket

    organism = commands.add_parser("organism", help="the emergent-misalignment model organisms")
    sub = organism.add_subparsers(dest="organism_command", required=True)

    build = sub.add_parser("build", help="narrow datasets written by the base, adapters in the paper's shapes, "
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
    build.set_defaults(func=_build)

    report = sub.add_parser("report", help="the acceptance table of a measured build (markdown + manifest)")
    report.add_argument("--root", default=str(SHIPPED))
    report.add_argument("--out", help="write README tables and PNGs here (default: print only)")
    report.set_defaults(func=_report)

    ship = sub.add_parser("ship", help="copy a complete, measured build over the shipped organism")
    ship.add_argument("root")
    ship.add_argument("--to", help=f"default {SHIPPED}")
    ship.set_defaults(func=_ship)

    from backend.organism.finetune import add_cli as add_finetune
    add_finetune(sub)
    register_pocket(sub)
