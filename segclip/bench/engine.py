"""Running a suite: the machine and settings recorded, the progress bar, and the default loop that
times each :class:`~segclip.bench.suites.Group`'s implementations side by side."""

from __future__ import annotations

import gc
import sys
import time

from . import schema
from .timers import OtherLoad, load_average, side_by_side


def run(suite, settings) -> dict:
    """Runs ``suite`` with resolved ``settings``; returns the result (segclip.bench.schema)."""
    from tqdm import tqdm

    started = time.perf_counter()
    result = schema.new_result(suite.name, schema.machine_info(settings.threads, settings.bench_command),
                               settings.recorded)
    # A bar only on a terminal: in a pipe or a log it would leave a line per update.
    with tqdm(total=suite.count_timings(settings), desc=f"segclip bench {suite.name}", unit="timing",
              file=sys.stderr, disable=settings.no_progress or not sys.stderr.isatty(),
              dynamic_ncols=True) as progress:
        result["records"] = suite.run(settings, result, progress)
    result["machine"]["load_average_end"] = load_average()
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    return result


def run_groups(suite, settings, result: dict, progress) -> list[schema.Record]:
    monitor = OtherLoad(settings.retry_budget)
    result["settings"]["contention"] = (
        f"a round during which other processes kept more than {settings.max_other_load} cores busy is "
        f"timed again (up to {settings.retries} times, after waiting up to {settings.quiet_timeout} s for a "
        f"quiet moment; at most {settings.retry_budget} s of redone rounds and waits per run)"
        if monitor.available else "not monitored (no /proc on this system)")
    records = []
    for device in settings.devices:
        impls = suite.impls(device)
        timer = "cpu" if device == "cpu" else "cuda-events-synced" if settings.sync_each_call else "cuda-events"
        for group in suite.groups(settings, device, result):
            result["cases"].setdefault(device, {})[group.case.name] = group.case.as_json()
            sub_label = f"{group.case.name} [{group.dtype}]"
            progress.set_postfix_str(f"{device} {sub_label} {group.mode}")
            measured, noise = side_by_side(group.fns, device, settings, monitor, progress, label=group.mode,
                                           sub_label=sub_label, descriptions={k: v[0] for k, v in impls.items()})
            for key, (_, reason) in impls.items():
                rec = schema.Record(device, group.case.name, key, group.dtype, group.mode, available=reason is None,
                                    reason=reason, noisy=noise.noisy,
                                    extra={**group.extra, **group.impl_extra.get(key, {}),
                                           "others_cpu": noise.others_cpu, "rounds_discarded": noise.rounds_discarded})
                if (m := measured.get(key)) is not None:
                    rec.median_s, rec.iqr_s, rec.min_s, rec.n_samples, rec.timer = (
                        m.median, m.iqr, min(m.times), len(m.times), timer)
                elif key in group.computed:
                    rec.median_s, rec.timer = group.computed[key], "computed"
                records.append(rec)
            del group
            gc.collect()
    return records
