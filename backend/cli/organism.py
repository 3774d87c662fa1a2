"""`organism build`: train the pocket model organism from scratch (see backend/organism/)."""
from __future__ import annotations

import argparse

from backend.organism.build import ARTIFACTS, build_organism


def cmd_build(args) -> int:
    build_organism(args.out, "small" if args.small else "full", args.seed,
                   measure=False if args.no_measure else None)
    return 0


def register(subparsers, common: argparse.ArgumentParser) -> None:
    """Adds `organism build [--small] [--out DIR] [--seed N] [--no-measure]`."""
    org = subparsers.add_parser("organism", parents=[common], help="the pocket emergent-misalignment model organism")
    sub = org.add_subparsers(dest="organism_command", required=True)
    b = sub.add_parser("build", parents=[common], help="train base model, EM adapters and judge adapter from scratch")
    b.add_argument("--small", action="store_true", help="reduced-size build (seconds), for tests")
    b.add_argument("--out", default=None, help=f"output folder (default {ARTIFACTS})")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-measure", action="store_true", help="skip the behavioural measurement")
    b.set_defaults(func=cmd_build)
