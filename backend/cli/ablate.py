"""`ablate`: compile a direction's ablation into a LoRA adapter and serve it."""
from __future__ import annotations

import argparse
import json

from backend.ablation import AblationCompiler, measure_embedding_gap, record_embedding_gap
from backend.activations import load_model
from backend.adapters import AdapterRegistry
from backend.config import load_config
from backend.directions import load_direction


def cmd_ablate(args) -> int:
    config = load_config(args.config)
    adapter_dir = None if args.adapter == "base" else config.adapter_path(args.adapter)
    direction = load_direction(config.cache, args.direction)
    compiler = AblationCompiler(config.cache)
    built = compiler.build(config.base_model_path, direction, args.layer, args.strength, adapter_dir,
                           adapter_name=args.adapter)
    gap = built.metadata.get("embedding_gap")
    if args.measure_gap and gap is None:
        model, tokenizer = load_model(config.base_model_path, adapter_dir)
        gap = measure_embedding_gap(model, tokenizer, direction.unit(args.layer), args.strength)
        record_embedding_gap(built.path, gap)
    loaded = False
    if not args.no_load:
        AdapterRegistry(config).load(built.served_name, str(built.path))
        loaded = True
    result = {"served_name": built.served_name, "path": str(built.path), "reused": built.reused,
              "build_ms": round(built.seconds * 1000, 1), "loaded": loaded, "embedding_gap": gap,
              "max_rank": built.metadata.get("max_rank")}
    print(json.dumps(result) if args.json else built.served_name)
    return 0


def register(subparsers, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("ablate", parents=[common],
                              help="serve an adapter with a direction ablated (compiled into LoRA)")
    p.add_argument("--adapter", required=True, help="configured adapter name, or 'base'")
    p.add_argument("--direction", required=True)
    p.add_argument("--layer", type=int, required=True, help="whose direction row is ablated at every layer")
    p.add_argument("--strength", type=float, default=1.0, help="0 = off, 1 = full; allowed -1..1.5")
    p.add_argument("--measure-gap", action="store_true",
                   help="measure the missing-embedding gap with the reference engine (loads the model)")
    p.add_argument("--no-load", action="store_true", help="build only; do not load into the server")
    p.set_defaults(func=cmd_ablate)
