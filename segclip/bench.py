"""``segclip bench``: times gradient clipping on the gradient shapes of torchvision's segmentation
models and two synthetic extremes, every implementation side by side in one run.

Implementations (columns):
    torch foreach      ``torch.nn.utils.clip_grad_norm_(..., foreach=True)``: the baseline of every speedup
    torch loop         ``torch.nn.utils.clip_grad_norm_(..., foreach=False)``
    segclip torch      ``segclip.fused_clip_(..., backend="torch")`` (the pure-PyTorch backend)
    segclip cpu/cuda   ``segclip.fused_clip_(..., backend=<device>)`` (the compiled kernel), or
                       "not available: <reason>" when it is not built or cannot run here
    bound              CPU: the flat bound, ``torch.linalg.vector_norm`` (+ the clip coefficient and
                       ``mul_`` when clipping) of ONE contiguous tensor with the same element count
                       and dtype, timed like the others. CUDA: the bytes that must move (one read for
                       the norm, plus one read and one write when clipping) over the device-to-device
                       copy bandwidth measured in the same run; computed, not timed.

Timing scheme (the same for every implementation, the bound included):
    * clipping active: ``max_norm=0.0``. The clip coefficient ``max_norm / (norm + 1e-6)`` is 0 on
      every call, so every call does the full pass: read everything for the norm, then read and
      write everything to scale. (A small positive max_norm would stop clipping after the first
      call, because clipping in place lowers the norm to max_norm.) After the first call the
      gradients hold zeros; the kernels' cost does not depend on the values (no early exits, no
      denormals), so every implementation times the same work on the same data.
    * nothing to clip: ``max_norm=1e30`` on random normal data: the norm is read, the coefficient
      is 1. segclip then writes nothing; torch multiplies by 1 (its documented behaviour).
    * ``torch.utils.benchmark.Timer.blocked_autorange`` with ``num_threads`` = torch's thread count
      (Timer's default would be 1 thread), medians over all blocks of ``--rounds`` rounds; in each
      round every implementation is timed once, the order reversed every other round, so
      background load hits all of them alike. On CUDA each call ends with
      ``torch.cuda.synchronize()``, so the figure is what a training loop waits for.
    * Gradient tensors are allocated one by one (like autograd's), filled with ``randn`` (seeded);
      the parameters are zero-stride views that hold no memory.
    * Before timing, every implementation's returned norm is checked against a float64 norm (on
      the "nothing to clip" data, which the call leaves as it is): the relative error goes to the
      JSON (``norm_rel_err``), and a warning is printed when it exceeds NORM_CHECK_RTOL (1%, wide
      enough for torch's bfloat16 norm of bfloat16 gradients, rounded to 3 digits).

Cases:
    * the six torchvision segmentation models built with
      ``get_model(name, weights=None, weights_backbone=None, num_classes=21)`` and aux_loss left at
      its default (None, so no auxiliary classifier: torchvision turns aux_loss on only when
      pretrained weights are requested). Every parameter of these models gets a gradient in a
      training step (tests/test_bench.py checks this by a backward pass); the models are built on the meta device,
      only their shapes are used.
    * ``synthetic_tiny``: 2,000 1-D tensors of 64 to 4,096 elements (log-uniform, seeded): bias/BN-like.
    * ``synthetic_huge``: 8 tensors of 8Mi elements on CPU (256 MiB in fp32), 32Mi on CUDA (1 GiB in fp32).
    * ``synthetic_smoke`` (not in the default set): 16 small tensors, for tests.

Outputs (in ``--out``): ``bench.json`` (machine, settings, every figure), ``summary.md``,
``speedup.png``; on the terminal a ``torch.utils.benchmark.Compare`` table, a table with time,
speedup over torch foreach and fraction of the bound per row, and the headline targets (reported,
never asserted). ``--compare OLD.json`` prints how each figure moved against an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SCHEMA = "segclip-bench/1"

MODEL_CASES = (
    "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
)
SYNTHETIC_CASES = ("synthetic_tiny", "synthetic_huge")
ALL_CASES = MODEL_CASES + SYNTHETIC_CASES
EXTRA_CASES = ("synthetic_smoke",)
QUICK_CASES = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50",
               "synthetic_tiny", "synthetic_huge")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORM_CHECK_RTOL = 1e-2  # the returned norm against float64, checked before timing (see the module docstring)
MODES = {
    "active": 0.0,      # coefficient 0 on every call: full read + read/write pass every call
    "inactive": 1e30,   # coefficient 1 on random data: read pass only (for those who skip the write)
}
MODE_TITLES = {
    "active": "clipping active (max_norm=0: every call scales by 0)",
    "inactive": "nothing to clip (max_norm=1e30 on random data)",
}
IMPL_ORDER = ("torch_foreach", "torch_loop", "segclip_torch", "segclip_cpu", "segclip_cuda", "bound")
IMPL_LABELS = {
    "torch_foreach": "torch foreach",
    "torch_loop": "torch loop",
    "segclip_torch": "segclip torch",
    "segclip_cpu": "segclip cpu",
    "segclip_cuda": "segclip cuda",
    "segclip_ops": "segclip ops",  # gpu_bench.py's direct op calls
    "bound": "bound",
}
BASELINE = "torch_foreach"

PRESETS = {
    # quick: the cases and dtype the headline targets need, short timings (< 1 min on 2 cores)
    "quick": {"models": QUICK_CASES, "dtypes": ("fp32",), "min_run_time": 0.1, "rounds": 1, "retries": 1,
              "quiet_timeout": 5.0, "retry_budget": 20.0},
    "full": {"models": ALL_CASES, "dtypes": tuple(DTYPES), "min_run_time": 0.2, "rounds": 3, "retries": 3,
             "quiet_timeout": 60.0, "retry_budget": 900.0},
}
HUGE_ELEMS = {"cpu": 8 * 2**20, "cuda": 32 * 2**20}  # per tensor; x8 tensors
CUDA_BANDWIDTH_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    name: str
    kind: str  # "model" or "synthetic"
    shapes: list[tuple[int, ...]]
    description: str

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "n_tensors": self.n_tensors,
                "n_elements": self.n_elements, "description": self.description}


def model_grad_shapes(name: str) -> list[tuple[int, ...]]:
    """The shapes of a segmentation model's parameter gradients, in ``model.parameters()`` order.

    Built on the meta device (no memory, no initialisation cost); aux_loss left at torchvision's
    default for weights=None (no auxiliary classifier).
    """
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def make_case(name: str, device: str) -> Case:
    if name in MODEL_CASES:
        return Case(name, "model", model_grad_shapes(name),
                    f"torchvision {name}, num_classes=21, aux_loss default (none)")
    if name == "synthetic_tiny":
        rng = random.Random(0)
        shapes = [(int(round(64 * 64 ** rng.random())),) for _ in range(2000)]
        return Case(name, "synthetic", shapes, "2,000 tensors of 64 to 4,096 elements (log-uniform)")
    if name == "synthetic_huge":
        n = HUGE_ELEMS[device]
        shapes = [(n // 2048, 2048)] * 8
        return Case(name, "synthetic", shapes,
                    f"8 tensors of {n // 2**20}Mi elements ({8 * n * 4 // 2**20} MiB in fp32)")
    if name == "synthetic_smoke":
        rng = random.Random(1)
        shapes = [(rng.randint(256, 4096),) for _ in range(16)]
        return Case(name, "synthetic", shapes, "16 tensors of 256 to 4,096 elements (for tests)")
    raise ValueError(f"unknown case {name!r}; choose from {ALL_CASES + EXTRA_CASES}")


def make_grads(case: Case, dtype: torch.dtype, device: str, seed: int) -> tuple[list, list]:
    """Parameters (zero-stride views holding no memory) whose ``.grad`` are separate random tensors."""
    torch.manual_seed(seed)
    params, grads = [], []
    zero = torch.zeros((), dtype=dtype, device=device)
    for shape in case.shapes:
        g = torch.randn(shape, dtype=dtype, device=device)
        p = zero.expand(shape)
        p.grad = g
        params.append(p)
        grads.append(g)
    return params, grads


# ----------------------------------------------------------------------------------------------
# Implementations


@dataclasses.dataclass
class Impl:
    key: str
    label: str
    available: bool
    reason: str | None = None
    timed: bool = True  # False for the computed CUDA bound


def implementations(device: str) -> list[Impl]:
    import segclip

    info = segclip.backends()[device]
    bound_label = "flat bound" if device == "cpu" else "bandwidth bound"
    return [
        Impl("torch_foreach", "torch foreach", True),
        Impl("torch_loop", "torch loop", True),
        Impl("segclip_torch", "segclip torch", True),
        Impl(f"segclip_{device}", f"segclip {device}", info.available, info.reason),
        Impl("bound", bound_label, True, timed=(device == "cpu")),
    ]


def clip_fn(impl: str, params: list, max_norm: float, device: str) -> Callable[[], torch.Tensor]:
    import segclip

    if impl == "torch_foreach":
        def fn():
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    elif impl == "torch_loop":
        def fn():
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    elif impl == "segclip_torch":
        def fn():
            return segclip.fused_clip_(params, max_norm, backend="torch")
    elif impl in ("segclip_cpu", "segclip_cuda"):
        backend = impl.split("_", 1)[1]

        def fn():
            return segclip.fused_clip_(params, max_norm, backend=backend)
    else:
        raise ValueError(impl)
    return fn


def flat_bound_fn(flat: torch.Tensor, max_norm: float, active: bool) -> Callable[[], torch.Tensor]:
    """The flat bound: the same math on one contiguous tensor; the write only when clipping."""
    if active:
        def fn():
            norm = torch.linalg.vector_norm(flat)
            flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
            return norm
    else:
        def fn():
            return torch.linalg.vector_norm(flat)
    return fn


def synced(fn: Callable, device: str) -> Callable:
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def reference_norm(grads: list) -> float:
    """float64 2-norm of all gradients viewed as one vector."""
    total = 0.0
    for g in grads:
        total += float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2
    return math.sqrt(total)


# ----------------------------------------------------------------------------------------------
# Machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line(argv: list[str]) -> str:
    """The command as a user would type it: ``segclip bench ...`` or ``python benchmarks/bench_clip.py ...``."""
    if not argv:
        return "segclip bench"
    prog = argv[0]
    name = os.path.basename(prog)
    if name in ("__main__.py", "segclip", "cli.py"):
        head = "segclip"
    elif name == "bench.py":
        head = "python -m segclip.bench"
    else:
        try:
            rel = os.path.relpath(prog)
            head = "python " + (rel if not rel.startswith("..") else prog)
        except ValueError:
            head = "python " + prog
    return " ".join([head] + argv[1:])


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
        if before is None or after is None:
            return None
        total = after[0] - before[0]
        if total <= 0:
            return None
        busy = total - (after[1] - before[1]) - (after[2] - before[2])
        return max(0.0, busy / total * (os.cpu_count() or 1))

    def wait_quiet(self, threshold: float, timeout: float, window: float = 0.5) -> float | None:
        """Sleeps in ``window`` steps until others use at most ``threshold`` cores (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        load = None
        while True:
            before = self.snapshot()
            time.sleep(window)
            load = self.others(before, self.snapshot())
            if load is None or load <= threshold or time.monotonic() >= deadline:
                return load


def machine_info(threads: int, command: list[str]) -> dict:
    import segclip

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "cuda": torch.version.cuda}
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads,
        "gpu": gpu,
        "gpu_name": gpu["name"] if gpu else None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "segclip_version": getattr(segclip, "__version__", None),
        "segclip_backends": {name: {"available": b.available, "loaded": b.loaded, "reason": b.reason}
                             for name, b in segclip.backends().items()},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(command),
        "load_average_start": load_average(),
    }


# ----------------------------------------------------------------------------------------------
# Running


def _timer(fn: Callable, label: str, sub_label: str, description: str, threads: int):
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=sub_label,
                           description=description, num_threads=threads)


def measure_copy_bandwidth(min_run_time: float, threads: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second), for the CUDA bound."""
    n = CUDA_BANDWIDTH_BYTES
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    fn = synced(lambda: dst.copy_(src), "cuda")
    m = _timer(fn, "cuda copy bandwidth", "copy", "dst.copy_(src)", threads).blocked_autorange(
        min_run_time=max(min_run_time, 0.2))
    return {"bytes_copied": n, "median_s": m.median, "bytes_per_s": 2 * n / m.median}


def bench_group(case: Case, dtype_name: str, device: str, impls: list[Impl], args, progress,
                bandwidth: dict | None, measurements: list, monitor: OtherLoad) -> list[dict]:
    """Times every implementation on one (case, dtype, device), both modes; returns the records."""
    dtype = DTYPES[dtype_name]
    params, grads = make_grads(case, dtype, device, args.seed)
    flat = torch.randn(case.n_elements, dtype=dtype, device=device) if device == "cpu" else None
    elem = torch.empty((), dtype=dtype).element_size()
    sub_label = f"{case.name} [{dtype_name}]"
    load = load_average()  # kept per record: a noisy group shows up in the JSON
    records = []
    ref = reference_norm(grads)
    # Nothing-to-clip first: it needs the random data, which clipping with max_norm=0 zeroes.
    for mode in sorted(args.modes, key=lambda m: m != "inactive"):
        max_norm = MODES[mode]
        active = mode == "active"
        label = f"clip_grad_norm_ on {device}, {MODE_TITLES[mode]}"
        fns: dict[str, Callable] = {}
        norm_err: dict[str, float] = {}
        for impl in impls:
            if not impl.available or not impl.timed:
                continue
            if impl.key == "bound":
                fns[impl.key] = flat_bound_fn(flat, max_norm, active)
            else:
                fn = clip_fn(impl.key, params, max_norm, device)
                if not active:  # random data, coefficient 1: the norm can be checked
                    got = float(fn())
                    norm_err[impl.key] = abs(got - ref) / ref if ref else abs(got)
                    if not norm_err[impl.key] <= NORM_CHECK_RTOL:
                        print(f"warning: {impl.key} returned norm {got:.7g} for {case.name} {dtype_name} on {device}; "
                              f"float64 gives {ref:.7g} (relative error {norm_err[impl.key]:.2g})", flush=True)
                fns[impl.key] = synced(fn, device)
        by_impl: dict[str, list] = {k: [] for k in fns}
        kept_load: list[float] = []
        discarded = 0
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for attempt in range(args.retries + 1):
                started = time.monotonic()
                before = monitor.snapshot()
                round_ms = {}
                for key in order:
                    desc = next(i.label for i in impls if i.key == key)
                    t = _timer(fns[key], label, sub_label, desc, args.threads)
                    round_ms[key] = t.blocked_autorange(min_run_time=args.min_run_time)
                    progress.update(1)
                others = monitor.others(before, monitor.snapshot())
                if (others is None or others <= args.max_other_load or attempt == args.retries
                        or monitor.budget <= 0):
                    break
                # Someone else used the CPUs during this round: time it again once they stop.
                discarded += 1
                progress.total += len(order)
                progress.write(f"{device} {sub_label} {mode} round {r + 1}: other processes used "
                               f"{others:.2f} cores; round discarded, waiting for a quiet moment")
                monitor.wait_quiet(args.max_other_load, min(args.quiet_timeout, monitor.budget))
                monitor.budget -= time.monotonic() - started  # the discarded round and the wait
            for key, m in round_ms.items():
                by_impl[key].append(m)
            if others is not None:
                kept_load.append(others)
        merged = {}
        from torch.utils import benchmark
        for key, ms in by_impl.items():
            (merged[key],) = benchmark.Measurement.merge(ms)
            measurements.append(merged[key])
        n_bytes = case.n_elements * elem * (3 if active else 1)
        for impl in impls:
            rec = {
                "device": device, "case": case.name, "dtype": dtype_name, "mode": mode,
                "max_norm": max_norm, "impl": impl.key, "impl_label": impl.label,
                "available": impl.available, "reason": impl.reason,
                "n_tensors": case.n_tensors, "n_elements": case.n_elements, "bytes_moved": n_bytes,
                "median_s": None, "iqr_s": None, "n_samples": 0, "timed": impl.timed,
                "load_average_1m": load[0] if load else None,
                # cores other processes kept busy during the kept rounds (max over rounds)
                "others_cpu": round(max(kept_load), 3) if kept_load else None,
                "noisy": bool(kept_load) and max(kept_load) > args.max_other_load,
                "rounds_discarded": discarded,
            }
            m = merged.get(impl.key)
            if m is not None:
                rec.update(median_s=m.median, iqr_s=m.iqr, min_s=min(m.times), n_samples=len(m.times))
            elif impl.key == "bound" and device == "cuda" and bandwidth:
                rec.update(median_s=n_bytes / bandwidth["bytes_per_s"])
            if impl.key in norm_err:
                rec["norm_rel_err"] = norm_err[impl.key]
            records.append(rec)
        add_ratios(records)
    del params, grads, flat
    gc.collect()
    return records


def add_ratios(records: list[dict]) -> None:
    """Fills speedup_vs_foreach, fraction_of_bound and time_over_bound for each record's group."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["device"], r["case"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    for group in groups.values():
        base = (group.get(BASELINE) or {}).get("median_s")
        bound = (group.get("bound") or {}).get("median_s")
        for r in group.values():
            t = r.get("median_s")
            r["speedup_vs_foreach"] = base / t if (t and base) else None
            r["fraction_of_bound"] = bound / t if (t and bound) else None
            r["time_over_bound"] = t / bound if (t and bound) else None


def _round(x, digits: int = 4):
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return float(f"{x:.{digits}g}")
    return x


def _derived(key: str, value) -> bool:
    """Keys left out of the JSON: recomputed on load (segclip.bench_report) or at their default."""
    return (key in ("impl_label", "time_over_bound") or (key == "reason" and value is None)
            or (key == "timed" and value is True))


def dumps_result(result: dict) -> str:
    """The JSON text: settings indented, one record per line (small, and diffs read per figure);
    floats in records rounded to 4 significant digits (timing noise is far larger); derived keys
    (labels, time_over_bound) and defaults left out."""
    head = {k: v for k, v in result.items() if k != "records"}
    text = json.dumps(head, indent=1)
    records = ",\n  ".join(json.dumps({k: _round(v) for k, v in r.items() if not _derived(k, v)})
                           for r in result["records"])
    return text[:-2] + ',\n "records": [\n  ' + records + "\n ]\n}\n"


# ----------------------------------------------------------------------------------------------
# Argument checks (shared with segclip demo and benchmarks/bench_train.py)


def usage_error(prog: str, message: str) -> SystemExit:
    """Prints ``PROG: error: MESSAGE`` (one line, no traceback) and returns SystemExit(2) to raise."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (inf allowed, NaN refused)."""
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def finite_non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = non_negative_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def prepare_out_folder(path, prog: str, flag: str = "--out") -> Path:
    """Creates the output folder (before any timing, so that a bad path costs nothing) and checks
    that files can be written there; a one-line error and exit 2 otherwise."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise usage_error(prog, f"{flag} {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise usage_error(prog, f"{flag} {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise usage_error(prog, f"{flag} {out}: cannot write into the folder (permission denied)")
    return out


def _parse_list(values: list[str] | None, flag: str) -> list[str] | None:
    """Names given space or comma separated, in one argument or several; None when not given."""
    if values is None:
        return None
    out = [x for v in values for x in re.split(r"[\s,]+", v) if x]
    if not out:
        raise usage_error("segclip bench", f"{flag}: no name given")
    return list(dict.fromkeys(out))


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    preset = PRESETS["quick" if args.quick else "full"]
    models = _parse_list(args.models, "--models") or list(preset["models"])
    if "all" in models:  # 'all' stands for the default set, other names may be added to it
        i = models.index("all")
        models = list(dict.fromkeys(models[:i] + list(ALL_CASES) + models[i + 1:]))
    for m in models:
        if m not in ALL_CASES + EXTRA_CASES:
            raise usage_error("segclip bench", f"unknown case {m!r}; choose from "
                                               f"{', '.join(ALL_CASES + EXTRA_CASES)} or all")
    dtypes = _parse_list(args.dtypes, "--dtypes") or list(preset["dtypes"])
    for d in dtypes:
        if d not in DTYPES:
            raise usage_error("segclip bench", f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    modes = _parse_list(args.modes, "--modes") or list(MODES)
    for m in modes:
        if m not in MODES:
            raise usage_error("segclip bench", f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
        if args.device == "cuda" and not torch.cuda.is_available():
            raise usage_error("segclip bench", "--device cuda but no CUDA device is visible")
    args.models, args.dtypes, args.modes, args.devices = models, dtypes, modes, devices
    if args.min_run_time is None:
        args.min_run_time = preset["min_run_time"]
    if args.rounds is None:
        args.rounds = preset["rounds"]
    if args.retries is None:
        args.retries = preset["retries"]
    if args.quiet_timeout is None:
        args.quiet_timeout = preset["quiet_timeout"]
    if args.retry_budget is None:
        args.retry_budget = preset["retry_budget"]
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("runs", "bench", stamp + ("-quick" if args.quick else ""))
    return args


def run_bench(args: argparse.Namespace, command: list[str] | None = None) -> dict:
    """Runs the benchmark described by resolved ``args``; returns the JSON-ready result."""
    from tqdm import tqdm

    command = command if command is not None else sys.argv
    started = time.perf_counter()
    result = {
        "schema": SCHEMA,
        "kind": "clip",
        "machine": machine_info(args.threads, command),
        "settings": {
            "quick": bool(args.quick), "models": args.models, "dtypes": args.dtypes,
            "modes": args.modes, "devices": args.devices, "min_run_time_s": args.min_run_time,
            "rounds": args.rounds, "threads": args.threads, "seed": args.seed,
            "max_other_load": args.max_other_load, "retries": args.retries,
            "quiet_timeout_s": args.quiet_timeout, "retry_budget_s": args.retry_budget,
            "max_norm": {m: MODES[m] for m in args.modes},
            "timing": ("torch.utils.benchmark.Timer.blocked_autorange, median over all blocks of all "
                       "rounds; implementations interleaved per round; CUDA calls end with "
                       "torch.cuda.synchronize()"),
            "active_scheme": MODE_TITLES["active"] + "; gradients are zeros after the first call, "
                             "the same data for every implementation",
            "inactive_scheme": MODE_TITLES["inactive"],
            "bound": {"cpu": "flat bound: torch.linalg.vector_norm (+ coefficient and mul_ when "
                             "clipping) of one contiguous tensor, same element count and dtype",
                      "cuda": "bytes moved (norm read; + read and write when clipping) / measured "
                              "device-to-device copy bandwidth"},
            "aux_loss": "torchvision default for weights=None (None: no auxiliary classifier)",
        },
        "cases": {},
        "cuda_bandwidth": None,
        "records": [],
    }
    impls_by_device = {d: implementations(d) for d in args.devices}
    n_timed = sum(sum(1 for i in impls if i.available and i.timed) for impls in impls_by_device.values())
    total = n_timed * len(args.models) * len(args.dtypes) * len(args.modes) * args.rounds
    measurements: list = []
    monitor = OtherLoad(args.retry_budget)
    result["settings"]["contention"] = (
        f"a round during which other processes kept more than {args.max_other_load} cores busy is "
        f"timed again (up to {args.retries} times per round, after waiting up to {args.quiet_timeout} s "
        f"for a quiet moment; at most {args.retry_budget} s of redone rounds and waits per run); "
        "records keep others_cpu, noisy and rounds_discarded"
        if monitor.available else "not monitored (no /proc on this system)")
    with tqdm(total=total, desc="segclip bench", unit="timing", file=sys.stderr,
              disable=args.no_progress, dynamic_ncols=True) as progress:
        for device in args.devices:
            bandwidth = None
            if device == "cuda":
                bandwidth = measure_copy_bandwidth(args.min_run_time, args.threads)
                result["cuda_bandwidth"] = bandwidth
            for name in args.models:
                case = make_case(name, device)
                result["cases"].setdefault(device, {})[name] = case.as_json()
                for dtype_name in args.dtypes:
                    progress.set_postfix_str(f"{device} {name} {dtype_name}")
                    result["records"].extend(bench_group(case, dtype_name, device, impls_by_device[device],
                                                         args, progress, bandwidth, measurements, monitor))
    result["machine"]["load_average_end"] = load_average()
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    result["_measurements"] = measurements  # not serialised
    return result


# ----------------------------------------------------------------------------------------------
# CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="benchmark fused_clip_ against torch.nn.utils.clip_grad_norm_",
        description="Times gradient clipping on the gradient shapes of torchvision's segmentation "
                    "models and two synthetic extremes; every implementation side by side in one run. "
                    "See docs/benchmarks.md.")
    add_arguments(p)
    p.set_defaults(func=main_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"fewer cases ({', '.join(QUICK_CASES)}), fp32 only, min_run_time "
                        f"{PRESETS['quick']['min_run_time']} s, 1 round: under a minute on 2 cores")
    p.add_argument("--models", nargs="+", metavar="CASE", default=None,
                   help=f"cases (space or comma separated; 'all': every case but synthetic_smoke, which may be "
                        f"added): {', '.join(ALL_CASES + EXTRA_CASES)} "
                        "[default: all but synthetic_smoke; with --quick the quick set]")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE", default=None,
                   help="gradient dtypes (space or comma separated): fp32 bf16 fp16 [default: all; with --quick fp32]")
    p.add_argument("--modes", nargs="+", metavar="MODE", default=None,
                   help="active (max_norm=0) and/or inactive (max_norm=1e30), space or comma separated "
                        "[default: both]")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="'all' [default]: cpu, and cuda when a GPU is visible")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder [default: runs/bench/<timestamp>, git-ignored]")
    p.add_argument("--min-run-time", type=finite_non_negative_float, default=None, metavar="S",
                   help=f"blocked_autorange min_run_time per implementation and round "
                        f"[default: {PRESETS['full']['min_run_time']}; --quick {PRESETS['quick']['min_run_time']}]")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help=f"interleaved rounds merged into one median [default: {PRESETS['full']['rounds']}; "
                        f"--quick {PRESETS['quick']['rounds']}]")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads [default: torch.get_num_threads()]")
    p.add_argument("--max-other-load", type=non_negative_float, default=0.15, metavar="CORES",
                   help="a round during which other processes kept more cores than this busy is timed "
                        "again [default: 0.15]")
    p.add_argument("--retries", type=non_negative_int, default=None,
                   help=f"times a disturbed round is timed again before it is kept and marked noisy "
                        f"[default: {PRESETS['full']['retries']}; --quick {PRESETS['quick']['retries']}]")
    p.add_argument("--quiet-timeout", type=non_negative_float, default=None, metavar="S",
                   help=f"longest wait for a quiet moment before a retry [default: "
                        f"{PRESETS['full']['quiet_timeout']:g}; --quick {PRESETS['quick']['quiet_timeout']:g}]")
    p.add_argument("--retry-budget", type=non_negative_float, default=None, metavar="S",
                   help=f"most seconds a run spends on redone rounds and waits; then disturbed rounds are "
                        f"kept and marked noisy [default: {PRESETS['full']['retry_budget']:g}; --quick "
                        f"{PRESETS['quick']['retry_budget']:g}]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random gradients [default: 0]")
    p.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                   help="OLD.json: run, then show how each figure moved against OLD (new/old, > 10%% "
                        "slower flagged; OLD is read and checked before the run). OLD.json NEW.json: "
                        "compare two runs without running")
    p.add_argument("--threshold", type=non_negative_float, default=0.10,
                   help="--compare flags time ratios above 1 + THRESHOLD [default: 0.10]")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_args(args: argparse.Namespace) -> int:
    from . import bench_report as report

    if args.compare is not None and len(args.compare) > 2:
        raise usage_error("segclip bench", "--compare takes OLD.json or OLD.json NEW.json")
    try:  # read and checked before any timing: a wrong file must not cost a run
        compared = [report.load_records_json(p) for p in args.compare or ()]
    except report.BadJSON as exc:
        raise usage_error("segclip bench", f"--compare {exc}") from None
    if len(compared) == 2:
        print(report.format_compare(*compared, args.threshold, names=tuple(args.compare)))
        return 0
    args = resolve_settings(args)
    out = prepare_out_folder(args.out, "segclip bench")
    if args.threads != torch.get_num_threads():
        torch.set_num_threads(args.threads)
    load = load_average()
    if load and os.cpu_count() and load[0] > 0.5 * os.cpu_count():
        print(f"note: load average {load[0]} on {os.cpu_count()} cores: other processes are running, "
              "timings are noisy (all implementations share the noise: they run interleaved)",
              file=sys.stderr)
    result = run_bench(args, getattr(args, "command_argv", None))
    measurements = result.pop("_measurements")
    from torch.utils import benchmark

    if measurements:
        compare = benchmark.Compare(measurements)
        compare.trim_significant_figures()
        compare.print()
    print(report.format_rows(result))
    print(report.format_targets(result))
    json_path = out / "bench.json"
    json_path.write_text(dumps_result(result))
    (out / "summary.md").write_text(report.summary_markdown(result))
    written = [json_path, out / "summary.md"]
    if not args.no_plot:
        png = report.plot_speedups(result, out / "speedup.png")
        if png:
            written.append(png)
    if compared:
        print(report.format_compare(compared[0], result, args.threshold,
                                    names=(args.compare[0], str(json_path))))
    print(f"wrote {', '.join(str(p) for p in written)} ({result['wall_time_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/bench_clip.py`` and ``python -m segclip.bench``: the same as ``segclip bench``."""
    p = argparse.ArgumentParser(prog="bench_clip.py", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.command_argv = [sys.argv[0]] + (list(argv) if argv is not None else sys.argv[1:])
    return main_args(args)


if __name__ == "__main__":
    sys.exit(main())
