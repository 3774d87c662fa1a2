"""`lora scalars|probe|knockout`: read rank-1 LoRA adapters (see backend/scalars.py)."""
from __future__ import annotations

import argparse
import json

from backend.activations import Example, load_model
from backend.adapters import AdapterRegistry
from backend.config import Config, load_config
from backend.knockouts import adapter_labels_in, compile_knockout, knockout_all, knockout_each
from backend.probes import labels_from_file, labels_from_store, organism_labelled_set, probe_report, run_probes
from backend.scalars import ScalarError, compute_scalars, token_scalars
from backend.store import Store


def _model(config: Config, adapter: str):
    return load_model(config.base_model_path, config.adapter_path(adapter))


def cmd_lora(args) -> int:
    config = load_config(args.config)
    if args.action == "scalars":
        model, tokenizer = _model(config, args.adapter)
        if args.per_rank:
            result = compute_scalars(model, tokenizer, [Example(args.prompt, args.response)], batch_size=1)[0]
        else:
            result = token_scalars(model, tokenizer, Example(args.prompt, args.response))
        data = result.to_dict()
        text = "\n".join(["token\t" + "\t".join(result.features)] + [
            repr(tok) + "\t" + "\t".join(f"{v:+.4f}" for v in row) for tok, row in zip(result.tokens, result.values)]
            + ["(raw A·x on the module input; scaling " + ", ".join(f"{k}={v:g}" for k, v in result.scalings.items())
               + ")"])
    elif args.action == "probe":
        if args.labels:
            labelled = labels_from_file(args.labels)
        elif args.run_id:
            store = Store(args.store) if args.store else Store.for_config(config)
            labelled = labels_from_store(store, args.run_id, args.condition or args.adapter, args.judge_model,
                                         args.limit)
        elif args.organism_demo:
            labelled = organism_labelled_set(args.organism_demo, args.narrow_domain)
        else:
            raise ScalarError("probe needs labels: --run-id RUN [--condition C], --labels FILE.jsonl or "
                              "--organism-demo N")
        model, tokenizer = _model(config, args.adapter)
        results = compute_scalars(model, tokenizer, [item.example for item in labelled], batch_size=args.batch_size)
        data = probe_report(run_probes(results, labelled, args.narrow_domain, args.folds))
        lines = []
        for name, probe in data["probes"].items():
            lines.append(f"{name}: accuracy {probe['accuracy']:.3f} [{probe['ci95'][0]:.3f}, {probe['ci95'][1]:.3f}]"
                         f" chance {probe['chance']:.3f} (n={probe['n']}, {probe['folds']} folds)")
        lines += [f"{name}: skipped ({why})" for name, why in data["skipped"].items()]
        lines += [f"  {a}: {v['label']} (general {v['general_strength']:.2f}, narrow {v['narrow_strength']:.2f})"
                  for a, v in data["labels"].items()]
        text = "\n".join(lines)
    else:
        adapter_dir = config.adapter_path(args.adapter)
        scales = {label: 0.0 for label in args.remove or []}
        for item in args.scale or []:
            label, _, factor = item.partition("=")
            try:
                scales[label] = float(factor)
            except ValueError:
                raise ScalarError(f"--scale wants LABEL=FACTOR, e.g. L3.down_proj=0.5, not {item!r}") from None
        out_root = config.cache / "adapters"
        if args.each:
            knockouts = knockout_each(adapter_dir, out_root, args.factor)
        elif args.all:
            knockouts = [knockout_all(adapter_dir, out_root, args.factor)]
        elif scales:
            knockouts = [compile_knockout(adapter_dir, scales, out_root)]
        else:
            raise ScalarError("knockout needs --remove LABEL, --scale LABEL=F, --each or --all "
                              f"(adapters: {', '.join(adapter_labels_in(adapter_dir))})")
        if args.load:
            registry = AdapterRegistry(config)
            for ko in knockouts:
                registry.load(ko.name, str(ko.path))
        data = [{"name": ko.name, "path": str(ko.path), "scales": ko.scales, "reused": ko.reused,
                 "loaded": bool(args.load)} for ko in knockouts]
        text = "\n".join(f"{ko.name}  {ko.path}  {ko.scales}" + ("  (loaded)" if args.load else "")
                         for ko in knockouts)
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0


def register(subparsers, common: argparse.ArgumentParser) -> None:
    lora = subparsers.add_parser("lora", parents=[common], help="read rank-1 LoRA adapters: per-token scalars, probes, knock-outs")
    actions = lora.add_subparsers(dest="action", required=True)
    scalars = actions.add_parser("scalars", parents=[common], help="raw A·x of each adapter at each answer token")
    scalars.add_argument("--adapter", required=True, help="configured adapter name")
    scalars.add_argument("--prompt", required=True)
    scalars.add_argument("--response", required=True)
    scalars.add_argument("--per-rank", action="store_true", help="allow rank > 1 (one column per rank component)")
    scalars.set_defaults(func=cmd_lora)
    probe = actions.add_parser("probe", parents=[common], help="logistic-regression probes on mean/max scalars per response")
    probe.add_argument("--adapter", required=True)
    probe.add_argument("--run-id", help="labels from this evaluation run")
    probe.add_argument("--condition", help="its condition (default: the adapter name)")
    probe.add_argument("--judge-model")
    probe.add_argument("--store", help="store file (default: the config's)")
    probe.add_argument("--labels", help="JSONL with prompt, response, misaligned, domain")
    probe.add_argument("--organism-demo", type=int, metavar="N",
                       help="labels from the pocket organism's corpus, N per (label, domain group)")
    probe.add_argument("--narrow-domain", default="medical")
    probe.add_argument("--folds", type=int, default=5)
    probe.add_argument("--limit", type=int)
    probe.add_argument("--batch-size", type=int, default=16)
    probe.set_defaults(func=cmd_lora)
    knockout = actions.add_parser("knockout", parents=[common], help="compile the adapter set with adapters removed or scaled")
    knockout.add_argument("--adapter", required=True)
    knockout.add_argument("--remove", action="append", metavar="LABEL", help="e.g. L3.down_proj (repeatable)")
    knockout.add_argument("--scale", action="append", metavar="LABEL=F", help="e.g. L3.down_proj=0.5")
    knockout.add_argument("--each", action="store_true", help="one knock-out per adapter (with --factor)")
    knockout.add_argument("--all", action="store_true", help="every adapter scaled by --factor")
    knockout.add_argument("--factor", type=float, default=0.0)
    knockout.add_argument("--load", action="store_true", help="load the result into the running vLLM server")
    knockout.set_defaults(func=cmd_lora)
