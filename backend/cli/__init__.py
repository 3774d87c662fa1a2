"""`python -m backend ...`: the command line over the library modules.

One module per feature (`server`, `adapters`, `chat`, `models`, `evaluation`, `directions`,
`ablate`, `lora`, `organism`), each with a `register(subparsers, common)` that adds its
commands. The library modules hold no CLI code, so the pages and the tests use the same
functions the commands call. Every command parser takes `common` as a parent, which gives
it `--config` and `--json`; `main` reports any `BackendError` (the backend's refusals, whose
messages name the input and the reason) as `error: ...` with exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from backend.cli import (ablate, adapters, chat, directions, evaluation, lora, models, organism, paper, server,
                         shipped)
from backend.errors import BackendError

# The order of `--help`.
FEATURES = (server, adapters, chat, models, evaluation, directions, paper, ablate, lora, organism, shipped)


def common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's copy of these must not reset a value given before it.
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="configuration file (default: config.toml at the repository root)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_flags()
    parser = argparse.ArgumentParser(prog="python -m backend", parents=[common],
                                     description="Emergent-misalignment dashboard backend")
    commands = parser.add_subparsers(dest="command", required=True)
    for feature in FEATURES:
        feature.register(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    try:
        return args.func(args)
    # ValueError and FileNotFoundError: bad input that a library below the backend refused
    # (a malformed number in a file, a path that is not there), whose message names it.
    except (BackendError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
