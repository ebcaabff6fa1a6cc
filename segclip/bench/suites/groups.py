"""The ``groups`` suite: per-group norms (``segclip.group_norms`` / ``clip_groups_``) beside the
global-only norm (``segclip.total_norm`` / ``fused_clip_``) on the same gradients.

The groups of a model case are its top-level modules (``backbone``, ``classifier``, and
``aux_classifier`` where the model has one), read from the model's parameter names; a synthetic case
is cut in three runs of tensors. What is measured is the price of the per-group figures: the
target is at most 1.05x the global-only call on the same parameters (``segclip global``), timed in the
same run. The speedups in the cells are over the global kernel, the floor: the ops alone on a list
of gradients built once, outside the timing, which no call from parameters can reach (reading
``.grad`` of 193 parameters costs ~45 us when the norm pass has just swept the caches; Intel Xeon,
2026-12-01).

Implementations (columns):
    global kernel      the global norm's ops alone, no Python around them: ``multi_tensor_norm``
                       (mode ``norm``), ``multi_tensor_norm_coef`` + ``multi_tensor_scale_`` (``clip``):
                       the baseline, the least a global-only norm costs
    segclip global     ``segclip.total_norm([p.grad for p in params])`` or ``segclip.fused_clip_(params, ...)``:
                       the global-only call from the same parameters the groups call takes
    segclip groups     ``segclip.group_norms(groups)`` or ``segclip.clip_groups_(groups, ...)``: one pass
    torch per group    torch's way to the same figures: ``torch.nn.utils.get_total_norm`` once per group,
                       the total from those (``clip``: then ``clip_grads_with_norm_``)

Modes:
    norm    the norms only.
    clip    ``max_norm=0.0``: every call scales by 0 (the full read + write; see the clip suite).
"""

from __future__ import annotations

import functools

import torch

from ..cases import ALL_CASES, DTYPES, EXTRA_CASES, MODEL_CASES, Case, make_case, make_grads
from . import Group, Suite, Target

TARGET_CASE = "deeplabv3_mobilenet_v3_large"
MAX_NORM = {"norm": None, "clip": 0.0}


@functools.cache
def model_groups(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(group names, the group of each parameter in parameters() order)`` for a model case: the
    first component of each parameter's name (built on the meta device, as the case's shapes are)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21)
    heads = [n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad]
    names = tuple(dict.fromkeys(heads))
    return names, tuple(names.index(h) for h in heads)


def case_groups(case: Case) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if case.name in MODEL_CASES:
        return model_groups(case.name)
    n = case.n_tensors
    return ("first", "second", "third"), tuple(min(2, 3 * i // max(n, 1)) for i in range(n))


class GroupsSuite(Suite):
    name = "groups"
    help = "per-group norms (group_norms, clip_groups_) against the global-only norm on the same gradients"
    cases = ALL_CASES + EXTRA_CASES
    default_cases = MODEL_CASES[4:] + ("synthetic_tiny",)
    quick_cases = (TARGET_CASE,)
    dtypes = tuple(DTYPES)
    modes = tuple(MAX_NORM)
    mode_titles = {"norm": "norms only", "clip": "clipping active (max_norm=0: every call scales by 0)"}
    baseline = "global_kernel"
    targets = (Target("cpu", TARGET_CASE, "norm", "segclip_groups", "time_over", "<=", 1.05, versus="segclip_global"),
               Target("cpu", TARGET_CASE, "clip", "segclip_groups", "time_over", "<=", 1.05, versus="segclip_global"))

    def impls(self, device: str) -> dict[str, tuple[str, str | None]]:
        import segclip

        info = segclip.backends()[device]
        kernel_why = None if info.available else info.reason
        return {"global_kernel": ("global kernel", kernel_why), "segclip_global": ("segclip global", None), "segclip_groups": ("segclip groups", None),
                "torch_groups": ("torch per group", None)}

    def make_case(self, name: str, device: str) -> Case:
        return make_case(name, device)

    def groups(self, settings, device: str, result: dict):
        import segclip

        for name in settings.models:
            case = make_case(name, device)
            names, group_of = case_groups(case)
            for dtype in settings.dtypes:
                params = make_grads(case, DTYPES[dtype], device, settings.seed)
                named = {n: [p for p, g in zip(params, group_of) if g == k] for k, n in enumerate(names)}
                for mode in sorted(settings.modes, key=lambda m: m != "norm"):  # clip zeroes the data
                    max_norm = MAX_NORM[mode]
                    fns = {k: self.fn(k, params, named, max_norm, segclip)
                           for k, (_, why) in self.impls(device).items() if why is None}
                    group = Group(case, dtype, mode, fns, extra={"groups": list(names), "max_norm": max_norm})
                    if mode == "norm":  # random data: every implementation's figures agree
                        want = [float(x) for x in torch.stack([
                            torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in ps]))
                            for ps in named.values()])]
                        got = fns["segclip_groups"]()
                        err = max((abs(float(g) - w) / w for g, w in zip(got.norms, want) if w), default=0.0)
                        group.impl_extra["segclip_groups"] = {"group_norm_rel_err": err}
                        if not err <= 1e-5:
                            print(f"warning: segclip groups' norms of {name} {dtype} are off by {err:.2g}", flush=True)
                    yield group
                del params, named

    @staticmethod
    def fn(impl: str, params: list, named: dict, max_norm: float | None, segclip):
        if impl == "global_kernel":
            grads = [p.grad for p in params]
            ops = torch.ops.segclip
            if max_norm is None:
                return lambda: ops.multi_tensor_norm(grads, 2.0)

            def kernel_clip():
                total, coef = ops.multi_tensor_norm_coef(grads, 2.0, max_norm)
                ops.multi_tensor_scale_(grads, coef)
                return total
            return kernel_clip
        if impl == "segclip_global":
            if max_norm is None:
                return lambda: segclip.total_norm([p.grad for p in params])
            return lambda: segclip.fused_clip_(params, max_norm)
        if impl == "segclip_groups":
            if max_norm is None:
                return lambda: segclip.group_norms(named)
            return lambda: segclip.clip_groups_(named, max_norm)

        def torch_groups():
            norms = torch.stack([torch.nn.utils.get_total_norm([p.grad for p in ps]) for ps in named.values()])
            total = torch.linalg.vector_norm(norms)
            if max_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
            return total
        return torch_groups


SUITE = GroupsSuite()
