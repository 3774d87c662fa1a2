"""`shipped export|import|status|remove`: the shipped example data (backend/shipped.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backend.shipped import (DEFAULT_BUNDLE, _count, export_bundle, import_bundle, remove_shipped,
                             shipped_status)
from backend.store import Store


def _store_and_cache(args):
    from backend.config import load_config
    config = load_config(args.config)
    return (Store(args.store) if args.store else Store.for_config(config)), config


def _cmd(args) -> int:
    store, config = _store_and_cache(args)
    if args.action == "export":
        manifest = export_bundle(store, args.out, args.run, directions=args.direction or None,
                                 name=args.name, description=args.description)
        rows = ", ".join(f"{t} {v['rows']}" for t, v in manifest["tables"].items())
        size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
        print(f"wrote {args.out}: {rows}; {len(manifest['direction_files'])} direction files; {size / 1e3:.0f} kB")
    elif args.action == "import":
        fingerprint = None
        if not args.any_base:
            from backend.directions import BaseModelInfo
            try:
                fingerprint = BaseModelInfo.from_path(config.base_model_path).fingerprint
            except (OSError, ValueError) as error:
                print(f"warning: not checking directions against the base ({error})", file=sys.stderr)
        result = import_bundle(store, args.bundle, config.cache, base_fingerprint=fingerprint,
                               first_run=args.first_run)
        if result.skipped:
            print(f"shipped data: {result.skipped}")
        else:
            print(f"imported bundle {result.bundle!r} into {store.path}: "
                  + ", ".join(f"{t} {n}" for t, n in result.rows.items()))
    elif args.action == "status":
        status = shipped_status(store)
        if args.json:
            print(json.dumps({"runs": status.runs, "samples": status.samples, "judgements": status.judgements,
                              "directions": status.directions, "marker": status.marker}, indent=2, default=str))
        else:
            print(status.describe())
    elif args.action == "remove":
        gone = remove_shipped(store)
        print(f"removed {_count(len(gone.runs), 'shipped run')} ({_count(gone.samples, 'sample')}, "
              f"{_count(gone.judgements, 'judgement')}) and {_count(len(gone.directions), 'direction')} "
              f"from {store.path}")
    return 0


def register(commands, common_flags) -> None:
    common = argparse.ArgumentParser(add_help=False, parents=[common_flags])
    common.add_argument("--store", default=None, help="default: em.duckdb in the configured cache")
    shipped = commands.add_parser("shipped", help="the shipped example data: export, import, status, remove")
    actions = shipped.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", parents=[common], help="write runs and directions into a bundle folder")
    export.add_argument("--run", action="append", required=True, help="a run id (repeat for more)")
    export.add_argument("--direction", action="append", help="default: the directions the runs ablated")
    export.add_argument("--out", required=True)
    export.add_argument("--name", default=None, help="default: the folder's name")
    export.add_argument("--description", default="")
    load = actions.add_parser("import", parents=[common], help="import a bundle (default: the checkout's)")
    load.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE))
    load.add_argument("--first-run", action="store_true",
                      help="skip quietly when there is no bundle or shipped data was imported or removed before")
    load.add_argument("--any-base", action="store_true", help="do not check directions against the base model")
    actions.add_parser("status", parents=[common])
    actions.add_parser("remove", parents=[common], help="delete the shipped runs and directions")
    shipped.set_defaults(func=_cmd)
