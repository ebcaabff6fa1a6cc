"""The ``clip`` suite: ``torch.nn.utils.clip_grad_norm_`` against ``segclip.fused_clip_``.

Implementations (columns):
    torch foreach      ``clip_grad_norm_(..., foreach=True)``: the baseline of every speedup
    torch loop         ``clip_grad_norm_(..., foreach=False)``
    segclip torch      ``segclip.fused_clip_(..., backend="torch")`` (the pure-PyTorch backend)
    segclip cpu/cuda   ``segclip.fused_clip_(..., backend=<device>)``; "not available: <reason>" when
                       not built or unable to run here
    bound              CPU: the flat bound, ``torch.linalg.vector_norm`` (+ the clip coefficient and
                       ``mul_`` when clipping) of ONE contiguous tensor with the same element count
                       and dtype, timed like the others. CUDA: the bytes that must move (one read for
                       the norm, plus one read and one write when clipping) over the device-to-device
                       copy bandwidth measured in the same run; computed, not timed.

Modes:
    active     ``max_norm=0.0``: the coefficient is 0 on every call, so every call does the full
               pass (read for the norm, read + write to scale). A small positive max_norm would stop
               clipping after the first call, since clipping in place lowers the norm to max_norm.
               After the first call the gradients hold zeros; the kernels' cost does not depend on
               the values, so every implementation times the same work on the same data.
    inactive   ``max_norm=1e30`` on random data: coefficient 1; segclip writes nothing, torch
               multiplies by 1. Timed first (active zeroes the data); every implementation's
               returned norm is checked against float64 here (``norm_rel_err``; a warning above 1%).
"""

from __future__ import annotations

import math

import torch

from ..cases import ALL_CASES, DTYPES, EXTRA_CASES, QUICK_CASES, TARGET_MODELS, Case, make_case, make_grads
from . import Group, Suite, Target

MAX_NORM = {"active": 0.0, "inactive": 1e30}
NORM_CHECK_RTOL = 1e-2  # wide enough for torch's bfloat16 norm of bfloat16 gradients (3 digits)


def _targets() -> tuple[Target, ...]:
    cpu = [Target("cpu", c, "active", "segclip_cpu", "time_over_bound", "<=", 1.1) for c in TARGET_MODELS]
    cpu += [Target("cpu", c, "active", "segclip_cpu", "speedup", ">=", v) for c, v in zip(TARGET_MODELS, (1.8, 1.3, 1.05))]
    cpu += [Target("cpu", c, "inactive", "segclip_cpu", "speedup", ">=", 2.5) for c in TARGET_MODELS]
    # benchmarks/gpu_bench.py's targets, for segclip.fused_clip_ on one GPU
    gpu = [Target("cuda", c, "active", "segclip_cuda", "speedup", ">=", v) for c, v in zip(TARGET_MODELS, (3.0, 3.0, 1.2))]
    gpu += [Target("cuda", c, "inactive", "segclip_cuda", "speedup", ">=", 2.5) for c in TARGET_MODELS]
    gpu += [Target("cuda", "synthetic_huge", "active", "segclip_cuda", "of_bound", ">=", 0.9)]
    return tuple(cpu + gpu)


class ClipSuite(Suite):
    name = "clip"
    help = "fused_clip_ against torch.nn.utils.clip_grad_norm_ on segmentation models' gradient shapes"
    cases = ALL_CASES + EXTRA_CASES
    default_cases = ALL_CASES
    quick_cases = QUICK_CASES
    dtypes = tuple(DTYPES)
    modes = tuple(MAX_NORM)
    mode_titles = {"active": "clipping active (max_norm=0: every call scales by 0)",
                   "inactive": "nothing to clip (max_norm=1e30 on random data)"}
    baseline = "torch_foreach"
    bound = "bound"
    targets = _targets()

    def impls(self, device: str) -> dict[str, tuple[str, str | None]]:
        import segclip

        info = segclip.backends()[device]
        return {"torch_foreach": ("torch foreach", None), "torch_loop": ("torch loop", None),
                "segclip_torch": ("segclip torch", None),
                f"segclip_{device}": (f"segclip {device}", None if info.available else info.reason),
                "bound": ("flat bound" if device == "cpu" else "bandwidth bound", None)}

    def make_case(self, name: str, device: str) -> Case:
        return make_case(name, device)

    def count_timings(self, settings) -> int:  # the CUDA bound is computed, not timed
        return super().count_timings(settings) - (
            "cuda" in settings.devices) * len(settings.models) * len(settings.dtypes) * len(settings.modes) * settings.rounds

    def groups(self, settings, device: str, result: dict):
        from ..timers import copy_bandwidth

        import segclip

        bandwidth = None
        if device == "cuda":
            bandwidth = result["extra"]["cuda_bandwidth"] = copy_bandwidth(device, settings.min_run_time, settings.threads)
        impls = [k for k, (_, why) in self.impls(device).items() if why is None]
        for name in settings.models:
            case = make_case(name, device)
            for dtype in settings.dtypes:
                params = make_grads(case, DTYPES[dtype], device, settings.seed)
                grads = [p.grad for p in params]
                ref = math.sqrt(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads))
                flat = torch.randn(case.n_elements, dtype=DTYPES[dtype], device=device) if device == "cpu" else None
                for mode in sorted(settings.modes, key=lambda m: m != "inactive"):  # active zeroes the data
                    max_norm = MAX_NORM[mode]
                    n_bytes = case.n_elements * grads[0].element_size() * (3 if mode == "active" else 1)
                    fns = {k: self.clip_fn(k, params, max_norm, segclip) for k in impls if k != "bound"}
                    if flat is not None:
                        fns["bound"] = flat_bound_fn(flat, max_norm, mode == "active")
                    group = Group(case, dtype, mode, fns, extra={"max_norm": max_norm, "bytes_moved": n_bytes})
                    if bandwidth:
                        group.computed["bound"] = n_bytes / bandwidth["bytes_per_s"]
                    if mode == "inactive":  # random data, coefficient 1: the norm can be checked
                        for k, fn in fns.items():
                            if k != "bound":
                                got = float(fn())
                                err = abs(got - ref) / ref if ref else abs(got)
                                group.impl_extra[k] = {"norm_rel_err": err}
                                if not err <= NORM_CHECK_RTOL:
                                    print(f"warning: {k} returned norm {got:.7g} for {name} {dtype} on {device}; "
                                          f"float64 gives {ref:.7g} (relative error {err:.2g})", flush=True)
                    yield group
                del params, grads, flat

    @staticmethod
    def clip_fn(impl: str, params: list, max_norm: float, segclip):
        if impl in ("torch_foreach", "torch_loop"):
            foreach = impl == "torch_foreach"
            return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
        backend = impl.removeprefix("segclip_")
        return lambda: segclip.fused_clip_(params, max_norm, backend=backend)


def flat_bound_fn(flat: torch.Tensor, max_norm: float, active: bool):
    """The flat bound: the same math on one contiguous tensor; the write only when clipping."""
    if not active:
        return lambda: torch.linalg.vector_norm(flat)

    def fn():
        norm = torch.linalg.vector_norm(flat)
        flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm
    return fn


SUITE = ClipSuite()
