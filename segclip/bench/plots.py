"""``speedup.png``: the speedup over the suite's baseline per case, a panel per device x mode x dtype,
on a log axis (a 20x bar and a 1.1x bar both stay readable) with each bar's value written on it."""

from __future__ import annotations

import math
from pathlib import Path

from .report import SHORT_MODE, Figures, devices_of

SHORT_CASE = {
    "deeplabv3_resnet50": "deeplabv3_r50", "deeplabv3_resnet101": "deeplabv3_r101",
    "deeplabv3_mobilenet_v3_large": "deeplabv3_mbv3", "lraspp_mobilenet_v3_large": "lraspp_mbv3",
    "synthetic_tiny": "tiny x2000", "synthetic_huge": "huge x8", "synthetic_smoke": "smoke x16",
}


def _label_log_ticks(ax, ticker) -> None:
    """Ticks read "0.5x", "2x", "10x" (not "2 x 10^0"); over more than a decade only 1, 2, 3 and 5 of
    each decade are labelled, so the labels never overlap."""
    low, high = ax.get_ylim()
    wide = high / low > 10

    def label(v, _):
        lead = round(v / 10 ** math.floor(math.log10(v)), 6)
        return f"{v:g}x" if not wide or lead in (1, 2, 3, 5) else ""
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(label))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(label))
    ax.tick_params(axis="y", which="both", labelsize=7)


def plot_speedups(result: dict, path) -> Path | None:
    """Writes the chart to ``path``; None when the result holds no speedup to draw."""
    fig_data = Figures(result)
    suite = fig_data.suite
    recs = [r for r in fig_data.records if r.impl != suite.baseline and fig_data.speedup(r)]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    # a row per device x dtype, a column per mode
    rows_ = [(d, t) for d in devices_of(result) for t in suite.dtypes if any((r.device, r.dtype) == (d, t) for r in recs)]
    modes = [m for m in suite.modes if any(r.mode == m for r in recs)]
    panels = [(d, m, t) for d, t in rows_ for m in modes]
    n_cases = len({r.case for r in recs})
    fig, axes = plt.subplots(len(rows_), len(modes), squeeze=False,
                             figsize=(max(6.0, 2 + 1.1 * n_cases) * len(modes), 4.2 * len(rows_)))
    for ax, (device, mode, dtype) in zip(axes.flat, panels):
        group = [r for r in recs if (r.device, r.mode, r.dtype) == (device, mode, dtype)]
        if not group:
            continue
        cases = list(dict.fromkeys(r.case for r in group))
        labels = {k: v[0] for k, v in suite.impls(device).items() if any(r.impl == k for r in group)}
        width = 0.8 / len(labels)
        for i, (impl, label) in enumerate(labels.items()):
            got = {r.case: fig_data.speedup(r) for r in group if r.impl == impl}
            xs = [x + (i - (len(labels) - 1) / 2) * width for x, c in enumerate(cases) if c in got]
            ys = [got[c] for c in cases if c in got]
            # bars grow from 1 (as fast as the baseline): up when faster, down when slower
            floor = impl == suite.bound or impl in suite.floors
            bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=label,
                          hatch="//" if floor else None, alpha=0.6 if floor else 1.0)
            ax.bar_label(bars, labels=[f"{y:.3g}x" for y in ys], fontsize=6, padding=1)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)), [SHORT_CASE.get(c, c) for c in cases], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"speedup over {suite.impls(device)[suite.baseline][0]} (log)")
        ax.set_title(f"{device}, {dtype}, {SHORT_MODE.get(mode, mode)}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.margins(y=0.15)
        _label_log_ticks(ax, ticker)
    for ax, panel in zip(axes.flat, panels):
        if not any((r.device, r.mode, r.dtype) == panel for r in recs):
            ax.set_visible(False)
    m = result.get("machine") or {}
    fig.suptitle(f"segclip bench {suite.name}: {m.get('gpu_name') or m.get('cpu_model', '')} "
                 f"({m.get('torch_threads', '?')} threads), {m.get('date', '')}", fontsize=10)
    # one legend below the panels (inside a panel it hid the labels of the bars under it)
    handles, names = max((ax.get_legend_handles_labels() for ax in axes.flat), key=lambda hl: len(hl[1]))
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(names) - 1) // 4), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
