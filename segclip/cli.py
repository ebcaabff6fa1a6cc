"""The ``segclip`` command line (also ``python -m segclip``).

Each subcommand lives in its own module, listed in ``COMMAND_MODULES``; a module defines
``register(subparsers)``, which adds its parser(s) and sets ``func`` (called with the parsed
arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "segclip.demo",
    "segclip.train.cli",
    "segclip.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segclip", description="Fused gradient clipping for PyTorch: demo, training and benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
