"""Value clipping: ``segclip.clip_grad_value_``, a drop-in for ``torch.nn.utils.clip_grad_value_``.

Data flows as in ``clip.py``: argument checks -> gradients grouped by device -> the fused
``torch.ops.segclip.multi_tensor_clip_value_`` kernel, or PyTorch's own clamps
(``reference.multi_tensor_clip_value_``) where no kernel is compiled or the kernel does not take a
gradient (complex, sparse: torch's ops then raise what torch raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import clip, distributed, reference
from .clip import _TensorOrTensors

_OP = "multi_tensor_clip_value_"


def _parse_clip_value(clip_value) -> float:
    """A non-negative float from whatever torch's ``float(clip_value)`` takes ("1.0" and True too)."""
    return clip._parse_max_norm(clip_value, "clip_value") + 0.0  # -0.0 -> 0.0


def _kernel_for(op: str, device: torch.device, backend: str) -> bool:
    """Whether ``backend`` sends ``device``'s gradients to a compiled kernel and that kernel has
    ``segclip::op`` (a CUDA library built before the op existed has not)."""
    return clip._resolve(backend, device) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"segclip::{op}", device.type.upper())


def _fast_clip_value(params: list, clip_value: float, backend: str) -> bool:
    """The whole list in one op call, as clip.py's fast path (see note: [fast path] in clip.py);
    False when the general path must decide (nothing has been written then)."""
    try:
        grads = [p.grad for p in params if p.grad is not None]
    except AttributeError:
        return False
    if not grads or not isinstance(grads[0], Tensor) or not _kernel_for(_OP, grads[0].device, backend):
        return False
    try:
        torch.ops.segclip.multi_tensor_clip_value_(grads, clip_value)
    except (RuntimeError, TypeError):
        return False
    return True


def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float, foreach: bool | None = None, *,
                     backend: str = "auto") -> None:
    """Clamps every gradient element to ``[-clip_value, clip_value]`` in place; a drop-in for
    ``torch.nn.utils.clip_grad_value_``, bit for bit the same values.

    One fused pass over all gradients of a device (CPU and CUDA kernels). NaN stays NaN, +-inf become
    +-clip_value. Only elements beyond the bound are written: a gradient inside it is read, not
    written. No host synchronisation.

    Args:
        parameters: a Tensor or an iterable of Tensors (a generator is consumed once); parameters
            whose ``.grad`` is None are skipped.
        clip_value: the bound, a non-negative number (the bound used for a float16/bfloat16 gradient is
            clip_value rounded to that dtype, as in torch).
        foreach: accepted for torch's signature and ignored: one fused kernel replaces torch's foreach
            and per-tensor paths, with the same result.
        backend: as for :func:`segclip.fused_clip_`.

    Raises:
        ValueError: ``clip_value`` negative or NaN (torch silently sets every gradient to
            ``clip_value`` or NaN), or an unknown ``backend``. No gradient is changed.
        TypeError: ``clip_value`` that ``float()`` refuses (as in torch), a parameter without
            ``.grad``, or a gradient that is not floating point.
    """
    clip._check_backend(backend)
    clip_value = _parse_clip_value(clip_value)
    params = clip._as_list(parameters)
    with torch.no_grad():
        if not torch.compiler.is_compiling() and _fast_clip_value(params, clip_value, backend):
            return
        grads = clip._grads_of(params)
        if not grads:
            return
        # DTensor gradients (FSDP2, tensor parallel): the clamp is elementwise, so each rank clamps its
        # local shards (a replicated DTensor holds the same values everywhere and is clamped alike).
        grads = [g.to_local() if distributed.is_dtensor(g) else g for g in grads]
        for device, kernel, other, use_kernel in clip._plan(grads, backend):
            if not _kernel_for(_OP, device, backend):
                kernel, other = [], kernel + other
            if use_kernel and kernel:
                torch.ops.segclip.multi_tensor_clip_value_(kernel, clip_value)
            if other:  # everything, where no kernel is used
                reference.multi_tensor_clip_value_(other, clip_value)

