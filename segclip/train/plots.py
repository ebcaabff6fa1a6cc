"""``segclip plot RUN_DIR``: PNG charts of a run, and a suggested ``max_norm``.

Charts (matplotlib, Agg backend, so no display is needed):

    loss.png            training loss per step (and its moving average), mean per epoch
    lr.png              learning rate per step (warmup, then poly decay)
    miou.png            validation mIoU and pixel accuracy per epoch
    grad_norm.png       gradient norm before clipping per step (and each logged group's: backbone,
                        classifier, aux_classifier), the max_norm line, clipped steps
    grad_norm_hist.png  histogram of the observed norms with the suggested max_norm
    timing.png          median time per step in data / forward / backward / clip / step

How to choose ``max_norm``: clipping is a guard against rare gradient spikes, not a second learning
rate. Train (or look at a run) and take a high percentile (default the 95th) of the gradient norms
seen after warmup: then about 5% of steps, the spikes, get scaled down, and typical steps are left
untouched. A threshold that clips most steps acts as a hidden LR reduction; one above every observed
norm never acts at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runlog import CONFIG, EPOCHS, PHASES, STEPS, read_jsonl


def suggest_max_norm(norms: list[float], percentile: float = 95.0, skip: int = 0) -> tuple[float, float, str]:
    """A ``max_norm`` from observed norms: the ``percentile`` of the norms after the first ``skip``
    steps (warmup, when the norms of a random initialisation are still settling; all norms when
    fewer than 20 remain).

    Returns:
        ``(suggestion, median of the same norms, the reasoning as one paragraph)``.
    """
    import numpy as np

    finite = [n for n in norms if n is not None and math.isfinite(n)]
    if not finite:
        raise ValueError("no finite gradient norms were logged")
    after_warmup = len(finite) - skip >= 20 and skip > 0
    tail = finite[skip:] if after_warmup else finite
    value = float(np.percentile(tail, percentile))
    median = float(np.median(tail))
    why = (f"suggested max_norm = {value:.3g}: the {percentile:g}th percentile of the {len(tail)} "
           f"gradient norms logged{' after warmup' if after_warmup else ''} (median {median:.3g}). "
           f"With it about {100 - percentile:g}% of steps, the spikes, are scaled down, and typical "
           f"steps keep their full size.")
    return value, median, why


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Log-scale ticks from :func:`_log_ticks`, written as plain numbers (0.2, 0.5, 1, 2, 5)
    instead of 2x10^-1, without minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = _log_ticks(lo, hi)
    if ticks:
        axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi``: 1-2-5 per decade, or finer steps when that
    gives fewer than 4 ticks (a range within one decade), so the axis always has several labels."""
    if not (0 < lo < hi):
        return []
    for subs in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in subs if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 4:
            return ticks
    return ticks


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, where it cannot cover data (saved with bbox 'tight')."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def _finite(value) -> float | None:
    """``value`` as a float when it is a finite number (JSON null, NaN, Infinity and strings: None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, percentile: float = 95.0,
             log=print) -> list[Path]:
    """Writes the charts for ``run_dir`` into ``out`` (default ``run_dir/plots``); returns their paths.

    Prints the suggested ``max_norm`` with its rationale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir).expanduser()
    steps = read_jsonl(run_dir / STEPS)
    epochs = read_jsonl(run_dir / EPOCHS)
    if not steps:
        raise FileNotFoundError(f"{run_dir / STEPS} is missing or empty: is {run_dir} a segclip run folder?")
    config = json.loads((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    args = config.get("args", {})
    max_norm = args.get("max_norm")
    clip_mode = args.get("clip", "fused")
    warmup = int(config.get("warmup_iters", 0) or 0)
    out = Path(out).expanduser() if out else run_dir / "plots"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    model = args.get("model", "")
    title = f"run {run_dir.name}" + (f" ({model})" if model and not run_dir.name.startswith(model) else "")
    written: list[Path] = []

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legends beside the axes
        plt.close(fig)
        written.append(path)

    # Loss
    fig, ax = plt.subplots(figsize=(8, 4.5))
    pts = [(r["step"], _finite(r.get("loss"))) for r in steps if _finite(r.get("loss")) is not None]
    if pts:
        sx, sy = zip(*pts)
        ax.plot(sx, sy, color="tab:blue", alpha=0.3, lw=0.8, label="loss per step")
        ax.plot(sx, _moving_average(list(sy), max(5, len(sy) // 50)), color="tab:blue", lw=2,
                label="moving average")
    ends = {}
    for r in steps:
        ends[r["epoch"]] = r["step"]
    ep = [(ends[e["epoch"]], e["train_loss"]) for e in epochs if _finite(e.get("train_loss")) is not None
          and e.get("epoch") in ends]
    if ep:
        ax.plot(*zip(*ep), "o-", color="tab:orange", label="mean per epoch")
    skipped = [r["step"] for r in steps if r.get("skipped")]
    for s in skipped:
        ax.axvline(s, color="red", alpha=0.3, lw=0.8)
    ax.set(xlabel="step", ylabel="loss", title=f"training loss\n{title}"
           + (f"\n{len(skipped)} steps skipped (non-finite, red lines)" if skipped else ""))
    if not pts:
        ax.text(0.5, 0.5, "no finite loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    save(fig, "loss.png")

    # Learning rate
    fig, ax = plt.subplots(figsize=(8, 4))
    lr = [(r["step"], _finite(r.get("lr"))) for r in steps if _finite(r.get("lr")) is not None]
    if lr:
        ax.plot(*zip(*lr), color="tab:green")
    if warmup:
        ax.axvline(warmup, color="grey", ls="--", lw=1, label=f"end of warmup ({warmup} steps)")
        _legend_outside(ax)
    ax.set(xlabel="step", ylabel="learning rate", title=f"learning rate per step (linear warmup, then poly decay)\n{title}")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    # mIoU per epoch
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ev = [(e["epoch"], e.get("val_mean_iou", e.get("val_miou")), e.get("val_pixel_accuracy")) for e in epochs
          if e.get("val_mean_iou", e.get("val_miou")) is not None]
    if ev:
        from matplotlib.ticker import MaxNLocator

        ex, miou, pacc = zip(*ev)
        ax.plot(ex, miou, "o-", color="tab:purple", label="val mIoU")
        ax.plot(ex, pacc, "s--", color="tab:grey", alpha=0.7, label="val pixel accuracy")
        best = max(range(len(miou)), key=lambda i: miou[i])
        # The best epoch is a star whose value is in the legend: a text label beside the point would
        # cover the line or fall off the corner.
        ax.plot([ex[best]], [miou[best]], "*", ms=16, color="gold", mec="black", zorder=4,
                label=f"best mIoU {miou[best]:.3f} (epoch {ex[best]})")
        last = max(ex)
        ax.set_xlim(min(ex) - 0.5, last + 0.5)  # only the epochs of the run
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(last, 12)))
        _legend_outside(ax)
    else:
        ax.text(0.5, 0.5, "no evaluation logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="score", ylim=(0, 1.05), title=f"validation mIoU and pixel accuracy per epoch\n{title}")
    ax.grid(alpha=0.3)
    save(fig, "miou.png")

    # Gradient norm per step: only finite norms (a skipped step logs null; NaN/Infinity may be logged too)
    norms = [(r["step"], _finite(r.get("grad_norm")), bool(r.get("clipped", False))) for r in steps
             if _finite(r.get("grad_norm")) is not None]
    finite_steps = len(norms)
    n_clipped = sum(1 for _, _, c in norms if c)
    share = n_clipped / finite_steps if finite_steps else 0.0
    no_norm = len(steps) - finite_steps
    no_norm_text = f" ({no_norm} without a finite norm)" if no_norm else ""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown_groups: list[float] = []
    if norms:
        nx, ny, nc = zip(*norms)
        ax.plot(nx, ny, color="tab:blue", lw=0.8, alpha=0.8, label="norm before clipping")
        # Each group's norm (backbone, classifier, ...), where the run logged them (segclip's norms)
        names = list(dict.fromkeys(k for r in steps for k in (r.get("group_norms") or {})))
        colors = ("tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
        for k, name in enumerate(names):
            pts = [(r["step"], _finite((r.get("group_norms") or {}).get(name))) for r in steps]
            pts = [(x, y) for x, y in pts if y is not None and y > 0]  # a log axis: no zeros
            if pts:
                gx, gy = zip(*pts)
                ax.plot(gx, gy, color=colors[k % len(colors)], lw=0.7, alpha=0.8, label=f"{name} norm")
                shown_groups.extend(gy)
        cx = [s for s, _, c in norms if c]
        cy = [v for _, v, c in norms if c]
        if cx:
            ax.scatter(cx, cy, s=8, color="tab:red", zorder=3, label=f"clipped steps ({n_clipped})")
        ax.set_yscale("log")
        shown = [v for v in ny] + shown_groups + ([max_norm] if max_norm and clip_mode != "none" else [])
        _plain_log_ticks(ax.yaxis, min(shown), max(shown))
    else:
        ax.text(0.5, 0.5, f"no finite gradient norm logged ({len(steps)} steps, all skipped or non-finite)",
                ha="center", va="center", transform=ax.transAxes)
    if max_norm is not None and clip_mode != "none":
        ax.axhline(max_norm, color="black", ls="--", lw=1.2, label=f"max_norm = {max_norm:g}")
    mode = "no clipping (norm only measured)" if clip_mode == "none" else f"clip={clip_mode}"
    ax.set(xlabel="step", ylabel=f"{'' if shown_groups else 'total '}gradient norm (L{args.get('norm_type', 2.0):g})",
           title=f"gradient norm before clipping, {mode}: {100 * share:.1f}% of {finite_steps} steps "
                 f"clipped{no_norm_text}\n{title}")
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
    save(fig, "grad_norm.png")

    # Histogram and suggestion: only with at least one finite norm
    values = [v for _, v, _ in norms]
    if values:
        why = _histogram(plt, save, values, [s for s, _, _ in norms], warmup, percentile, max_norm, clip_mode,
                         share, title, no_norm)
    else:
        why = (f"no max_norm suggested and grad_norm_hist.png not drawn: no finite gradient norm was logged "
               f"({len(steps)} steps, all skipped or non-finite).")

    # Timing: medians, because the first steps (allocation, warm-up, compilation) and evaluation
    # pauses make the mean describe no typical step.
    import statistics

    fig, ax = plt.subplots(figsize=(7, 4))
    per_phase = {p: [_finite(r.get(f"t_{p}")) or 0.0 for r in steps] for p in PHASES}
    medians = [statistics.median(per_phase[p]) * 1e3 for p in PHASES]
    totals = [sum(per_phase[p][i] for p in PHASES) * 1e3 for i in range(len(steps))]
    median_step, mean_step = statistics.median(totals), statistics.fmean(totals)
    shown = sum(medians)
    bars = ax.bar(PHASES, medians, color=["tab:grey", "tab:blue", "tab:orange", "tab:red", "tab:green"])
    for b, m in zip(bars, medians):
        ax.annotate(f"{m:.1f} ms\n{100 * m / shown:.1f}%" if shown else "", (b.get_x() + b.get_width() / 2, m),
                    textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    path = next((r["clip_path"] for r in steps if r.get("clip_path")), None)
    path = f" ({path})" if path and path != clip_mode else ""  # --clip fused: folded, one-pass or plain
    ax.set(ylabel="ms per step (median)",
           title=f"time per step: median {median_step:.0f} ms (mean {mean_step:.0f} ms), clip={clip_mode}{path}\n{title}")
    ax.set_ylim(0, max(medians) * 1.25 if shown else 1)
    ax.grid(alpha=0.3, axis="y")
    save(fig, "timing.png")

    clip_note = ""
    if max_norm is not None and clip_mode != "none" and values:
        if share > 0.5:
            clip_note = (f" The max_norm used ({max_norm:g}) clipped {100 * share:.0f}% of steps: it acts as "
                         f"a hidden learning-rate cut rather than a spike guard.")
        elif share == 0:
            clip_note = f" The max_norm used ({max_norm:g}) never clipped: it guards only against bigger spikes."
        else:
            clip_note = f" The max_norm used ({max_norm:g}) clipped {100 * share:.1f}% of steps."
    import textwrap

    log(textwrap.fill(why + clip_note + (" Norms change with the learning rate, batch size and model: "
                                         "re-check after changing them." if values else ""), width=100))
    return written


def _histogram(plt, save, values: list[float], steps: list[int], warmup: int, percentile: float,
               max_norm, clip_mode: str, share: float, title: str, no_norm: int = 0) -> str:
    """grad_norm_hist.png from the finite norms (``steps``: their step numbers); returns the
    suggestion's reasoning."""
    import numpy as np

    n_warm = sum(1 for s in steps if s <= warmup)  # finite norms logged during warmup
    suggestion, median, why = suggest_max_norm(values, percentile, skip=n_warm)
    fig, ax = plt.subplots(figsize=(10, 4.8))  # the legend goes beside the axes
    lo, hi = max(min(values), 1e-12), max(values)
    bins = np.geomspace(lo, hi * 1.0001, 40) if hi > lo * 1.01 else 20
    n_warm = n_warm if len(values) - n_warm >= 20 else 0
    if n_warm:
        ax.hist([values[n_warm:], values[:n_warm]], bins=bins, stacked=True, color=["tab:blue", "lightgrey"],
                label=["after warmup", f"during warmup ({n_warm} steps)"])
    else:
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.75)
    if isinstance(bins, np.ndarray):
        ax.set_xscale("log")
        marks = [suggestion, median] + ([max_norm] if max_norm and clip_mode != "none" else [])
        _plain_log_ticks(ax.xaxis, min(lo, *marks), max(hi, *marks))
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # step counts: whole numbers
    ax.axvline(suggestion, color="tab:green", lw=2, label=f"suggested max_norm {suggestion:.3g} "
               f"(p{percentile:g}{' after warmup' if n_warm else ', all steps'})")
    ax.axvline(median, color="grey", ls=":", lw=1.5, label=f"median {median:.3g}{' (after warmup)' if n_warm else ''}")
    if max_norm is not None and clip_mode != "none":
        ax.axvline(max_norm, color="black", ls="--", lw=1.2,
                   label=f"max_norm used {max_norm:g} ({100 * share:.1f}% clipped)")
    ax.set(xlabel="total gradient norm before clipping (log scale)", ylabel="steps",
           title=f"observed gradient norms ({len(values)} steps{f', {no_norm} without a finite norm' if no_norm else ''}): how to choose max_norm\n{title}")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    save(fig, "grad_norm_hist.png")
    return why
