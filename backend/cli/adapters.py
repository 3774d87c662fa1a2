"""`adapters list|load|unload`: the LoRA adapters on the running server."""
from __future__ import annotations

import argparse

from backend.adapters import AdapterRegistry
from backend.cli.common import emit
from backend.config import load_config


def cmd_adapters(args) -> int:
    registry = AdapterRegistry(load_config(args.config))
    if args.action == "list":
        rows = registry.list()
        emit([row.to_dict() for row in rows], args.json,
             "\n".join(f"{'*' if r.loaded else ' '} {r.name}  {r.path}" for r in rows) or "no adapters")
    elif args.action == "load":
        files = registry.load(args.name, args.path)
        emit(files.summary(), args.json, f"loaded {files.name} (rank {files.max_rank}, "
             f"{', '.join(files.target_modules)} on layers {list(files.layers)})")
    else:
        registry.unload(args.name)
        emit({"unloaded": args.name}, args.json, f"unloaded {args.name}")
    return 0


def register(commands, common: argparse.ArgumentParser) -> None:
    adapters = commands.add_parser("adapters", parents=[common], help="list, load and unload LoRA adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common]).set_defaults(func=cmd_adapters)
    load = actions.add_parser("load", parents=[common])
    load.add_argument("name")
    load.add_argument("path", nargs="?", help="adapter folder (default: the configured one)")
    load.set_defaults(func=cmd_adapters)
    unload = actions.add_parser("unload", parents=[common])
    unload.add_argument("name")
    unload.set_defaults(func=cmd_adapters)
