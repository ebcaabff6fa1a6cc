"""The ``segclip`` command line (also ``python -m segclip``).

Each subcommand lives in its own module, listed in ``COMMAND_MODULES``; a module defines
``register(subparsers)``, which adds its parser(s) and sets ``func`` (called with the parsed
arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

COMMAND_MODULES = [
    "segclip.demo",
    "segclip.train.cli",
    "segclip.bench",
]


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record, and only that one.

    NOTE: [CUDA_HOME notice] torch.utils.cpp_extension logs it at import whenever a CUDA toolkit is
    installed but no GPU is visible. segclip never compiles at run time, yet the module gets imported
    by torch.utils.benchmark (segclip bench, the demo's timers) and by torch.compile's C++ builder;
    on a CPU machine with a toolkit the line reads like a problem with segclip's CUDA kernels. A
    filter on that logger keeps every other record torch logs there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def silence_cuda_home_notice() -> None:
    """Installs the filter of note [CUDA_HOME notice] (idempotent); segclip's commands call it."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


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
