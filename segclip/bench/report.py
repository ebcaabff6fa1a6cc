"""Reports of a ``segclip-bench/2`` result: the table (the same rows on the terminal, in
``summary.md`` and on the results page), the headline targets, and ``--compare``.

Every figure is read from the result; a figure it does not hold reads "not measured".
"""

from __future__ import annotations

import functools

from .schema import Record
from .suites import Suite, Target, get

NOT_MEASURED = "not measured"
SHORT_MODE = {"active": "clipping active", "inactive": "nothing to clip"}


def fmt_time(s: float | None) -> str:
    if s is None:
        return NOT_MEASURED
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


class Figures:
    """The records of a result, indexed, with the ratios the suite defines computed on demand."""

    def __init__(self, result: dict, suite: Suite | None = None) -> None:
        self.suite = suite or get(result["suite"])
        self.records: list[Record] = result["records"]
        self.by_key = {r.key: r for r in self.records}

    def get(self, device, case, dtype, mode, impl) -> Record | None:
        return self.by_key.get((device, case, dtype, mode, impl))

    def _time(self, r: Record, impl: str | None) -> float | None:
        other = impl and self.get(r.device, r.case, r.dtype, r.mode, impl)
        return other.median_s if other else None

    def speedup(self, r: Record) -> float | None:
        base = self._time(r, self.suite.baseline)
        return base / r.median_s if base and r.median_s else None

    def of_bound(self, r: Record) -> float | None:
        bound = self._time(r, self.suite.bound)
        return bound / r.median_s if bound and r.median_s else None

    def time_over_bound(self, r: Record) -> float | None:
        x = self.of_bound(r)
        return 1 / x if x else None

    def time_over(self, r: Record, impl: str) -> float | None:
        base = self._time(r, impl)
        return r.median_s / base if base and r.median_s else None

    def cell(self, r: Record | None) -> str:
        """``time (speedup, fraction of the bound)``, "not available: why", or "not measured"."""
        if r is not None and not r.available:
            return f"not available: {r.reason or 'unknown reason'}"
        if r is None or r.median_s is None:
            return NOT_MEASURED
        extra = []
        if r.impl != self.suite.baseline and (s := self.speedup(r)) is not None:
            extra.append(fmt_ratio(s))
        if r.impl != self.suite.bound and (b := self.of_bound(r)) is not None:
            extra.append(f"{100 * b:.0f}% of bound")
        star = "*" if r.timer == "computed" else ""
        return fmt_time(r.median_s) + star + (f" ({', '.join(extra)})" if extra else "")

    def noise_summary(self) -> str:
        groups: dict[tuple, list[Record]] = {}
        for r in self.records:
            groups.setdefault(r.key[:4], []).append(r)
        noisy = [k for k, g in groups.items() if any(r.noisy for r in g)]
        discarded = sum(max(r.extra.get("rounds_discarded") or 0 for r in g) for g in groups.values())
        text = f"{discarded} round(s) discarded and timed again because other processes used the CPUs"
        if noisy:
            return text + (f"; {len(noisy)} of {len(groups)} groups still noisy after the retries: "
                           + ", ".join("/".join(k) for k in noisy))
        return text + f"; no group of {len(groups)} kept a disturbed round"


def tables(result: dict, device: str, cases=None, dtypes=None, modes=None, titles=None,
           suite: Suite | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """``[(title, header, rows)]``: one table per mode x dtype, a row per case, a column per
    implementation. The same rows go to the terminal, summary.md and the results page."""
    fig = Figures(result, suite)
    s = fig.suite
    recs = [r for r in fig.records if r.device == device]
    cases = list(cases or dict.fromkeys(r.case for r in recs))
    dtypes = list(dtypes or dict.fromkeys(r.dtype for r in recs))
    modes = list(modes or [m for m in s.modes if any(r.mode == m for r in recs)])
    labels = {k: label for k, (label, _) in s.impls(device).items()}
    labels.update({r.impl: r.impl for r in recs if r.impl not in labels})
    info = result.get("cases", {}).get(device, {})
    out = []
    for mode in modes:
        for dtype in dtypes:
            rows = []
            for case in cases:
                c = info.get(case, {})
                noisy = any(r.noisy for r in recs if (r.case, r.dtype, r.mode) == (case, dtype, mode))
                rows.append([case + (" (noisy)" if noisy else ""), str(c.get("n_tensors", "-")),
                             f"{c['n_elements']:,}" if "n_elements" in c else "-"]
                            + [fig.cell(fig.get(device, case, dtype, mode, k)) for k in labels])
            title = f"{device}, {dtype}, {(titles or s.mode_titles).get(mode, mode)}"
            out.append((title, ["case", "tensors", "elements", *labels.values()], rows))
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns; a column of figures (cells starting with a digit) right-aligned."""
    cols = list(zip(header, *rows))
    widths = [max(len(x) for x in col) for col in cols]
    right = [sum(c[:1].isdigit() for c in col[1:]) * 2 > len(col) - 1 for col in cols]
    line = lambda cells: "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()  # noqa: E731
    return "\n".join([line(header), "-" * (sum(widths) + 2 * len(widths) - 2), *map(line, rows)])


def devices_of(result: dict) -> list[str]:
    return list(dict.fromkeys(r.device for r in result["records"]))


def suite_tables(result: dict, markdown: bool, heading: str = "##") -> str:
    """Every table of the result (the suite may draw its own), as Markdown or plain text."""
    suite = get(result["suite"])
    if hasattr(suite, "tables"):
        return suite.tables(result, markdown)
    out = []
    for device in devices_of(result):
        for title, header, rows in tables(result, device):
            out.append(f"{heading} {title}\n\n{markdown_table(header, rows)}\n" if markdown
                       else f"== {title} ==\n{text_table(header, rows)}\n")
    notes = []
    if any(r.timer == "computed" for r in result["records"]):
        notes.append("* computed from the measured copy bandwidth, not timed.")
    if suite.baseline:
        notes.append(f"Cells: median time of one call (speedup over {suite.impls('cpu')[suite.baseline][0]}, "
                     "bound time / this time).")
    return "\n".join(out + notes)


def evaluate_targets(result: dict, suite: Suite | None = None, device: str | None = None) -> list[dict]:
    fig = Figures(result, suite)
    out = []
    for t in fig.suite.targets:
        if device is not None and t.device != device:
            continue
        r = fig.get(t.device, t.case, t.dtype, t.mode, t.impl)
        metric = functools.partial(fig.time_over, impl=t.versus) if t.metric == "time_over" else getattr(fig, t.metric)
        measured = metric(r) if r is not None and r.median_s else None
        if measured is None:
            met = None
            status = NOT_MEASURED + (f" (not available: {r.reason})" if r is not None and not r.available else "")
        else:
            met = measured <= t.value if t.op == "<=" else measured >= t.value
            status = "met" if met else "not met"
        out.append({"target": t, "measured": measured, "met": met, "status": status})
    return out


def _target_text(t: Target, suite: Suite) -> str:
    if t.metric == "of_bound":
        return f"fraction of bandwidth bound {t.op} {100 * t.value:.0f}%"
    labels = {k: label for k, (label, _) in suite.impls(t.device).items()}
    if t.metric in ("time_over", "time_over_bound"):
        what = f"time / {labels[t.versus if t.metric == 'time_over' else suite.bound]}"
    else:
        what = f"speedup vs {labels[suite.baseline]}"
    return f"{what} {t.op} {round(t.value, 3)}x"  # 1/1.05 reads 0.952x


def targets_table(result: dict, device: str, suite: Suite | None = None) -> tuple[list[str], list[list[str]]]:
    rows, fig_suite = [], suite or get(result["suite"])
    for e in evaluate_targets(result, fig_suite, device):
        t, m = e["target"], e["measured"]
        shown = NOT_MEASURED if m is None else f"{100 * m:.0f}%" if t.metric == "of_bound" else f"{m:.2f}x"
        rows.append([t.case, t.mode, _target_text(t, fig_suite), shown, e["status"]])
    return ["case", "mode", "target", "measured", "status"], rows


def targets_title(device: str, suite: Suite) -> str:
    impl = next((t.impl for t in suite.targets if t.device == device), "")
    return f"Headline targets ({device}, fp32, {impl.replace('_', ' ')}; reported, not asserted)"


def machine_lines(result: dict) -> list[str]:
    m = result.get("machine") or {}
    backends = m.get("segclip_backends")
    if isinstance(backends, dict):
        backends = ", ".join(f"{k}: available" if v.get("available") else f"{k}: unavailable ({v.get('reason')})"
                             for k, v in backends.items())
    cpu = ", ".join([m["cpu_model"]] + [f"{m[k]} {what}" for k, what in (("cpu_cores", "cores"), ("torch_threads", "torch threads"))
                                         if m.get(k)]) if m.get("cpu_model") else None
    software = f"torch {m.get('torch_version') or 'not recorded'}" + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
    lines = [f"- date: {m.get('date') or 'not recorded'}",
             f"- machine: {'; '.join(x for x in (cpu, 'GPU: ' + (m.get('gpu_name') or 'none')) if x)}",
             f"- {software}" + (f"; segclip backends: {backends}" if backends else ""),
             f"- command: `{m['command']}`" if m.get("command") else "- command: not recorded"]
    if m.get("load_average_start") is not None:
        lines.append(f"- load average (1, 5, 15 min) at start {m['load_average_start']}, at end {m.get('load_average_end')}")
    s = result.get("settings") or {}
    if s.get("timing"):
        lines.append(f"- timing: {s['timing']}")
    if any("rounds_discarded" in r.extra for r in result["records"]):
        lines.append(f"- contention: {Figures(result).noise_summary()}. A row marked (noisy) was timed while "
                     "other processes used the CPUs")
    return lines


def summary_markdown(result: dict) -> str:
    suite = get(result["suite"])
    parts = [f"# segclip bench {suite.name}\n", *machine_lines(result), ""]
    for device in devices_of(result):
        if any(t.device == device for t in suite.targets):
            parts += [f"## {targets_title(device, suite)}\n", markdown_table(*targets_table(result, device, suite)), ""]
    return "\n".join(parts + [suite_tables(result, markdown=True)])


def format_targets(result: dict) -> str:
    suite = get(result["suite"])
    out = []
    for device in devices_of(result):
        if any(t.device == device for t in suite.targets):
            evaluated = evaluate_targets(result, suite, device)
            met = sum(1 for e in evaluated if e["met"])
            measured = sum(1 for e in evaluated if e["met"] is not None)
            out += [f"== {targets_title(device, suite)} ==", text_table(*targets_table(result, device, suite)),
                    f"{met} of {measured} measured targets met ({len(evaluated) - measured} not measured)", ""]
    return "\n".join(out)


def format_compare(old: dict, new: dict, threshold: float = 0.10, names=("old", "new")) -> str:
    """How each figure moved: new/old median time (> 1 + threshold flagged), and the speedups."""
    fo, fn = Figures(old), Figures(new)
    om, nm = old.get("machine") or {}, new.get("machine") or {}
    lines = [f"== compare: {names[1]} against {names[0]} ==",
             f"old: {om.get('date', '?')}  {om.get('command', '')}", f"new: {nm.get('date', '?')}  {nm.get('command', '')}"]
    lines += [f"note: {k} differs: {om.get(k)!r} -> {nm.get(k)!r}; times are not comparable as such"
              for k in ("cpu_model", "torch_threads", "gpu_name", "torch_version") if om.get(k) != nm.get(k)]
    rows, regressions, faster = [], 0, 0
    for key in list(fn.by_key) + [k for k in fo.by_key if k not in fn.by_key]:
        a, b = fo.by_key.get(key), fn.by_key.get(key)
        ta, tb = a and a.median_s, b and b.median_s
        ratio = tb / ta if ta and tb else None
        if ratio is None:
            flag = "only in old" if b is None else "only in new" if a is None else NOT_MEASURED
        elif ratio > 1 + threshold:
            flag, regressions = f"REGRESSION (+{100 * (ratio - 1):.0f}%)", regressions + 1
        elif ratio < 1 / (1 + threshold):
            flag, faster = f"faster ({100 * (ratio - 1):.0f}%)", faster + 1
        else:
            flag = ""
        speed = ("" if key[4] == fn.suite.baseline else
                 f"{fmt_ratio(a and fo.speedup(a))}->{fmt_ratio(b and fn.speedup(b))}")
        rows.append([*key, fmt_time(ta) if a else "-", fmt_time(tb) if b else "-",
                     fmt_ratio(ratio, 3) if ratio else "-", speed, flag])
    lines.append(text_table(["device", "case", "dtype", "mode", "impl", "old", "new", "new/old", "speedup old->new",
                             "flag"], rows))
    lines.append(f"{regressions} figure(s) more than {100 * threshold:.0f}% slower, {faster} more than "
                 f"{100 * threshold:.0f}% faster. A run-wide drift of every implementation alike is machine load; "
                 "a change in one column is the code.")
    return "\n".join(lines)
