"""Reports for ``segclip bench``: terminal tables, the headline targets, the Markdown summary, the
PNG chart, ``--compare`` and the results page (``benchmarks/make_results.py``).

Everything here reads figures from a benchmark JSON; nothing is typed in. A figure that the JSON
does not hold is printed as "not measured".

Lenient inputs (for JSON written by other tools, e.g. ``benchmarks/gpu_bench.py``):
    A file may be a list of records, or an object with the records under ``records``, ``results``,
    ``rows`` or ``data`` (and optionally ``machine``: an object, shown as is). A record's keys, with
    the aliases accepted:
        case      case | model | name
        dtype     dtype | grad_dtype                (fp32/float32/torch.float32, bf16/..., fp16/...)
        mode      mode | clipping | clip_active     (active/clip/true, inactive/none/noclip/false)
        impl      impl | implementation | backend | variant | description
                  (torch_foreach/"torch foreach"/foreach, torch_loop, segclip_torch, segclip_cuda/
                  fused/segclip/cuda, bound; others are kept as their own column)
        device    device (default: the file's role: "cuda" for --gpu-json)
        time      median_s | time_s | seconds, median_ms | time_ms | ms, median_us | time_us | us
        bound     bound_s | bound_ms | bound_us (a time for this record's case; becomes the bound column)
        extra     speedup_vs_foreach, fraction_of_bound (computed when missing)
    Records that lack a case, or a time, are skipped (their figures stay "not measured").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .bench import (
    ALL_CASES, BASELINE, DTYPES, IMPL_LABELS, MODE_TITLES, MODES, QUICK_CASES, add_ratios,
)

NOT_MEASURED = "not measured"
SHORT_MODE_TITLES = {"active": "clipping active", "inactive": "nothing to clip"}

# The headline targets: reported (met / not met / not measured), never asserted.
TARGET_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50")
TARGETS = (
    [{"case": c, "mode": "active", "metric": "time_over_bound", "op": "<=", "value": 1.1,
      "text": "segclip cpu within 1.1x of the flat bound"} for c in TARGET_MODELS]
    + [{"case": c, "mode": "active", "metric": "speedup_vs_foreach", "op": ">=", "value": v,
        "text": f"segclip cpu >= {v}x faster than torch foreach"}
       for c, v in zip(TARGET_MODELS, (1.8, 1.3, 1.05))]
    + [{"case": c, "mode": "inactive", "metric": "speedup_vs_foreach", "op": ">=", "value": 2.5,
        "text": "segclip cpu >= 2.5x faster than torch foreach"} for c in TARGET_MODELS]
)
for _t in TARGETS:
    _t.update(device="cpu", dtype="fp32", impl="segclip_cpu")

SHORT_CASE = {
    "fcn_resnet50": "fcn_resnet50", "fcn_resnet101": "fcn_resnet101",
    "deeplabv3_resnet50": "deeplabv3_r50", "deeplabv3_resnet101": "deeplabv3_r101",
    "deeplabv3_mobilenet_v3_large": "deeplabv3_mbv3", "lraspp_mobilenet_v3_large": "lraspp_mbv3",
    "synthetic_tiny": "tiny x2000", "synthetic_huge": "huge x8", "synthetic_smoke": "smoke x16",
}


# ----------------------------------------------------------------------------------------------
# Loading and normalising


class BadJSON(ValueError):
    """A benchmark JSON that cannot be read: the message names the file, for a one-line error."""


def load_json(path) -> dict | list:
    """The JSON object (or list of records) in ``path``.

    Raises:
        BadJSON: the file is missing or unreadable, is not JSON, or its top level is neither an
            object nor a list (one line naming the file, for the command line).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise BadJSON(f"{path}: no such file") from None
    except OSError as exc:
        raise BadJSON(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadJSON(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, (dict, list)):
        raise BadJSON(f"{path}: not a benchmark JSON (its top level is {type(data).__name__ if data is not None else 'null'}, "
                      "not an object or a list of records)")
    return data


def load_records_json(path) -> dict | list:
    """:func:`load_json`, and the file must hold at least one readable record (for ``--compare``)."""
    data = load_json(path)
    if not any(r.get("median_s") is not None for r in normalize_records(data)):
        raise BadJSON(f"{path}: holds no benchmark record with a time (a case, an implementation and "
                      "a median time each)")
    return data


def _first(rec: dict, *keys):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    return None


def _norm_dtype(v) -> str | None:
    if v is None:
        return None
    s = str(v).lower().replace("torch.", "")
    return {"float32": "fp32", "float": "fp32", "fp32": "fp32", "f32": "fp32",
            "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16",
            "f16": "fp16", "float64": "fp64", "double": "fp64", "fp64": "fp64"}.get(s, s)


def _norm_mode(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "active" if v else "inactive"
    s = str(v).lower().replace("-", "_").replace(" ", "_")
    if s in ("active", "clip", "clipping", "clipping_active", "true", "on", "yes"):
        return "active"
    if s in ("inactive", "none", "noclip", "no_clip", "nothing_to_clip", "false", "off", "no", "idle"):
        return "inactive"
    return s


def _norm_impl(v, device: str) -> str | None:
    if v is None:
        return None
    s = str(v).lower().strip().replace("-", "_").replace(" ", "_").replace(".", "_")
    aliases = {
        "torch_foreach": "torch_foreach", "foreach": "torch_foreach", "torch": "torch_foreach",
        "clip_grad_norm__foreach": "torch_foreach", "torch_foreach_true": "torch_foreach",
        "torch_loop": "torch_loop", "loop": "torch_loop", "torch_foreach_false": "torch_loop",
        "torch_no_foreach": "torch_loop",
        "segclip_torch": "segclip_torch", "reference": "segclip_torch",
        "segclip_cpu": "segclip_cpu", "segclip_cuda": "segclip_cuda",
        "ops": "segclip_ops", "api": f"segclip_{device}",
        "fused": f"segclip_{device}", "segclip": f"segclip_{device}", "cuda": "segclip_cuda",
        "cpu": "segclip_cpu", "bound": "bound", "flat_bound": "bound", "bandwidth_bound": "bound",
    }
    return aliases.get(s, s)


def _seconds(rec: dict, stem: str) -> float | None:
    for suffix, scale in (("_s", 1.0), ("_ms", 1e-3), ("_us", 1e-6)):
        for key in (f"{stem}{suffix}",) + ((f"time{suffix}",) if stem == "median" else ()):
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
                return float(v) * scale
    if stem == "median":
        for key, scale in (("seconds", 1.0), ("ms", 1e-3), ("us", 1e-6)):
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return float(v) * scale
    return None


GPU_BENCH_IMPLS = {"torch": "torch_foreach", "api": "segclip_cuda", "ops": "segclip_ops"}
GPU_BENCH_NOTE = ("figures from benchmarks/gpu_bench.py: CUDA events around back-to-back calls, median "
                  "over rounds; with clipping active max_norm is halved on every call (see its docstring); "
                  "'segclip ops' calls torch.ops.segclip directly, 'segclip cuda' is segclip.fused_clip_; "
                  "the bound is computed from the copy bandwidth that file measured")


def is_gpu_bench(data) -> bool:
    """The layout of benchmarks/gpu_bench.py: {"env": {...}, "models": {model: {"clip": ..., "noclip": ...}}}."""
    return isinstance(data, dict) and isinstance(data.get("env"), dict) and isinstance(data.get("models"), dict)


def _gpu_bench_records(data: dict) -> list[dict]:
    env = data["env"]
    device = "cpu-dry-run" if env.get("dry_run") else "cuda"  # a dry run's figures are no GPU figures
    copy = ((data.get("bandwidth") or {}).get("copy") or {}).get("GBps")
    bytes_per_s = copy * 1e9 if isinstance(copy, (int, float)) and copy > 0 else None
    cases = [(m, e, e.get("elements")) for m, e in data["models"].items() if isinstance(e, dict)]
    big = data.get("bandwidth")
    if isinstance(big, dict) and isinstance(big.get("bytes"), (int, float)):
        name = f"gpu_bench_{big['bytes'] / 2**30:g}GiB_x{big.get('tensors', '?')}"
        cases.append((name, big, int(big["bytes"]) // 4))
    out = []
    for case, entry, elements in cases:
        for scenario, mode in (("clip", "active"), ("noclip", "inactive")):
            res = entry.get(scenario)
            if not isinstance(res, dict):
                continue
            first = True
            for impl, key in GPU_BENCH_IMPLS.items():
                t = res.get(impl)
                if not isinstance(t, dict) or not isinstance(t.get("median_us"), (int, float)):
                    continue
                rec = {"device": device, "case": case, "dtype": "fp32", "mode": mode, "impl": key,
                       "median_us": t["median_us"], "n_tensors": entry.get("tensors"), "n_elements": elements}
                if first and bytes_per_s and isinstance(elements, (int, float)):
                    rec["bound_s"] = elements * 4 * (3 if mode == "active" else 1) / bytes_per_s
                    first = False
                out.append({k: v for k, v in rec.items() if v is not None})
    return out


def machine_of(data) -> dict:
    """The ``machine`` object of a JSON, or what gpu_bench.py's ``env`` says."""
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get("machine"), dict):
        return data["machine"]
    env = data.get("env")
    if isinstance(env, dict):
        return {"gpu_name": env.get("device"), "torch_version": env.get("torch"), "cuda": env.get("cuda"),
                "dry_run": env.get("dry_run")}
    return {}


def raw_records(data) -> list:
    if is_gpu_bench(data):
        return _gpu_bench_records(data)
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("records", "results", "rows", "data"):
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
    return []


def normalize_records(data, default_device: str = "cpu") -> list[dict]:
    """Records of a segclip bench JSON, or of a lenient foreign one (see the module docstring)."""
    out = []
    extra_bounds = []
    for rec in raw_records(data):
        device = str(rec.get("device") or default_device).split(":")[0]
        case = _first(rec, "case", "model", "name")
        if case is None:
            continue
        r = {
            "device": device, "case": str(case),
            "dtype": _norm_dtype(_first(rec, "dtype", "grad_dtype")) or "fp32",
            "mode": _norm_mode(_first(rec, "mode", "clipping", "clip_active")) or "active",
            "impl": _norm_impl(_first(rec, "impl", "implementation", "backend", "variant", "description"),
                               device),
            "available": rec.get("available", True), "reason": rec.get("reason"),
            "median_s": _seconds(rec, "median"),
        }
        for k in ("iqr_s", "min_s", "n_samples", "n_tensors", "n_elements", "bytes_moved", "norm_rel_err",
                  "impl_label", "timed", "noisy", "others_cpu", "rounds_discarded"):
            if k in rec:
                r[k] = rec[k]
        for k in ("speedup_vs_foreach", "fraction_of_bound"):
            if isinstance(rec.get(k), (int, float)):
                r["given_" + k] = rec[k]
        if r["impl"] is None:
            continue
        bound = _seconds(rec, "bound")
        if bound is not None:
            extra_bounds.append({**r, "impl": "bound", "median_s": bound, "available": True,
                                 "reason": None, "timed": False})
        out.append(r)
    have = {(r["device"], r["case"], r["dtype"], r["mode"]) for r in out if r["impl"] == "bound"}
    for b in extra_bounds:
        key = (b["device"], b["case"], b["dtype"], b["mode"])
        if key not in have:
            have.add(key)
            out.append(b)
    add_ratios(out)
    for r in out:  # a figure given in a foreign file fills one we could not compute
        for k in ("speedup_vs_foreach", "fraction_of_bound"):
            if r.get(k) is None and r.get("given_" + k) is not None:
                r[k] = r["given_" + k]
    return out


def index(records: list[dict]) -> dict[tuple, dict]:
    return {(r["device"], r["case"], r["dtype"], r["mode"], r["impl"]): r for r in records}


# ----------------------------------------------------------------------------------------------
# Formatting


def fmt_time(s: float | None) -> str:
    if s is None:
        return NOT_MEASURED
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def impl_label(key: str, device: str) -> str:
    if key == "bound":
        return "flat bound" if device == "cpu" else "bandwidth bound"
    return IMPL_LABELS.get(key, key)


def _impls_for(records: list[dict], device: str) -> list[str]:
    """The usual columns for ``device`` in IMPL_ORDER, then any other implementation the records hold."""
    ordered = ["torch_foreach", "torch_loop", "segclip_torch", f"segclip_{device}", "bound"]
    present = {r["impl"] for r in records if r["device"] == device}
    return ordered + sorted(present - set(ordered))


def _unavailable_note(r: dict | None) -> str | None:
    if r is not None and not r.get("available", True):
        return f"not available: {r.get('reason') or 'unknown reason'}"
    return None


def _noise_note(group: list[dict]) -> str | None:
    """A warning for a (case, dtype, mode) whose kept rounds ran while other processes were busy."""
    noisy = [r for r in group if r.get("noisy")]
    if not noisy:
        return None
    return (f"NOISY: other processes kept {max(r.get('others_cpu') or 0 for r in noisy):.2f} cores busy "
            f"during a kept round ({max(r.get('rounds_discarded') or 0 for r in group)} round(s) discarded)")


def noise_summary(records: list[dict]) -> str:
    groups = {}
    for r in records:
        groups.setdefault((r["device"], r["case"], r["dtype"], r["mode"]), []).append(r)
    noisy = [k for k, g in groups.items() if any(r.get("noisy") for r in g)]
    discarded = sum(max(r.get("rounds_discarded") or 0 for r in g) for g in groups.values())
    text = f"{discarded} round(s) discarded and timed again because other processes used the CPUs"
    if noisy:
        text += (f"; {len(noisy)} of {len(groups)} groups still noisy after the retries: "
                 + ", ".join(f"{d}/{c}/{t}/{m}" for d, c, t, m in noisy))
    else:
        text += f"; no group of {len(groups)} kept a disturbed round"
    return text


def format_rows(result: dict) -> str:
    """One row per implementation: time, speedup over torch foreach, fraction of the bound."""
    records = normalize_records(result)
    lines = []
    for device in dict.fromkeys(r["device"] for r in records):
        for mode in [m for m in MODES if any(r["mode"] == m for r in records)]:
            lines.append("")
            lines.append(f"== {device}: {MODE_TITLES.get(mode, mode)} ==")
            header = f"{'case':<30} {'dtype':<5} {'implementation':<16} {'median':>10} {'vs foreach':>11} {'of bound':>9}"
            lines.append(header)
            lines.append("-" * len(header))
            groups = dict.fromkeys((r["case"], r["dtype"]) for r in records
                                   if r["device"] == device and r["mode"] == mode)
            for case, dtype in groups:
                group = [r for r in records
                         if (r["device"], r["case"], r["dtype"], r["mode"]) == (device, case, dtype, mode)]
                for r in group:
                    label = impl_label(r["impl"], device)
                    note = _unavailable_note(r)
                    if note:
                        lines.append(f"{case:<30} {dtype:<5} {label:<16} {note}")
                        continue
                    t = fmt_time(r["median_s"])
                    if r["impl"] == "bound" and not r.get("timed", True):
                        t += "*"
                    lines.append(f"{case:<30} {dtype:<5} {label:<16} {t:>10} "
                                 f"{fmt_ratio(r.get('speedup_vs_foreach')):>11} {fmt_pct(r.get('fraction_of_bound')):>9}")
                note = _noise_note(group)
                if note:
                    lines.append(f"{'':<30} {'':<5} {note}")
                lines.append("")
    if any(r["impl"] == "bound" and not r.get("timed", True) for r in records):
        lines.append("* computed from the measured copy bandwidth, not timed")
    lines.append("vs foreach: torch foreach time / this time (>1 = faster). "
                 "of bound: bound time / this time (100% = at the bound).")
    if any("noisy" in r for r in records):
        lines.append("contention: " + noise_summary(records))
    return "\n".join(lines)


def evaluate_targets(records: list[dict]) -> list[dict]:
    idx = index(records)
    out = []
    for t in TARGETS:
        r = idx.get((t["device"], t["case"], t["dtype"], t["mode"], t["impl"]))
        measured = r.get(t["metric"]) if r else None
        if measured is None:
            note = _unavailable_note(r)
            status = NOT_MEASURED + (f" ({note})" if note else "")
            met = None
        else:
            met = measured <= t["value"] if t["op"] == "<=" else measured >= t["value"]
            status = "met" if met else "not met"
        out.append({**t, "measured": measured, "met": met, "status": status})
    return out


def _target_row(t: dict) -> tuple[str, str, str, str, str]:
    what = "time / flat bound" if t["metric"] == "time_over_bound" else "speedup vs torch foreach"
    measured = NOT_MEASURED if t["measured"] is None else f"{t['measured']:.2f}x"
    return (t["case"], t["mode"], f"{what} {t['op']} {t['value']}x", measured, t["status"])


def format_targets(result: dict) -> str:
    targets = evaluate_targets(normalize_records(result))
    lines = ["", "== headline targets (cpu, fp32, segclip cpu; reported, not asserted) =="]
    header = f"{'case':<30} {'mode':<9} {'target':<34} {'measured':>12}  status"
    lines += [header, "-" * len(header)]
    for t in targets:
        case, mode, target, measured, status = _target_row(t)
        lines.append(f"{case:<30} {mode:<9} {target:<34} {measured:>12}  {status}")
    met = sum(1 for t in targets if t["met"])
    measured = sum(1 for t in targets if t["met"] is not None)
    lines.append(f"{met} of {measured} measured targets met ({len(targets) - measured} not measured)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(r: dict | None) -> str:
    note = _unavailable_note(r)
    if note:
        return note
    if r is None or r.get("median_s") is None:
        return NOT_MEASURED
    parts = [fmt_time(r["median_s"])]
    extra = []
    if r["impl"] != BASELINE and r.get("speedup_vs_foreach") is not None:
        extra.append(fmt_ratio(r["speedup_vs_foreach"]))
    if r["impl"] != "bound" and r.get("fraction_of_bound") is not None:
        extra.append(fmt_pct(r["fraction_of_bound"]) + " of bound")
    if extra:
        parts.append("(" + ", ".join(extra) + ")")
    return " ".join(parts)


def markdown_tables(records: list[dict], device: str, cases=None, dtypes=None, modes=None,
                    impls=None, heading: str = "###", titles: dict | None = None) -> str:
    """One table per (mode, dtype): a row per case, a column per implementation."""
    recs = [r for r in records if r["device"] == device]
    idx = index(recs)
    cases = list(cases) if cases is not None else list(dict.fromkeys(r["case"] for r in recs))
    dtypes = list(dtypes) if dtypes is not None else list(dict.fromkeys(r["dtype"] for r in recs))
    modes = list(modes) if modes is not None else [m for m in MODES if any(r["mode"] == m for r in recs)]
    impls = list(impls) if impls is not None else _impls_for(records, device)
    out = []
    for mode in modes:
        for dtype in dtypes:
            out.append(f"{heading} {device}, {dtype}, {(titles or MODE_TITLES).get(mode, mode)}\n")
            header = ["case", "tensors", "elements"] + [impl_label(k, device) for k in impls]
            rows = []
            for case in cases:
                any_rec = next((idx[k] for k in idx if k[1] == case), None)
                n_t = str(any_rec["n_tensors"]) if any_rec and "n_tensors" in any_rec else "-"
                n_e = f"{any_rec['n_elements']:,}" if any_rec and "n_elements" in any_rec else "-"
                noisy = any(r.get("noisy") for k, r in idx.items() if k[1:4] == (case, dtype, mode))
                rows.append([case + (" (noisy)" if noisy else ""), n_t, n_e]
                            + [_cell(idx.get((device, case, dtype, mode, k))) for k in impls])
            out.append(_md_table(header, rows) + "\n")
    return "\n".join(out)


def _machine_lines(result: dict) -> list[str]:
    m = machine_of(result)
    if not m:
        return ["- machine: not recorded"]
    gpu = m.get("gpu_name") or m.get("gpu")
    if isinstance(gpu, dict):
        gpu = gpu.get("name")
    backends = m.get("segclip_backends")
    if isinstance(backends, dict):
        backends = ", ".join(
            f"{k}: available" if (v or {}).get("available") else f"{k}: unavailable ({(v or {}).get('reason')})"
            for k, v in backends.items())
    cpu = None
    if m.get("cpu_model"):
        cpu = f"{m['cpu_model']}, {m.get('cpu_cores', '?')} cores, {m.get('torch_threads', '?')} torch threads"
    machine = "; ".join(x for x in (cpu, f"GPU: {gpu or 'none'}") if x)
    software = f"torch {m.get('torch_version') or 'not recorded'}"
    if m.get("cuda"):
        software += f", CUDA {m['cuda']}"
    if backends:
        software += f"; segclip backends: {backends}"
    lines = [
        f"- date: {m.get('date') or 'not recorded'}",
        f"- machine: {machine}",
        f"- {software}",
        f"- command: `{m['command']}`" if m.get("command") else "- command: not recorded",
    ]
    if m.get("load_average_start") is not None:
        lines.append(f"- load average (1, 5, 15 min) at start {m.get('load_average_start')}, "
                     f"at end {m.get('load_average_end')}")
    s = result.get("settings") if isinstance(result, dict) else None
    if isinstance(s, dict) and s:
        lines.append(f"- timing: min_run_time {s.get('min_run_time_s')} s x {s.get('rounds')} rounds per "
                     f"implementation; {s.get('timing', '')}")
    recs = raw_records(result)
    if any("noisy" in r for r in recs):
        lines.append(f"- contention: {noise_summary(normalize_records(result))}. A row marked (noisy) "
                     "was timed while other processes used the CPUs")
    return lines


def _targets_markdown(records: list[dict]) -> str:
    rows = [list(_target_row(t)) for t in evaluate_targets(records)]
    return _md_table(["case", "mode", "target", "measured", "status"], rows)


TIMING_NOTE = (
    "Clipping active: `max_norm=0`, so the clip coefficient is 0 on every call and every call does "
    "the full pass (read for the norm, read + write to scale). Nothing to clip: `max_norm=1e30` on "
    "random data (coefficient 1: segclip skips the write, torch multiplies by 1). Cells: median time "
    "(speedup over torch foreach, fraction of the bound reached). Flat bound (CPU): "
    "`torch.linalg.vector_norm` (+ coefficient and `mul_` when clipping) of one contiguous tensor "
    "with the same element count and dtype. Bandwidth bound (CUDA): bytes that must move / measured "
    "device-to-device copy bandwidth.")


def summary_markdown(result: dict) -> str:
    records = normalize_records(result)
    parts = ["# segclip bench summary\n", *_machine_lines(result), "", TIMING_NOTE, "",
             "## Headline targets (cpu, fp32, segclip cpu; reported, not asserted)\n",
             _targets_markdown(records), ""]
    for device in dict.fromkeys(r["device"] for r in records):
        parts.append(f"## {device}\n")
        parts.append(markdown_tables(records, device))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Plot


def plot_speedups(result: dict, path) -> Path | None:
    """Bar chart of the speedup over torch foreach per case; a row per (device, mode), a column per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in normalize_records(result) if r.get("speedup_vs_foreach") is not None]
    if not records:
        return None
    panels = list(dict.fromkeys((r["device"], r["mode"]) for r in records))
    panels.sort(key=lambda p: (p[0], list(MODES).index(p[1]) if p[1] in MODES else 9))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    fig, axes = plt.subplots(len(panels), len(dtypes), squeeze=False,
                             figsize=(max(6, 1.6 + 1.3 * len({r['case'] for r in records})) * len(dtypes),
                                      3.6 * len(panels)))
    for i, (device, mode) in enumerate(panels):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            recs = [r for r in records if (r["device"], r["mode"], r["dtype"]) == (device, mode, dtype)]
            cases = list(dict.fromkeys(r["case"] for r in recs))
            impls = [k for k in _impls_for(recs, device) if k != BASELINE and any(r["impl"] == k for r in recs)]
            width = 0.8 / max(1, len(impls))
            for k, impl in enumerate(impls):
                ys = [next((r["speedup_vs_foreach"] for r in recs if r["case"] == c and r["impl"] == impl), 0.0)
                      for c in cases]
                xs = [x + (k - (len(impls) - 1) / 2) * width for x in range(len(cases))]
                ax.bar(xs, ys, width, label=impl_label(impl, device),
                       hatch="//" if impl == "bound" else None, alpha=0.6 if impl == "bound" else 1.0)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([SHORT_CASE.get(c, c) for c in cases], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("speedup over torch foreach")
            title = "clipping active" if mode == "active" else "nothing to clip" if mode == "inactive" else mode
            ax.set_title(f"{device}, {dtype}, {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    m = result.get("machine") or {}
    fig.suptitle(f"segclip bench: {m.get('cpu_model', '')} ({m.get('torch_threads', '?')} threads), "
                 f"{m.get('date', '')}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# --compare


def format_compare(old: dict, new: dict, threshold: float = 0.10, names=("old", "new")) -> str:
    """How each figure moved: new/old median time (> 1 + threshold flagged), and the speedups."""
    o, n = index(normalize_records(old)), index(normalize_records(new))
    om, nm = machine_of(old), machine_of(new)  # {} for a list of records or a "machine" that is no object
    lines = [f"== compare: {names[1]} against {names[0]} ==",
             f"old: {om.get('date', '?')}  {om.get('command', '')}",
             f"new: {nm.get('date', '?')}  {nm.get('command', '')}"]
    for k in ("cpu_model", "torch_threads", "gpu_name", "torch_version"):
        if om.get(k) != nm.get(k):
            lines.append(f"note: {k} differs: {om.get(k)!r} -> {nm.get(k)!r}; times are not comparable as such")
    header = (f"{'device':<6} {'case':<30} {'dtype':<5} {'mode':<9} {'implementation':<16} "
              f"{'old':>10} {'new':>10} {'new/old':>8} {'speedup old->new':>17}  flag")
    lines += [header, "-" * len(header)]
    regressions = improvements = 0
    for key in list(n) + [k for k in o if k not in n]:
        device, case, dtype, mode, impl = key
        a, b = o.get(key), n.get(key)
        ta, tb = (a or {}).get("median_s"), (b or {}).get("median_s")
        ratio = tb / ta if (ta and tb) else None
        flag = ""
        if ratio is None:
            flag = "only in old" if b is None else "only in new" if a is None else NOT_MEASURED
        elif ratio > 1 + threshold:
            flag = f"REGRESSION (+{100 * (ratio - 1):.0f}%)"
            regressions += 1
        elif ratio < 1 / (1 + threshold):
            flag = f"faster ({100 * (ratio - 1):.0f}%)"
            improvements += 1
        sa, sb = (a or {}).get("speedup_vs_foreach"), (b or {}).get("speedup_vs_foreach")
        speed = f"{fmt_ratio(sa)}->{fmt_ratio(sb)}" if impl != BASELINE else ""
        lines.append(f"{device:<6} {case:<30} {dtype:<5} {mode:<9} {impl_label(impl, device):<16} "
                     f"{fmt_time(ta) if a else '-':>10} {fmt_time(tb) if b else '-':>10} "
                     f"{fmt_ratio(ratio, 3) if ratio else '-':>8} {speed:>17}  {flag}")
    lines.append(f"{regressions} figure(s) more than {100 * threshold:.0f}% slower, {improvements} "
                 f"more than {100 * threshold:.0f}% faster. A run-wide drift of every implementation "
                 "alike is machine load; a change in one column is the code.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The results page (benchmarks/RESULTS.md)

TRAIN_VARIANTS = ("fused", "torch", "none")


def _train_records(data) -> list[dict]:
    """Lenient bench_train records: model, clip variant (fused/torch/none), images/s, clip share."""
    recs = raw_records(data)
    if not recs and isinstance(data, dict) and isinstance(data.get("models"), dict):
        for model, variants in data["models"].items():  # {"models": {model: {variant: {...}}}}
            if isinstance(variants, dict):
                for variant, v in variants.items():
                    if isinstance(v, dict):
                        recs.append({"model": model, "clip": variant, **v})
                    elif isinstance(v, (int, float)):
                        recs.append({"model": model, "clip": variant, "images_per_s": v})
    out = []
    for r in recs:
        model = _first(r, "model", "case", "name")
        variant = _first(r, "clip", "variant", "impl", "implementation", "backend", "mode")
        if model is None or variant is None:
            continue
        v = str(variant).lower()
        v = ("fused" if v in ("fused", "segclip", "fused_clip", "segclip_cpu", "segclip_cuda", "cpu", "cuda")
             else "torch" if v in ("torch", "torch_foreach", "clip_grad_norm_", "foreach")
             else "none" if v in ("none", "off", "no_clip", "noclip", "false") else v)
        ips = _first(r, "images_per_s", "images_per_sec", "img_per_s", "imgs_per_s", "throughput")
        share = _first(r, "clip_share", "clip_fraction", "clip_share_of_step")
        if share is None and _first(r, "clip_share_pct", "clip_percent") is not None:
            share = float(_first(r, "clip_share_pct", "clip_percent")) / 100
        out.append({"model": str(model), "variant": v,
                    "images_per_s": float(ips) if isinstance(ips, (int, float)) else None,
                    "clip_share": float(share) if isinstance(share, (int, float)) else None,
                    "device": r.get("device"), "dtype": _norm_dtype(r.get("dtype"))})
    return out


def train_markdown(data, source: str) -> str:
    recs = _train_records(data)
    m = data.get("machine") if isinstance(data, dict) else None
    parts = [f"Source: `{source}`"]
    if isinstance(m, dict):
        parts.append(f"; date {m.get('date', 'not recorded')}; machine {m.get('cpu_model', '?')}"
                     f", GPU {m.get('gpu_name') or 'none'}; command `{m.get('command', '?')}`")
    elif isinstance(data, dict) and "device" in data:  # benchmarks/bench_train.py's own layout
        parts.append(f"; date {data.get('date', 'not recorded')}; {data['device']} ({data.get('device_name', '?')}), "
                     f"{data.get('threads', '?')} threads, torch {data.get('torch', '?')}; batch "
                     f"{data.get('batch_size', '?')} x {data.get('size', '?')} px, {data.get('steps', '?')} timed steps, "
                     f"max_norm {data.get('max_norm', '?')}, AMP {'on' if data.get('amp') else 'off'}")
        if data.get("command"):
            parts.append(f"; command `{data['command']}`")
    parts.append("\n")
    if not recs:
        return "".join(parts) + "\nThe file holds no readable records: every figure is not measured.\n"
    models = list(dict.fromkeys(r["model"] for r in recs))
    idx = {(r["model"], r["variant"]): r for r in recs}
    header = ["model", "images/s clip fused", "images/s clip torch", "images/s no clip",
              "fused vs torch", "clip share (fused)", "clip share (torch)"]
    rows = []
    for model in models:
        f, t, nn = (idx.get((model, v)) or {} for v in TRAIN_VARIANTS)

        def ips(r):
            return f"{r['images_per_s']:.3g}" if r.get("images_per_s") is not None else NOT_MEASURED

        def share(r):
            return f"{100 * r['clip_share']:.1f}%" if r.get("clip_share") is not None else NOT_MEASURED

        ratio = (f"{f['images_per_s'] / t['images_per_s']:.2f}x"
                 if f.get("images_per_s") and t.get("images_per_s") else NOT_MEASURED)
        rows.append([model, ips(f), ips(t), ips(nn), ratio, share(f), share(t)])
    return "".join(parts) + "\n" + _md_table(header, rows) + "\n"


def results_page(cpu: dict | None, cpu_path: str | None, gpu: dict | None = None, gpu_path: str | None = None,
                 train: dict | None = None, train_path: str | None = None, command: str = "") -> str:
    """benchmarks/RESULTS.md from the JSON files; every missing figure reads "not measured"."""
    cpu_impls = ["torch_foreach", "torch_loop", "segclip_torch", "segclip_cpu", "bound"]
    gpu_impls = ["torch_foreach", "torch_loop", "segclip_torch", "segclip_cuda", "bound"]
    parts = [
        "# segclip benchmark results\n",
        "<!-- Generated by benchmarks/make_results.py from the JSON files named below. Do not edit by "
        "hand: rerun the script. -->\n",
        f"Generated by `{command or 'python benchmarks/make_results.py'}`. Every figure below is read from the JSON file named "
        "above its table; a figure missing there reads \"not measured\". Performance targets are "
        "reported here, never asserted in tests. How to run and what each column means: "
        "[docs/benchmarks.md](../docs/benchmarks.md).\n",
        "Each section comes from ONE run. On a small shared machine single figures move between runs, "
        "sometimes a lot, even when no other process is seen using the CPUs (see \"Noise\" in "
        "docs/benchmarks.md): read the ratios between implementations within a table, and check a "
        "surprising one with `segclip bench --compare`.\n",
        TIMING_NOTE + "\n",
        "## CPU: gradient clipping (`segclip bench`)\n",
    ]
    cpu_records = normalize_records(cpu, "cpu") if cpu is not None else []
    cpu_only = [r for r in cpu_records if r["device"] == "cpu"]
    if cpu is not None:
        parts += [f"Source: `{cpu_path}`\n", *_machine_lines(cpu), ""]
        if not cpu_only:
            parts.append(f"`{cpu_path}` holds no readable CPU records: every CPU figure is not measured.\n")
    else:
        parts.append("No CPU benchmark JSON was given: every CPU figure is not measured.\n")
    parts += ["### Headline targets (cpu, fp32, segclip cpu; reported, not asserted)\n",
              _targets_markdown(cpu_only), ""]
    parts.append(markdown_tables(cpu_only, "cpu", cases=ALL_CASES, dtypes=list(DTYPES), modes=list(MODES),
                                 impls=cpu_impls))
    parts.append("## GPU: gradient clipping (CUDA)\n")
    gpu_all = normalize_records(gpu, "cuda") if gpu is not None else []
    gpu_records = [r for r in gpu_all if r["device"] == "cuda"]
    gpu_source, gpu_meta = (gpu_path, gpu) if gpu_records else (None, None)
    if not gpu_records:  # a segclip bench JSON from a GPU machine holds cuda records too
        gpu_records = [r for r in cpu_records if r["device"] == "cuda"]
        if gpu_records:
            gpu_source, gpu_meta = cpu_path, cpu
    if gpu_records:
        parts.append(f"Source: `{gpu_source}`\n")
        if isinstance(gpu_meta, dict):
            parts += [*_machine_lines(gpu_meta), ""]
        if is_gpu_bench(gpu_meta):
            parts.append(f"Note: {GPU_BENCH_NOTE}.\n")
    elif gpu is not None and any(r["device"] == "cpu-dry-run" for r in gpu_all):
        parts.append(f"`{gpu_path}` is a dry run on the CPU, not a GPU measurement: every GPU figure "
                     "is not measured.\n")
    elif gpu is not None:
        parts.append(f"`{gpu_path}` holds no readable CUDA records: every GPU figure is not measured.\n")
    else:
        parts.append("No GPU run's JSON was given (`--gpu-json`): every GPU figure is not measured.\n")
    if not gpu_records:  # one table says it for every dtype and mode
        header = ["case"] + [impl_label(k, "cuda") for k in gpu_impls]
        rows = [[case] + [NOT_MEASURED] * len(gpu_impls) for case in ALL_CASES]
        parts.append(f"### cuda, {'/'.join(DTYPES)}, clipping active and nothing to clip\n")
        parts.append(_md_table(header, rows) + "\n")
    else:
        extra_cases = [c for c in dict.fromkeys(r["case"] for r in gpu_records) if c not in ALL_CASES]
        extra_impls = sorted({r["impl"] for r in gpu_records} - set(gpu_impls))
        gpu_dtypes = list(DTYPES) + sorted({r["dtype"] for r in gpu_records} - set(DTYPES))
        parts.append(markdown_tables(gpu_records, "cuda", cases=list(ALL_CASES) + extra_cases, dtypes=gpu_dtypes,
                                     modes=list(MODES), impls=gpu_impls[:-1] + extra_impls + gpu_impls[-1:],
                                     titles=SHORT_MODE_TITLES if is_gpu_bench(gpu_meta) else None))
    parts.append("## Training throughput (`benchmarks/bench_train.py`)\n")
    if train is not None:
        parts.append(train_markdown(train, train_path))
    else:
        parts.append("No bench_train JSON was given (`--train-json`): images/s and the clip share of "
                     "the step are not measured.\n")
    return "\n".join(parts).rstrip() + "\n"


def results_main(argv: list[str] | None = None, repo_root: str | Path | None = None) -> int:
    """``benchmarks/make_results.py``. ``repo_root`` (the folder above benchmarks/; default the one
    above this package) is where the page goes and where the newest CPU JSON is looked for, whatever
    the current folder."""
    import argparse
    import sys

    repo = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parents[1]
    default_out = repo / "benchmarks" / "RESULTS.md"
    p = argparse.ArgumentParser(
        prog="make_results.py",
        description="Writes benchmarks/RESULTS.md from benchmark JSON files (never by hand).")
    p.add_argument("--cpu-json", help="a `segclip bench` JSON [default: the newest ROOT/benchmarks/results/cpu-*.json]")
    p.add_argument("--gpu-json", help="a GPU run's JSON (benchmarks/gpu_bench.py or `segclip bench --device cuda`)")
    p.add_argument("--train-json", help="a benchmarks/bench_train.py JSON")
    p.add_argument("--out", default=None, help=f"the page to write [default: {default_out}]")
    p.add_argument("--root", default=None,
                   help=f"paths in the page are shown relative to this folder, and the newest CPU JSON is "
                        f"looked for under it [default: {repo}]")
    args = p.parse_args(argv)
    root = Path(args.root).resolve() if args.root is not None else repo.resolve()
    out = Path(args.out) if args.out is not None else default_out

    def fail(message: str) -> int:
        print(f"make_results.py: error: {message}", file=sys.stderr)
        return 2

    def shown(path):
        try:
            return str(Path(path).resolve().relative_to(root))
        except ValueError:
            return str(path)

    cpu_path = args.cpu_json
    if cpu_path is None:
        found = sorted((root / "benchmarks" / "results").glob("cpu-*.json"))
        if not found:
            return fail(f"no --cpu-json given and no {root / 'benchmarks' / 'results' / 'cpu-*.json'} found; "
                        "pass --cpu-json FILE (or --root the repository)")
        cpu_path = str(found[-1])
    try:
        cpu = load_json(cpu_path)
        gpu = load_json(args.gpu_json) if args.gpu_json else None
        train = load_json(args.train_json) if args.train_json else None
    except BadJSON as exc:
        return fail(str(exc))
    cmd = ["python benchmarks/make_results.py"]
    for flag, v in (("--cpu-json", cpu_path), ("--gpu-json", args.gpu_json), ("--train-json", args.train_json)):
        if v:
            cmd.append(f"{flag} {shown(v)}")
    page = results_page(cpu, shown(cpu_path), gpu,
                        shown(args.gpu_json) if args.gpu_json else None, train,
                        shown(args.train_json) if args.train_json else None, command=" ".join(cmd))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page)
    except OSError as exc:
        return fail(f"--out {out}: cannot write it ({exc.strerror or exc})")
    print(f"wrote {out}", file=sys.stderr)
    return 0


__all__ = ["BadJSON", "load_json", "load_records_json", "normalize_records", "format_rows", "format_targets", "summary_markdown",
           "plot_speedups", "format_compare", "results_page", "results_main", "evaluate_targets",
           "QUICK_CASES"]
