"""The ``segclip`` command line (also ``python -m segclip``).

Each subcommand lives in its own module, listed in ``COMMAND_MODULES``; a module defines
``register(subparsers)``, which adds its parser(s) and sets ``func`` (called with the parsed
arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from ._quiet import _NoCudaRuntimeNotice, silence_cuda_home_notice  # noqa: F401  (tests reach them here)

COMMAND_MODULES = [
    "segclip.demo",
    "segclip.train.cli",
    "segclip.bench",
]


def _version() -> str:
    import torch

    from . import __version__

    return f"segclip {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segclip", description="Fused gradient clipping for PyTorch: demo, training and benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) turned into an exception, so that every command ends an interruption the
    same way: ``signum`` says which signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a bare ``segclip`` prints the help and exits 0 (asking for help is no error).
    Ctrl-C (SIGINT) and SIGTERM end a command with one line and exit status 128 + the signal's number
    (130, 143), without a traceback; a command may catch them itself to stop more gently
    (``segclip train`` finishes its step and saves where it is)."""
    silence_cuda_home_notice()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave the signals alone
        previous = None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"segclip {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
