"""The ``adapt`` suite: value clipping and unit-wise adaptive clipping (AGC), each against PyTorch.

Modes (columns per mode):
    value-inactive   ``clip_grad_value_(params, 1e30)``: nothing exceeds the bound; segclip reads the
                     gradients and writes nothing, torch clamps (reads and writes) everything.
                     Implementations: torch foreach, torch loop, segclip torch, segclip <device>.
    value-active     ``clip_grad_value_(params, 0.5)`` on gradients refreshed from a saved copy in
                     every call (a clamp is idempotent: without the refresh nothing would exceed after
                     the first call); every implementation times the same ``_foreach_copy_``, and
                     ``refresh only`` times it alone.
    agc              ``adaptive_clip_(params, 1e-3)`` on random weights and gradients (most units
                     clip): timm's per-parameter loop (``timm loop``: ``segclip.reference``, the
                     ``torch`` backend) against ``segclip <device>``; baseline: the timm loop.
The speedup column is against the first implementation of each mode (torch foreach; timm loop).
"""

from __future__ import annotations

import torch

from ..cases import ALL_CASES, DTYPES, EXTRA_CASES, QUICK_CASES, TARGET_MODELS, Case, make_case
from . import Group, Suite, Target


class AdaptSuite(Suite):
    name = "adapt"
    help = "clip_grad_value_ and adaptive_clip_ (AGC) against torch's clamps and timm's per-parameter loop"
    cases = ALL_CASES + EXTRA_CASES
    default_cases = TARGET_MODELS
    quick_cases = QUICK_CASES
    dtypes = tuple(DTYPES)
    modes = ("value-inactive", "value-active", "agc")
    mode_titles = {"value-inactive": "clip_grad_value_, nothing beyond the bound (1e30)",
                   "value-active": "clip_grad_value_(0.5), gradients refreshed every call",
                   "agc": "adaptive_clip_(clip_factor=1e-3): unit-wise AGC"}
    baseline = "torch_foreach"
    targets = (Target("cpu", "deeplabv3_mobilenet_v3_large", "agc", "segclip_cpu", "speedup", ">=", 3.0),)

    def impls(self, device: str) -> dict[str, tuple[str, str | None]]:
        import segclip

        info = segclip.backends()[device]
        return {"torch_foreach": ("torch foreach / timm loop", None), "torch_loop": ("torch loop", None),
                "segclip_torch": ("segclip torch", None),
                f"segclip_{device}": (f"segclip {device}", None if info.available else info.reason),
                "refresh": ("refresh only", None)}

    def make_case(self, name: str, device: str) -> Case:
        return make_case(name, device)

    def groups(self, settings, device: str, result: dict):
        import segclip
        from segclip import reference

        impls = [k for k, (_, why) in self.impls(device).items() if why is None]
        for name in settings.models:
            case = make_case(name, device)
            for dtype in settings.dtypes:
                torch.manual_seed(settings.seed)
                params = [torch.nn.Parameter(torch.randn(s, dtype=DTYPES[dtype], device=device)) for s in case.shapes]
                for p in params:
                    p.grad = torch.randn_like(p)
                grads = [p.grad for p in params]
                saved = [g.clone() for g in grads]
                for mode in settings.modes:
                    fns = {}
                    if mode == "agc":
                        weights = [p.detach() for p in params]
                        # the torch_foreach column holds the baseline: timm's loop
                        fns["torch_foreach"] = lambda: reference.adaptive_clip_(weights, grads, 1e-3, 1e-3, 2.0)
                        for k in impls:
                            if k.startswith("segclip_") and k != "segclip_torch":
                                backend = k.removeprefix("segclip_")
                                fns[k] = lambda b=backend: segclip.adaptive_clip_(params, 1e-3, backend=b)
                    else:
                        bound = 1e30 if mode == "value-inactive" else 0.5
                        refresh = (lambda: torch._foreach_copy_(grads, saved)) if mode == "value-active" \
                            else (lambda: None)
                        for k in impls:
                            if k == "refresh":
                                if mode == "value-active":
                                    fns[k] = refresh
                            elif k in ("torch_foreach", "torch_loop"):
                                fe = k == "torch_foreach"
                                fns[k] = lambda fe=fe: (refresh(), torch.nn.utils.clip_grad_value_(params, bound, foreach=fe))
                            else:
                                b = k.removeprefix("segclip_")
                                fns[k] = lambda b=b: (refresh(), segclip.clip_grad_value_(params, bound, backend=b))
                    yield Group(case, dtype, mode, fns, extra={"n_tensors": case.n_tensors})
                del params, grads, saved


SUITE = AdaptSuite()
