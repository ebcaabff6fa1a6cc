"""Timers: one call's median time, as a ``torch.utils.benchmark.Measurement`` on every device.

* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with ``num_threads`` = torch's thread
  count (Timer's own default would be 1 thread).
* CUDA: CUDA events around blocks of back-to-back calls (launch and Python overhead count, as in a
  training loop), the device synchronised before each block and the end event waited for; blocks
  are repeated until ``min_run_time`` is spent. ``sync_each_call=True`` also synchronises after
  every call, so the figure is what a host that waits for each result sees.
* :func:`side_by_side` times several callables on the same data in interleaved rounds (the order
  reversed every other round, so background load hits all of them alike) and redoes a round during
  which other processes used the CPUs (:class:`OtherLoad`).

NOTE: both timers return Measurements, so rounds are merged with ``Measurement.merge`` and every
suite's figures come out of one code path whatever the device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils.common import TaskSpec

CUDA_BANDWIDTH_BYTES = 256 * 2**20


def measure(fn: Callable, device: str, min_run_time: float, threads: int, *, label: str = "",
            sub_label: str = "", description: str = "", sync_each_call: bool = False) -> benchmark.Measurement:
    """The time of one ``fn()`` call on ``device`` (see the module docstring)."""
    if not device.startswith("cuda"):
        return benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=sub_label,
                               description=description, num_threads=threads).blocked_autorange(
                                   min_run_time=min_run_time)
    spec = TaskSpec(stmt="fn()", setup="pass", label=label, sub_label=sub_label, description=description,
                    num_threads=threads)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def block(number: int) -> float:
        torch.cuda.synchronize()
        start.record()
        for _ in range(number):
            fn()
            if sync_each_call:
                torch.cuda.synchronize()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    block(1)  # warm-up
    number = 1
    while (t := block(number)) < max(min_run_time / 20, 1e-4) and number < 1_000_000:
        number *= 10  # a block long enough that event resolution (~1 us) does not matter
    raw = [t]
    while sum(raw) < min_run_time or len(raw) < 3:
        raw.append(block(number))
    return benchmark.Measurement(number_per_run=number, raw_times=raw, task_spec=spec)


def copy_bandwidth(device: str, min_run_time: float, threads: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second), for the CUDA bound."""
    src = torch.empty(CUDA_BANDWIDTH_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    m = measure(lambda: dst.copy_(src), device, max(min_run_time, 0.2), threads,
                label="copy bandwidth", description="dst.copy_(src)")
    return {"bytes_copied": CUDA_BANDWIDTH_BYTES, "median_s": m.median, "bytes_per_s": 2 * CUDA_BANDWIDTH_BYTES / m.median}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class OtherLoad:
    """CPU time used by OTHER processes while we time (Linux ``/proc``; elsewhere unknown).

    On a small shared machine another process on the other core delays each of our parallel
    regions by a scheduler time slice (milliseconds), so a round timed while someone compiles is
    noise. ``others(before, after)`` is the average number of cores others kept busy in between:
    all busy jiffies (steal included) minus this process's own (all its threads).
    """

    def __init__(self, budget: float = math.inf) -> None:
        self.available = self.snapshot() is not None
        self.budget = budget  # seconds this run may still spend redoing disturbed rounds

    @staticmethod
    def snapshot() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        except (OSError, ValueError, IndexError):
            return None
        return sum(vals), vals[3] + vals[4], own  # total, idle + iowait, own

    @staticmethod
    def others(before, after) -> float | None:
        if before is None or after is None or after[0] <= before[0]:
            return None
        total = after[0] - before[0]
        busy = total - (after[1] - before[1]) - (after[2] - before[2])
        return max(0.0, busy / total * (os.cpu_count() or 1))

    def wait_quiet(self, threshold: float, timeout: float, window: float = 0.5) -> None:
        """Sleeps in ``window`` steps until others use at most ``threshold`` cores (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            before = self.snapshot()
            time.sleep(window)
            load = self.others(before, self.snapshot())
            if load is None or load <= threshold or time.monotonic() >= deadline:
                return


@dataclasses.dataclass
class Noise:
    """What :func:`side_by_side` saw of other processes: the most cores they kept busy during a
    kept round (None: not monitored), and how many rounds were discarded and timed again."""

    others_cpu: float | None = None
    rounds_discarded: int = 0
    noisy: bool = False


def side_by_side(fns: dict[str, Callable], device: str, settings, monitor: OtherLoad, progress=None, *,
                 label: str = "", sub_label: str = "", descriptions: dict[str, str] | None = None
                 ) -> tuple[dict[str, benchmark.Measurement], Noise]:
    """Times every callable ``settings.rounds`` times, interleaved; returns the merged Measurements.

    ``settings`` supplies ``rounds``, ``min_run_time``, ``threads``, ``retries``, ``max_other_load``,
    ``quiet_timeout`` and ``sync_each_call``; ``progress`` (a tqdm bar or None) is advanced once per timing.
    """
    by_key: dict[str, list] = {k: [] for k in fns}
    noise = Noise()
    kept: list[float] = []
    for r in range(settings.rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for attempt in range(settings.retries + 1):
            started, before = time.monotonic(), monitor.snapshot()
            got = {}
            for key in order:
                got[key] = measure(fns[key], device, settings.min_run_time, settings.threads, label=label,
                                   sub_label=sub_label, description=(descriptions or {}).get(key, key),
                                   sync_each_call=settings.sync_each_call)
                if progress is not None:
                    progress.update(1)
            others = monitor.others(before, monitor.snapshot())
            if (others is None or others <= settings.max_other_load or attempt == settings.retries
                    or monitor.budget <= 0):
                break
            # Someone else used the CPUs during this round: time it again once they stop.
            noise.rounds_discarded += 1
            if progress is not None:
                progress.total += len(order)
                progress.write(f"{sub_label} {label} round {r + 1}: other processes used {others:.2f} cores; "
                               "round discarded, waiting for a quiet moment")
            monitor.wait_quiet(settings.max_other_load, min(settings.quiet_timeout, monitor.budget))
            monitor.budget -= time.monotonic() - started
        for key, m in got.items():
            by_key[key].append(m)
        if others is not None:
            kept.append(others)
    if kept:
        noise.others_cpu = round(max(kept), 3)
        noise.noisy = noise.others_cpu > settings.max_other_load
    return {k: benchmark.Measurement.merge(ms)[0] for k, ms in by_key.items()}, noise
