"""Norm partials per group of local tensors: the engine under the per-group norms (segclip.groups)
and the norms across processes (segclip.distributed).

A *partial* is what adds up across groups and processes before the root is taken: the sum of |x|^p
for a finite p != 0, the count of tensors with a non-zero element for p = 0 (torch's definition:
a norm per tensor, then the norm of those), the max |x| for inf, the min for -inf. ``local_partials``
returns one per group plus one over all tensors, as a float64 vector; ``finish`` takes the roots.

NOTE: [group partials in one pass]
Where a compiled ``multi_tensor_group_partials`` kernel exists for the device (CPU and CUDA), every
group's partial and the total come from one pass of the norm kernel: the chunks' results are summed
into their group's slot as well as into the total, so the per-group norms cost no extra read of the
gradients. The total is then bitwise the value ``multi_tensor_norm`` takes the root of. A device with
the norm kernel but no group kernel (a CUDA library built before the group kernel existed) runs
``multi_tensor_norm`` once per group: still one read of each gradient, one launch sequence per group.
Everything else (other norm types, sparse
or complex tensors, the torch backend) takes per-tensor norms with ``segclip.reference``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import _ext, reference

KERNEL_NORM_TYPES = (2.0, 1.0, math.inf)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_GROUP_OP = "segclip::multi_tensor_group_partials"


def combine_kind(norm_type: float) -> str:
    """How partials combine: ``sum`` (finite p, including 0's counts), ``max`` (inf), ``min`` (-inf)."""
    if math.isinf(norm_type):
        return "max" if norm_type > 0 else "min"
    return "sum"


def _identity(norm_type: float) -> float:
    return math.inf if combine_kind(norm_type) == "min" else 0.0


def _combine(a: Tensor, b: Tensor, kind: str) -> Tensor:
    if kind == "sum":
        return a + b
    return torch.maximum(a, b) if kind == "max" else torch.minimum(a, b)  # both propagate NaN


def _in_kernel(t: Tensor) -> bool:
    return t.layout == torch.strided and t.dtype in KERNEL_DTYPES


def has_group_kernel(device: torch.device) -> bool:
    """Whether ``multi_tensor_group_partials`` has a compiled kernel for ``device``'s type."""
    return _has_group_kernel(device.type)


@functools.cache
def _has_group_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (key is not None and _ext.compiled_for(device_type)
            and torch._C._dispatch_has_kernel_for_dispatch_key(_GROUP_OP, key))


def _reduce(values: Tensor, norm_type: float) -> Tensor:
    """The partial of a 1-D float64 tensor of per-piece norms (slices of tensors, or tensors)."""
    kind = combine_kind(norm_type)
    if values.numel() == 0:
        return values.new_full((), _identity(norm_type))
    if kind == "max":
        return values.max()
    if kind == "min":
        return values.min()
    if norm_type == 0:
        return (values != 0).sum().to(torch.float64)
    return values.pow(norm_type).sum()


def _reference_partials(tensors: list[Tensor], group_of: list[int], num_groups: int,
                        norm_type: float) -> Tensor:
    """Per-tensor norms by segclip.reference, combined per group (float64, on the tensors' device)."""
    device = tensors[0].device
    norms: list[list[Tensor]] = [[] for _ in range(num_groups)]
    for t, g in zip(tensors, group_of):
        # p = 0 counts tensors, so one norm per tensor; otherwise the reference's pieces (slices).
        norms[g].extend(reference.tensor_norms([t], norm_type))
    parts = []
    for ns in norms:
        if ns:
            values = torch.stack([n.to(device, torch.float64) for n in ns])
        else:
            values = torch.empty(0, dtype=torch.float64, device=device)
        parts.append(_reduce(values, norm_type))
    everything = torch.stack(parts)
    kind = combine_kind(norm_type)
    total = everything.sum() if kind == "sum" else everything.max() if kind == "max" else everything.min()
    return torch.cat([everything, total.reshape(1)])


def _per_group_norm_partials(tensors: list[Tensor], group_of: list[int], num_groups: int,
                             norm_type: float) -> Tensor:
    """A device with the norm kernel but no group kernel: ``multi_tensor_norm`` once per group."""
    kind = combine_kind(norm_type)
    by_group: dict[int, list[Tensor]] = {}
    for t, g in zip(tensors, group_of):
        by_group.setdefault(g, []).append(t)
    parts = torch.zeros(num_groups + 1, dtype=torch.float64, device=tensors[0].device)
    for g, ts in by_group.items():
        n = torch.ops.segclip.multi_tensor_norm(ts, norm_type).to(torch.float64)
        parts[g] = n if kind == "max" else n.pow(norm_type)
    parts[-1] = parts[:-1].max() if kind == "max" else parts[:-1].sum()
    return parts


def local_partials(tensors: list[Tensor], group_of: list[int], num_groups: int, norm_type: float,
                   backend: str) -> Tensor:
    """Partials of ``tensors`` (any devices), group ``group_of[i]`` for ``tensors[i]``.

    Args:
        tensors: floating-point (or complex) tensors; empty ones count for nothing.
        group_of: one group index in ``[0, num_groups)`` per tensor.
        num_groups: the number of groups (a group may have no tensor: its partial is the identity).
        norm_type: p; any value torch's norms accept.
        backend: as for segclip.fused_clip_, resolved per device.

    Returns:
        A float64 tensor of shape ``(num_groups + 1,)``, per group then over all tensors, on the
        first tensor's device (the CPU when there is none).
    """
    kind = combine_kind(norm_type)
    if not tensors:
        return torch.full((num_groups + 1,), _identity(norm_type), dtype=torch.float64)
    first = tensors[0].device
    by_device: dict[torch.device, tuple[list[Tensor], list[int]]] = {}
    for t, g in zip(tensors, group_of):
        ts, gs = by_device.setdefault(t.device, ([], []))
        ts.append(t)
        gs.append(g)
    total: Tensor | None = None
    for device, (ts, gs) in by_device.items():
        kernel_ok = norm_type in KERNEL_NORM_TYPES and _ext.use_kernel(backend, device)
        kt = [(t, g) for t, g in zip(ts, gs) if kernel_ok and _in_kernel(t)]
        other = [(t, g) for t, g in zip(ts, gs) if not (kernel_ok and _in_kernel(t))]
        pieces = []
        if kt:
            k_ts, k_gs = [t for t, _ in kt], [g for _, g in kt]
            if has_group_kernel(device):  # see note: [group partials in one pass]
                pieces.append(torch.ops.segclip.multi_tensor_group_partials(k_ts, k_gs, num_groups, norm_type))
            else:
                pieces.append(_per_group_norm_partials(k_ts, k_gs, num_groups, norm_type))
        if other:
            pieces.append(_reference_partials([t for t, _ in other], [g for _, g in other], num_groups, norm_type))
        for p in pieces:
            p = p.to(first)
            total = p if total is None else _combine(total, p, kind)
    return total


def finish(partials: Tensor, norm_type: float, dtype: torch.dtype) -> Tensor:
    """The norms from partials (any shape): the p-th root for a finite p != 0, in ``dtype``."""
    if combine_kind(norm_type) != "sum" or norm_type in (0.0, 1.0):
        return partials.to(dtype)
    root = partials.sqrt() if norm_type == 2 else partials.pow(1.0 / norm_type)
    return root.to(dtype)


def scale_(tensors: list[Tensor], coef: Tensor, backend: str) -> None:
    """``tensors *= coef`` in place, per device by the scale kernel or segclip.reference."""
    if tensors and coef.device == tensors[0].device and _ext.use_kernel(backend, coef.device):
        try:  # the common case: one op call; its checks come before its first write
            torch.ops.segclip.multi_tensor_scale_(tensors, coef)
            return
        except RuntimeError:
            pass  # several devices, sparse or complex tensors: split below
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, ts in by_device.items():
        c = coef if coef.device == device else coef.to(device)
        if _ext.use_kernel(backend, device):
            kernel = [t for t in ts if _in_kernel(t)]
            other = [t for t in ts if not _in_kernel(t)]
            if kernel:
                torch.ops.segclip.multi_tensor_scale_(kernel, c)
        else:
            other = ts
        if other:
            reference.multi_tensor_scale_(other, c)
