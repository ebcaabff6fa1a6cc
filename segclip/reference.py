"""The pure-PyTorch backend: the same contract as the compiled ops (see note: [op contract] in
csrc/segclip.cpp), built from stock PyTorch ops. It runs wherever no kernel is compiled for a device,
handles what the kernels do not (any ``norm_type``, sparse and complex gradients), and is one of the
tests' oracles beside float64 math.

Semantics follow ``torch.nn.utils.get_total_norm``: a norm per tensor, then the norm of those norms.
That is the norm of the concatenation for every ``norm_type`` except 0, where torch (and so this
module) counts the tensors with a non-zero element rather than the elements.

Two deliberate differences from torch:
  * norms accumulate in float32 (float64 for float64 and complex128 inputs), so float16/bfloat16
    gradients get a float32 norm instead of a rounded one;
  * empty tensors are skipped: torch raises for the inf norm of a list holding an empty tensor,
    which the norm of the concatenation does not need to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .norm_math import accumulate_dtype, combine_norms

_CPU_SLICE = 1 << 16  # elements; see note: [CPU fp32 reduction error]




def tensor_norms(tensors: list[Tensor], norm_type: float) -> list[Tensor]:
    """Per-tensor norms, each a 0-dim tensor on its tensor's device in its accumulation dtype.

    Dense tensors of one device and dtype go through one ``torch._foreach_norm`` call; sparse COO
    tensors are coalesced (duplicate indices add up) and their values normed.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    norms: list[Tensor] = []
    for t in tensors:
        if t.numel() == 0:
            continue
        if t.layout == torch.sparse_coo:
            norms.append(_norm_one(t.coalesce().values(), norm_type))
        elif t.layout != torch.strided:
            norms.append(_norm_one(t.values(), norm_type))  # compressed layouts have no duplicates
        else:
            groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, dtype), group in groups.items():
        if dtype.is_complex:
            norms.extend(_norm_one(t, norm_type) for t in group)
            continue
        if device.type == "cpu" and dtype != torch.float64 and norm_type != 0:
            # NOTE: [CPU fp32 reduction error] torch's CPU fp32 norm kernels accumulate long runs in
            # fp32: ~4e-4 relative error for the L2 norm of 10M elements, ~2e-6 for L1 or p = 0.5
            # even on 1K elements. L2 norms of 64K-element slices (views, no copy) combined in
            # float64 stay near 2e-7; other finite p are summed here as abs().pow(p).sum() (~3e-8).
            # Exact regrouping for every p != 0; p = 0 counts tensors (torch's definition) and must
            # not be sliced.
            group = [piece for t in group for piece in t.reshape(-1).split(_CPU_SLICE)]
            if not math.isinf(norm_type) and norm_type != 2:
                norms.extend(_abs_pow_sum(piece, norm_type).double() ** (1 / norm_type) for piece in group)
                continue
        norms.extend(torch._foreach_norm(group, norm_type, dtype=accumulate_dtype([dtype])))
    return norms


def _abs_pow_sum(t: Tensor, p: float) -> Tensor:
    a = t.abs().float()  # half/bfloat16: powers and sums in float32, not rounded per element
    return a.sum() if p == 1 else a.pow(p).sum()


def _norm_one(t: Tensor, norm_type: float) -> Tensor:
    acc = accumulate_dtype([t.dtype])
    if t.dtype.is_complex:
        return torch.linalg.vector_norm(t, norm_type).to(acc)
    return torch.linalg.vector_norm(t, norm_type, dtype=acc)




def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    """Total norm of ``tensors`` (all on one device), float32 or float64; the op contract."""
    if not tensors:
        raise ValueError("multi_tensor_norm: expected a non-empty list of tensors")
    dtype = accumulate_dtype(t.dtype for t in tensors)
    return combine_norms(tensor_norms(tensors, norm_type), norm_type, tensors[0].device, dtype)




def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``tensors *= coef`` in place, with the kernels' semantics; nothing is written when ``coef``
    lives on the CPU and is >= 1 (outside torch.compile, where the product is always taken).

    On other devices the product is always taken (multiplying by 1 leaves values unchanged):
    checking the value first would cost a host synchronisation. As in the kernels: every check
    comes before the first write (an expanded gradient is refused); a view that may overlap itself
    (``as_strided``) is scaled out of place, each element once; memory shared by several entries is
    scaled once per entry, one entry after another (see note: [tensors that share memory] in
    csrc/shared_memory.h); every tensor's version counter is bumped, written or not, as by ``mul_``.
    """
    if torch.compiler.is_compiling():  # traced: no memory queries; the product is always taken
        for t in tensors:  # one mul_ per tensor: a traced _foreach_mul_ scales shared memory once
            t.mul_(coef.to(t.device))
        return
    # Every check before the first write; the kind of each tensor found once.
    inference_ok = torch.is_inference_mode_enabled()
    flat: dict[torch.device, list[Tensor]] = {}  # no gaps, no overlap: foreach takes them
    other: list[Tensor] = []  # sparse, or gaps or overlap that cannot be ruled out
    for i, t in enumerate(tensors):
        if t.is_inference() and not inference_ok:  # torch's foreach would raise mid-list
            raise RuntimeError(f"segclip::multi_tensor_scale_: tensors[{i}] is an inference tensor; an in-place "
                               "update outside torch.inference_mode is not allowed (clone it first)")
        if t.layout != torch.strided:
            other.append(t)
            continue
        overlap = 0 if t.is_contiguous() else torch._debug_has_internal_overlap(t)
        if overlap == 1:
            raise RuntimeError(f"segclip::multi_tensor_scale_: tensors[{i}] has internally overlapping memory "
                               "(an expanded view?); it cannot be scaled in place")
        if overlap == 0:
            flat.setdefault(t.device, []).append(t)
        else:
            other.append(t)
    if coef.device.type == "cpu" and bool(coef >= 1):
        torch.autograd.graph.increment_version(tensors)
        return
    for device, group in flat.items():
        c = coef.to(device)  # no copy on coef's own device
        if _share_memory(group):
            for t in group:
                t.mul_(c)
        else:
            torch._foreach_mul_(group, c)
    for t in other:
        c = coef.to(t.device)
        if t.layout != torch.strided:
            t.mul_(c)
        else:  # each element once, rounded once
            t.copy_(t.to(_opmath(t.dtype), copy=True).mul_(c))


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype products are taken in: float32 for half/bfloat16/float32, else the dtype itself."""
    return dtype if dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32


def _share_memory(flat: list[Tensor]) -> bool:
    """Whether two of these non-overlapping, dense tensors share bytes (their ranges intersect)."""
    ranges = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in flat if t.numel())
    return any(start < end for (_, end), (start, _) in zip(ranges, ranges[1:]))


def multi_tensor_clip_value_(tensors: list[Tensor], clip_value: float) -> None:
    """``clamp(t, -clip_value, clip_value)`` in place: torch's clip_grad_value_ itself (foreach clamps
    per device and dtype, bit for bit the kernels' result). Unlike the kernels it writes every
    element, and a bound beyond a float16/bfloat16 gradient's range raises (torch's CPU clamp
    refuses to convert it); complex or sparse gradients raise what torch raises."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        if all(t.layout == torch.strided for t in group):
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for t in group:
                t.clamp_(min=-clip_value, max=clip_value)


def unitwise_norm(x: Tensor, norm_type: float) -> Tensor:
    """The norm of each unit of ``x``: of each slice along dim 0 (shape ``(n, 1, ..., 1)``), or of the
    whole tensor (0-dim) when ``x`` has at most one dimension. timm's ``unitwise_norm``."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_clip_(weights: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
                   norm_type: float) -> None:
    """Unit-wise adaptive gradient clipping, one parameter at a time with PyTorch ops: timm's
    ``adaptive_clip_grad`` loop (norms, bound, ratio and product in the gradient's dtype)."""
    for w, g in zip(weights, grads):
        if g.numel() == 0:
            continue
        max_norm = unitwise_norm(w.detach(), norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g, norm_type)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < max_norm, g, clipped))
