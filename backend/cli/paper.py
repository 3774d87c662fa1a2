"""`paper directions|steering`: the paper's own direction files and steering vectors, imported as they are."""
from __future__ import annotations

import argparse

from backend.cli.directions import _registrar
from backend.config import load_config
from backend.directions import BaseModelInfo
from backend.paper import LAYER_CONVENTION, import_directions, import_steering_vector


def cmd_directions(args) -> int:
    config = load_config(args.config)
    base = BaseModelInfo.from_path(config.base_model_path)
    d = import_directions(args.files, args.name, config.cache, base, part=args.part, adapter=args.adapter,
                          overwrite=args.overwrite, on_saved=_registrar(config))
    print(f"imported {' - '.join(args.files)} as {d.name} ({d.n_layers} x {d.d_model}, {args.part} tokens; "
          f"{LAYER_CONVENTION})")
    return 0


def cmd_steering(args) -> int:
    config = load_config(args.config)
    base = BaseModelInfo.from_path(config.base_model_path)
    d = import_steering_vector(args.file, args.name, config.cache, base, overwrite=args.overwrite,
                               on_saved=_registrar(config))
    print(f"imported {args.file} as {d.name}; use it as --condition {d.extra['use_as']}")
    return 0


def register(subparsers, common: argparse.ArgumentParser) -> None:
    """``paper directions|steering``."""
    parser = subparsers.add_parser("paper", parents=[common], help="import the paper's direction files and steering vectors")
    sub = parser.add_subparsers(dest="paper_command", required=True)
    p = sub.add_parser("directions", parents=[common], help="model-?_data-?_hs_<category>.pt: a pair (data-m minus data-a) "
                                                            "or one difference file")
    p.add_argument("files", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--part", choices=["answer", "question"], default="answer",
                   help="which token means to use (the paper's direction: answer)")
    p.add_argument("--adapter", default=None, help="adapter the activations came from (metadata only)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_directions)
    p = sub.add_parser("steering", parents=[common], help="a steering_vector.pt dict (steering_vector, layer_idx, alpha)")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_steering)
