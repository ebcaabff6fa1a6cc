"""Benchmark suites: each module of this folder defines ``SUITE``, an instance of a :class:`Suite`
subclass, and is found by name (``segclip bench --suite NAME``); nothing else needs registering.

Adding a suite (docs/benchmarks.md, "Adding a suite"): write ``segclip/bench/suites/<name>.py``
with a ``Suite`` subclass that sets the class attributes (cases, impls, baseline, ...) and either

* ``groups(settings, device, result)``: yields :class:`Group` objects (one case x dtype x mode, with one
  callable per implementation on the same data); the engine times them side by side (interleaved
  rounds, noise retries, the device's timer) and writes one :class:`Record` per implementation; or
* ``run(settings, result, progress)``: returns the records itself (the ``train`` suite: its figures
  come from the trainer's own per-phase timings).

Keep a suite module cheap to import (heavy imports inside its methods): the CLI imports every
suite to build its ``--help``. The engine's flags (``--models``, ``--dtypes``, ``--modes``,
``--impls``, ``--device``, ``--quick`` ...) mean the same in every suite; a suite adds its own in
``add_arguments`` (argparse refuses a flag two suites both define).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator

from ..cases import Case
from ..schema import Record


@dataclasses.dataclass
class Target:
    """A headline target: reported (met / not met / not measured), never asserted."""

    device: str
    case: str
    mode: str
    impl: str
    metric: str  # "speedup" (baseline time / impl time), "time_over_bound", "of_bound", or "time_over" (versus)
    op: str  # "<=" or ">="
    value: float
    dtype: str = "fp32"
    versus: str | None = None  # metric "time_over": impl time / this implementation's time, in the same run


@dataclasses.dataclass
class Group:
    """One case x dtype x mode: a callable per implementation, all on the same data."""

    case: Case
    dtype: str
    mode: str
    fns: dict[str, Callable[[], object]]
    computed: dict[str, float] = dataclasses.field(default_factory=dict)  # impl -> seconds, not timed
    extra: dict = dataclasses.field(default_factory=dict)  # figures for every record of the group
    impl_extra: dict[str, dict] = dataclasses.field(default_factory=dict)  # impl -> its own figures


class Suite:
    """The interface of a benchmark suite (see the module docstring). Class attributes:

    name, help: the ``--suite`` value and a line for ``--help``.
    cases, default_cases, quick_cases: names ``--models`` accepts, and the default sets.
    dtypes, modes: values ``--dtypes`` / ``--modes`` accept (the first of ``dtypes`` is ``--quick``'s).
    mode_titles: a table heading per mode.
    baseline, bound: the implementation speedups are relative to, and the one that is the bound (or None).
    floors: other columns that are floors, not implementations (hatched in the chart, like the bound).
    presets: {"full": {...}, "quick": {...}}: defaults of min_run_time, rounds, retries, ...
    targets: headline targets, reported after the run and on the results page.
    """

    name = ""
    help = ""
    cases: tuple[str, ...] = ()
    default_cases: tuple[str, ...] = ()
    quick_cases: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("fp32",)
    quick_dtypes: tuple[str, ...] = ("fp32",)
    modes: tuple[str, ...] = ("-",)
    mode_titles: dict[str, str] = {}
    baseline: str | None = None
    bound: str | None = None
    floors: tuple[str, ...] = ()  # other reference figures that are no implementation (drawn like the bound)
    presets = {"full": {"min_run_time": 0.2, "rounds": 3, "retries": 3, "quiet_timeout": 60.0, "retry_budget": 900.0},
               "quick": {"min_run_time": 0.1, "rounds": 1, "retries": 1, "quiet_timeout": 5.0, "retry_budget": 20.0}}
    targets: tuple[Target, ...] = ()

    def impls(self, device: str) -> dict[str, tuple[str, str | None]]:
        """``{key: (label, reason it cannot run here or None)}`` in column order."""
        raise NotImplementedError

    def make_case(self, name: str, device: str) -> Case:
        raise NotImplementedError

    def add_arguments(self, parser) -> None:
        """Adds this suite's own flags (an argparse argument group)."""

    def check(self, settings, fail: Callable[[str], SystemExit]) -> None:
        """Refuses settings the run would fail on, before anything is timed: ``raise fail(message)``."""

    def groups(self, settings, device: str, result: dict) -> Iterator[Group]:
        """The groups to time on ``device``; run-wide figures may go into ``result["extra"]``."""
        raise NotImplementedError

    def run(self, settings, result: dict, progress) -> list[Record]:
        """Default: every group of every device timed side by side (segclip.bench.engine)."""
        from ..engine import run_groups

        return run_groups(self, settings, result, progress)

    def count_timings(self, settings) -> int:
        """For the progress bar: how many timings the run makes (without retries)."""
        n = sum(sum(1 for _, why in self.impls(d).values() if why is None) for d in settings.devices)
        return n * len(settings.models) * len(settings.dtypes) * len(settings.modes) * settings.rounds


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> Suite:
    return importlib.import_module(f"{__name__}.{name}").SUITE


def all_suites() -> dict[str, Suite]:
    return {n: get(n) for n in names()}
