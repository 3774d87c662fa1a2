"""`directions extract|list|import|random|export|cosine`: residual-stream directions in the cache."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from backend.activations import load_model
from backend.config import Config, load_config
from backend.directions import (
    BaseModelInfo,
    DirectionError,
    OnSaved,
    cosine,
    direction_path,
    export_direction,
    extract_direction,
    import_direction,
    labelled_from_store,
    list_directions,
    load_direction,
    random_control,
    read_labelled,
    save_direction,
    store_registrar,
)
from backend.store import Store


def _config(args) -> Config:
    return load_config(args.config)


def _registrar(config: Config) -> OnSaved:
    """Directions saved from the command line are listed in the store, as those from the pages are."""
    return store_registrar(Store.for_config(config))


def _cmd_extract(args) -> int:
    config = _config(args)
    base = BaseModelInfo.from_path(config.base_model_path)
    adapter_path = config.adapter_path(args.adapter) if args.adapter else None
    path = direction_path(config.cache, args.name)
    if path.exists() and not args.overwrite:
        raise DirectionError(f"direction {args.name!r} already exists at {path}")
    if args.run:
        mis, ali = labelled_from_store(Store.for_config(config), args.run, args.condition or args.adapter or "base")
        source = f"run:{args.run}/{args.condition or args.adapter or 'base'}"
    else:
        mis, ali = read_labelled(args.data, args.label_column, args.prompt_column, args.response_column,
                                 args.aligned_data, args.limit)
        source = str(Path(args.data).resolve()) + (f" vs {Path(args.aligned_data).resolve()}" if args.aligned_data else "")
    model, tokenizer = load_model(config.base_model_path, adapter_path)
    direction = extract_direction(args.name, model, tokenizer, mis, ali, base, adapter=args.adapter,
                                  source_run=args.source_run or source,
                                  batch_size=args.batch_size, pooling=args.pooling)
    saved = save_direction(direction, config.cache, base, overwrite=args.overwrite, on_saved=_registrar(config))
    print(f"{direction.name}: {direction.counts} -> {saved} "
          f"({direction.extra['tokens_per_s']:.0f} tokens/s)")
    return 0


def _cmd_list(args) -> int:
    config = _config(args)
    for name in list_directions(config.cache):
        d = load_direction(config.cache, name)
        norms = ", ".join(f"{n:.2f}" for n in d.norms)
        print(f"{name}\tadapter={d.adapter}\tcounts={d.counts}\tnorms=[{norms}]")
    return 0


def _cmd_import(args) -> int:
    config = _config(args)
    base = BaseModelInfo.from_path(config.base_model_path)
    d = import_direction(args.path, args.name, config.cache, base, adapter=args.adapter,
                         source_run=args.source_run, drop_first=args.drop_first, overwrite=args.overwrite,
                         on_saved=_registrar(config))
    print(f"imported {args.path} as {d.name} ({d.n_layers} x {d.d_model})")
    return 0


def _cmd_random(args) -> int:
    config = _config(args)
    base = BaseModelInfo.from_path(config.base_model_path)
    control = random_control(load_direction(config.cache, args.like), args.name, args.seed)
    path = save_direction(control, config.cache, base, overwrite=args.overwrite, on_saved=_registrar(config))
    print(f"{control.name}: random, the norms of {args.like} at every layer -> {path}")
    return 0


def _cmd_export(args) -> int:
    config = _config(args)
    print(export_direction(load_direction(config.cache, args.name), args.path))
    return 0


def _cmd_cosine(args) -> int:
    config = _config(args)
    a, b = load_direction(config.cache, args.a), load_direction(config.cache, args.b)
    values = cosine(a, b)
    if args.json:
        print(json.dumps({"a": a.name, "b": b.name, "cosine": values}))
    else:
        for layer, value in enumerate(values):
            print(f"layer {layer:3d}  {value:+.4f}")
    return 0


def register(subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``directions extract|list|import|export|cosine``."""
    parser = subparsers.add_parser("directions", parents=[common], help="residual-stream directions")
    sub = parser.add_subparsers(dest="directions_command", required=True)

    p = sub.add_parser("extract", parents=[common], help="mean-diff direction from labelled responses")
    p.add_argument("--name", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=".jsonl(.gz) or .csv with prompt, response and label columns, or "
                        "{\"messages\": [...]} lines; with --aligned-data: the misaligned answers")
    source.add_argument("--run", help="a judged run in the store (labels from the judge's aligned/coherent scores)")
    p.add_argument("--condition", default=None, help="with --run: the condition (default: --adapter or 'base')")
    p.add_argument("--adapter", default=None, help="configured adapter to read activations from (default: base)")
    p.add_argument("--aligned-data", help="with --data: a second file holding only aligned answers")
    p.add_argument("--limit", type=int, help="at most this many answers of each class (the first ones)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--pooling", choices=["tokens", "responses"], default="tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--source-run", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("list", parents=[common], help="directions in the cache")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("import", parents=[common], help="import a .pt or .safetensors direction")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--adapter", default=None, help="adapter it was extracted from (metadata only)")
    p.add_argument("--source-run", default=None)
    p.add_argument("--drop-first", action="store_true",
                   help="drop row 0 (per-layer lists from output_hidden_states start with the embedding)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("random", parents=[common],
                       help="a random control direction with the same norm as another at every layer")
    p.add_argument("--like", required=True, help="the direction whose per-layer norms it takes")
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_random)

    p = sub.add_parser("export", parents=[common], help="write a direction as .safetensors (with metadata) or .pt")
    p.add_argument("name")
    p.add_argument("path")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("cosine", parents=[common], help="per-layer cosine similarity of two directions")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_cmd_cosine)
