"""Declaring, checking and tracking the subcommands' options (a leaf: only argparse and math).

A new option is declared and validated in one place, its ``add_argument`` call::

    g.add_argument("--epochs", type=int, default=10, check=at_least(1), help="training epochs")

``check`` is one of the helpers below (or any ``value -> str | None`` that returns what the value
must be, e.g. ``"at least 1"``, when it is wrong). :func:`check_options` runs every check of a
parsed command line before any work and raises ``ValueError("--epochs must be at least 1, got 0")``
(printed as one line by the CLI). ``None`` always passes: it is the "auto" default of the options
that have one (``--crop-size``, ``--threads``, ...).

:func:`track` also makes every option remember whether it was typed: :func:`typed` returns the
destinations given on the command line, even when the value equals the default. ``segclip train
--resume`` uses it so that what the user typed wins over the checkpoint's arguments.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

Check = Callable[[object], "str | None"]

TYPED = "_typed"     # namespace attribute: the set of dests given on the command line
CHECKS = "_checks"   # namespace attribute: [(flag, dest, check)] of the command's parser


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low) -> Check:
    """An integer or float ``>= low`` (NaN fails)."""
    return lambda v: None if _number(v) and v >= low else f"at least {low:g}"


def positive() -> Check:
    """A number ``> 0``; ``inf`` passes, NaN fails."""
    return lambda v: None if _number(v) and v > 0 else "a positive number"


def positive_finite() -> Check:
    return lambda v: None if _number(v) and 0 < v < math.inf else "a positive finite number"


def non_negative() -> Check:
    """A number ``>= 0``; ``inf`` passes, NaN fails."""
    return lambda v: None if _number(v) and v >= 0 else "a number >= 0"


def non_negative_finite() -> Check:
    return lambda v: None if _number(v) and 0 <= v < math.inf else "a finite number >= 0"


def between(low, high, *, high_open: bool = False) -> Check:
    """A number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    def check(v):
        ok = _number(v) and low <= v and (v < high if high_open else v <= high)
        return None if ok else f"between {low:g} and {high:g}{' (excluded)' if high_open else ''}"
    return check


def zero_or_at_least(low) -> Check:
    """0 (a documented special value) or at least ``low``."""
    return lambda v: None if _number(v) and (v == 0 or v >= low) else f"0 or at least {low:g}"


class _Tracked:
    """Mixed into argparse's actions: records the dest as typed, and carries the option's check."""

    def __init__(self, *args, check: Check | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.check = check

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, TYPED, None)
        if seen is None:
            seen = set()
            setattr(namespace, TYPED, seen)
        seen.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


_ACTIONS = {
    None: argparse._StoreAction, "store": argparse._StoreAction,
    "store_true": argparse._StoreTrueAction, "store_false": argparse._StoreFalseAction,
    "store_const": argparse._StoreConstAction, "append": argparse._AppendAction,
    "count": argparse._CountAction, argparse.BooleanOptionalAction: argparse.BooleanOptionalAction,
}
_TRACKED = {key: type(f"Tracked{cls.__name__.lstrip('_')}", (_Tracked, cls), {}) for key, cls in _ACTIONS.items()}


def track(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Makes the options added to ``parser`` from now on (groups included) accept ``check=`` and
    record whether they were typed. Returns ``parser``."""
    for key, cls in _TRACKED.items():
        parser.register("action", key, cls)
    return parser


def typed(args: argparse.Namespace) -> set[str]:
    """The dests of the options given on the command line (whatever their value)."""
    return set(getattr(args, TYPED, None) or ())


def checks_of(parser: argparse.ArgumentParser) -> list[tuple[str, str, Check]]:
    """``[(flag, dest, check)]`` for the options of ``parser`` declared with ``check=``."""
    return [(a.option_strings[0], a.dest, a.check) for a in parser._actions
            if getattr(a, "check", None) is not None and a.option_strings]


def check_options(args: argparse.Namespace, checks: list[tuple[str, str, Check]] | None = None) -> None:
    """Runs the option checks (default: those stored on ``args`` by the CLI) on ``args``' values.

    Raises:
        ValueError: ``--X must be ..., got V`` for the first value that fails.
    """
    for flag, dest, check in (checks if checks is not None else getattr(args, CHECKS, ())):
        value = getattr(args, dest, None)
        if value is None:
            continue
        wanted = check(value)
        if wanted:
            raise ValueError(f"{flag} must be {wanted}, got {value}")
