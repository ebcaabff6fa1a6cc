"""segclip's public clipping API: argument checks, grouping by device, and the choice of backend.

Data flows one way: user call -> argument checks (clear errors) -> grads grouped by device ->
``torch.ops.segclip.*`` (the CPU or CUDA kernel) or the pure-PyTorch backend (segclip.reference),
chosen per device in ``_plan``.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from . import _ext, _ops, distributed, norm_math, reference  # noqa: F401  (_ops registers the fake kernels)

BACKENDS = ("auto", "torch", "cpu", "cuda")
# Norm types the kernels compute; any other goes through segclip.reference on every backend.
KERNEL_NORM_TYPES = (2.0, 1.0, math.inf)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_TensorOrTensors = Tensor | Iterable[Tensor]


# A device's gradients: (device, those the kernel takes, those only PyTorch handles, use the kernel).
_Group = tuple[torch.device, list[Tensor], list[Tensor], bool]


def _as_list(tensors: _TensorOrTensors, name: str | None = None) -> list:
    """``tensors`` as a list (a generator is consumed once, here). With ``name``, an empty generator
    warns as torch's ``clip_grad_norm_`` does; ``get_total_norm`` and ``clip_grads_with_norm_`` are
    silent, so their counterparts pass no name."""
    if isinstance(tensors, Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    items = list(tensors)
    if name is not None and is_generator and not items:
        warnings.warn(f"`{name}` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return items


def _a(obj) -> str:
    """'a float', 'an int': the type of ``obj`` with its article, for error messages."""
    name = type(obj).__name__
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _parse_max_norm(max_norm, name: str = "max_norm") -> float:
    """``max_norm`` (or another bound, named ``name``) as a float: whatever torch accepts (anything
    ``float()`` takes, "1.0" and True too), but a negative or NaN value is refused (torch silently
    flips or NaNs the gradients)."""
    if isinstance(max_norm, Tensor):
        if max_norm.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(max_norm.shape)}")
        value = float(max_norm)  # a CUDA tensor costs one synchronisation here; pass a float to avoid it
    elif isinstance(max_norm, numbers.Real):  # what torch.compile traces
        value = float(max_norm)
    else:
        try:
            value = float(max_norm)  # as torch does: "1.0", a 0-dim numpy array, ...
        except (TypeError, ValueError) as exc:  # the exception type torch raises, naming the argument
            raise type(exc)(f"{name} must be a real number, got {_a(max_norm)}: {max_norm!r}") from None
    if not value >= 0:  # negative or NaN (written so that torch.compile can trace it)
        raise ValueError(f"{name} must be a non-negative number, got {max_norm!r}")
    return value


def _is_one_real(x) -> bool:
    """A 0-dim numpy array (or the like) of a real dtype; strings and bools are not."""
    if isinstance(x, (str, bytes, bool)) or not hasattr(x, "__float__") or getattr(x, "ndim", 0) != 0:
        return False
    return getattr(getattr(x, "dtype", None), "kind", "f") in "iuf"


def _check_tensor(t: Tensor, what: str) -> None:
    if not (t.dtype.is_floating_point or t.dtype.is_complex):
        raise TypeError(f"{what} has dtype {t.dtype}; gradient norms need floating-point tensors")
    if t.layout not in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        raise TypeError(f"{what} has layout {t.layout}; supported: strided, sparse_coo, sparse_csr")


def _grads_of(parameters: list) -> list[Tensor]:
    grads = []
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor) and not hasattr(p, "grad"):  # torch takes anything with a .grad
            raise TypeError(f"parameters[{i}] is {_a(p)}, expected a Tensor")
        g = p.grad
        if g is not None:
            if not isinstance(g, Tensor):
                raise TypeError(f"the gradient of parameters[{i}] is {_a(g)}, expected a Tensor")
            _check_tensor(g, f"the gradient of parameters[{i}]")
            grads.append(g)
    return grads


def _resolve(backend: str, device: torch.device) -> bool:
    """True when ``device``'s gradients go to a compiled kernel, False for segclip.reference."""
    return _ext.use_kernel(backend, device)  # in _ext, so that segclip.partials can share it


def _plan(grads: list[Tensor], backend: str) -> list[_Group]:
    """Groups gradients by device (first-seen order) and picks each device's backend."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    groups = []
    for device, ts in by_device.items():
        if _resolve(backend, device):
            kernel = [t for t in ts if t.layout == torch.strided and t.dtype in KERNEL_DTYPES]
            other = [t for t in ts if not (t.layout == torch.strided and t.dtype in KERNEL_DTYPES)]
            groups.append((device, kernel, other, True))
        else:
            groups.append((device, [], ts, False))
    return groups


def _norm_and_coef(groups: list[_Group], norm_type: float, max_norm: float | None,
                   first_device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The total norm over all groups and, when ``max_norm`` is given, the clip coefficient."""
    in_kernel = norm_type in KERNEL_NORM_TYPES
    if in_kernel and len(groups) == 1 and groups[0][1] and not groups[0][2] and max_norm is not None:
        # The common case: one device, all in the kernel. The norm, its final reduction and the
        # coefficient come from one op, on the device, without a host synchronisation.
        return torch.ops.segclip.multi_tensor_norm_coef(groups[0][1], norm_type, max_norm)
    pieces: list[Tensor] = []
    for _, kernel, other, use_kernel in groups:
        if use_kernel and in_kernel and kernel:
            pieces.append(torch.ops.segclip.multi_tensor_norm(kernel, norm_type))
            pieces.extend(reference.tensor_norms(other, norm_type))
        else:
            pieces.extend(reference.tensor_norms(kernel + other, norm_type))
    total = norm_math.combine_norms(pieces, norm_type, first_device, dtype)
    coef = norm_math.clip_coefficient(total, max_norm) if max_norm is not None else None
    return total, coef


def _scale(groups: list[_Group], coef: Tensor) -> None:
    for device, kernel, other, use_kernel in groups:
        c = coef if coef.device == device else coef.to(device)
        if use_kernel and kernel:
            torch.ops.segclip.multi_tensor_scale_(kernel, c)
        if other:
            reference.multi_tensor_scale_(other, c)


def _check_finite(total: Tensor, norm_type: float) -> None:
    if not bool(torch.isfinite(total)):  # the one documented host synchronisation
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`")


def _general_norm(grads: list[Tensor], norm_type: float, max_norm: float | None, error_if_nonfinite: bool,
                  backend: str, groups: list[_Group] | None = None) -> tuple[list[_Group], Tensor, Tensor | None]:
    """Plans the groups (unless given), then takes the total norm (and coefficient) over all of them."""
    groups = _plan(grads, backend) if groups is None else groups
    dtype = norm_math.accumulate_dtype(g.dtype for g in grads)
    total, coef = _norm_and_coef(groups, norm_type, max_norm, grads[0].device, dtype)
    if error_if_nonfinite:
        _check_finite(total, norm_type)
    return groups, total, coef


def _empty_norm() -> Tensor:
    return torch.tensor(0.0)


def _fast_clip(params: list, max_norm: float, norm_type: float, error_if_nonfinite: bool,
               backend: str) -> Tensor | None:
    """The common case in one op call (two with ``error_if_nonfinite``), or None when the general
    path must decide.

    NOTE: [fast path]
    Per-gradient checks and grouping in Python cost about 1 us per gradient, as much as the whole
    norm pass of a small model. When every gradient sits on one device and the kernel takes them
    all, the op's own argument checks (device, dtype, layout of each tensor, in C++) are the only
    ones needed. ``multi_tensor_clip_`` converts and checks the list once and makes every refusal
    before its first write, so if it refuses the list (mixed devices, sparse or complex gradients,
    ...), nothing has been written yet, and the general path groups, routes or raises a precise
    error. ``error_if_nonfinite`` needs the norm on the host before the scale: two ops there.
    Not used while torch.compile traces: there the Python overhead is compiled away anyway.
    """
    if norm_type not in KERNEL_NORM_TYPES:
        return None
    try:
        grads = [p.grad for p in params if p.grad is not None]
    except AttributeError:
        return None  # a non-Tensor in parameters: the general path names it
    if not grads or not isinstance(grads[0], Tensor) or not _resolve(backend, grads[0].device):
        return None
    with torch.no_grad():
        try:
            if not error_if_nonfinite:
                return torch.ops.segclip.multi_tensor_clip_(grads, norm_type, max_norm)[0]
            total, coef = torch.ops.segclip.multi_tensor_norm_coef(grads, norm_type, max_norm)
        except (RuntimeError, TypeError):  # TypeError: a gradient that is no Tensor
            return None
        _check_finite(total, norm_type)
        torch.ops.segclip.multi_tensor_scale_(grads, coef)
    return total


def _fast_norm(items: list, norm_type: float, error_if_nonfinite: bool, backend: str) -> Tensor | None:
    """total_norm's common case in one op call, or None when the general path must decide (see
    note: [fast path]: the norm op writes nothing, and refuses what it cannot take)."""
    tensors = [t for t in items if t is not None]
    if not tensors or type(tensors[0]) is not Tensor or not _resolve(backend, tensors[0].device):
        return None
    with torch.no_grad():
        try:
            total = torch.ops.segclip.multi_tensor_norm(tensors, norm_type)
        except (RuntimeError, TypeError):  # TypeError: an entry that is no Tensor
            return None
    if error_if_nonfinite:
        _check_finite(total, norm_type)
    return total


def fused_clip_(parameters: _TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                backend: str = "auto", process_group=None) -> Tensor:
    """Clips the gradient norm of ``parameters`` in place; a drop-in for ``torch.nn.utils.clip_grad_norm_``.

    The norm over all gradients is taken in one fused multi-tensor pass per device; the clip
    coefficient ``min(1, max_norm / (total + 1e-6))`` stays on the device (no host synchronisation);
    when the total is at most ``max_norm`` the scaling pass writes nothing.

    Args:
        parameters: a Tensor or an iterable of Tensors (a generator is consumed once). Parameters whose
            ``.grad`` is None are skipped.
        max_norm: the largest allowed total norm: a non-negative number, or anything ``float()`` takes
            (as for torch: ``"1.0"``, True, a one-element tensor).
        norm_type: the p of the p-norm, as for torch (``'inf'`` and ``math.inf`` for the max norm).
            1, 2 and inf run in the kernels; other values are computed by PyTorch ops.
        error_if_nonfinite: raise ``RuntimeError`` when the total norm is NaN or infinite (costs one
            host synchronisation, as in torch). When False, a NaN/inf norm scales the gradients to
            NaN/0 exactly as torch does.
        foreach: accepted, so that calls written for torch's ``clip_grad_norm_`` run unchanged, and
            otherwise ignored: the fused multi-tensor kernels replace torch's foreach and per-tensor
            paths, and give the same result whatever its value.
        backend: ``"auto"`` (per device: the compiled kernel when one is built, else PyTorch),
            ``"torch"``, ``"cpu"`` or ``"cuda"`` (that kernel or an error saying why not).
        process_group: a ``torch.distributed`` group whose ranks each pass their own shards of the
            gradients (ZeRO-style); all of them get the global norm and clip by it. Not needed for DDP
            (its gradients are already reduced) nor for DTensor gradients (FSDP2, tensor parallel:
            their mesh names the processes). See segclip.distributed.

    Returns:
        The total norm before clipping (for DTensor gradients, as torch: a DTensor replicated on their
        mesh, whose ``full_tensor()`` is the global norm): a 0-dim float32 tensor (float64 when any gradient is float64)
        on the first gradient's device, whatever the gradients' dtype (torch returns a bfloat16 norm
        for bfloat16 gradients). ``tensor(0.)`` when no parameter has a gradient.

    Raises:
        ValueError: ``max_norm`` negative or NaN, an unknown ``backend``, or ``norm_type`` not a number.
        TypeError: a parameter that is neither a Tensor nor has a ``.grad`` (torch, too, only reads
            ``.grad``), or a gradient that is not a floating-point Tensor.
        RuntimeError: ``error_if_nonfinite`` and a non-finite norm; an unavailable explicit backend.
    """
    _check_backend(backend)
    max_norm = _parse_max_norm(max_norm)
    norm_type = float(norm_type)  # the errors torch gives for a bad norm_type
    params = _as_list(parameters, "parameters")
    if process_group is None and not torch.compiler.is_compiling():
        fast = _fast_clip(params, max_norm, norm_type, error_if_nonfinite, backend)
        if fast is not None:
            return fast
    grads = _grads_of(params)
    if process_group is not None or distributed.any_dtensor(grads):  # every rank takes part, grads or not
        return distributed.fused_clip_(grads, max_norm, norm_type, error_if_nonfinite, backend, process_group)
    if not grads:
        return _empty_norm()
    with torch.no_grad():
        groups = _plan(grads, backend)
        if (not error_if_nonfinite and norm_type in KERNEL_NORM_TYPES and len(groups) == 1
                and groups[0][1] and not groups[0][2]):  # one device, all in the kernel: one op
            return torch.ops.segclip.multi_tensor_clip_(groups[0][1], norm_type, max_norm)[0]
        groups, total, coef = _general_norm(grads, norm_type, max_norm, error_if_nonfinite, backend, groups)
        _scale(groups, coef)
    return total


clip_grad_norm_ = fused_clip_


def total_norm(tensors: _TensorOrTensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
               foreach: bool | None = None, *, backend: str = "auto", process_group=None) -> Tensor:
    """The norm of ``tensors`` viewed as one vector, like ``torch.nn.utils.get_total_norm``.

    Args:
        tensors: a Tensor or an iterable of Tensors (None entries are skipped), e.g. the gradients.
        norm_type, error_if_nonfinite, foreach, backend, process_group: as for :func:`fused_clip_`.

    Returns:
        A 0-dim float32 tensor (float64 when any tensor is float64) on the first tensor's device;
        ``tensor(0.)`` for no tensors; for DTensors, a DTensor as for :func:`fused_clip_`.
    """
    _check_backend(backend)
    norm_type = float(norm_type)
    items, tensors = _as_list(tensors), []
    if process_group is None and norm_type in KERNEL_NORM_TYPES and not torch.compiler.is_compiling():
        fast = _fast_norm(items, norm_type, error_if_nonfinite, backend)  # see note: [fast path]
        if fast is not None:
            return fast
    for i, t in enumerate(items):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] is {_a(t)}, expected a Tensor")
        _check_tensor(t, f"tensors[{i}]")
        tensors.append(t)
    if process_group is not None or distributed.any_dtensor(tensors):
        return distributed.total_norm(tensors, norm_type, error_if_nonfinite, backend, process_group)
    if not tensors:
        return _empty_norm()
    with torch.no_grad():
        return _general_norm(tensors, norm_type, None, error_if_nonfinite, backend)[1]


def clip_with_norm_(parameters: _TensorOrTensors, max_norm: float, total_norm: Tensor | float,
                    foreach: bool | None = None, *, backend: str = "auto") -> None:
    """Scales gradients in place given a precomputed total norm, like
    ``torch.nn.utils.clip_grads_with_norm_``: ``grad *= min(1, max_norm / (total_norm + 1e-6))``.

    Args:
        parameters: a Tensor or an iterable of Tensors; those without a gradient are skipped.
        max_norm: the largest allowed total norm: a non-negative number, or anything ``float()`` takes
            (as for torch: ``"1.0"``, True, a one-element tensor).
        total_norm: the norm (a 0-dim tensor on any device, or a number), e.g. from :func:`total_norm`.
        foreach, backend: as for :func:`fused_clip_`.
    """
    _check_backend(backend)
    max_norm = _parse_max_norm(max_norm)
    grads = _grads_of(_as_list(parameters))
    if distributed.any_dtensor(grads) or distributed.is_dtensor(total_norm):
        return distributed.clip_with_norm_(grads, max_norm, total_norm, backend)
    if not grads:
        return
    if not isinstance(total_norm, Tensor):  # a number: in the gradients' accumulation dtype
        total_norm = torch.tensor(float(total_norm), device=grads[0].device,
                                  dtype=norm_math.accumulate_dtype(g.dtype for g in grads))
    if total_norm.numel() != 1:
        raise ValueError(f"total_norm must hold one value, got shape {tuple(total_norm.shape)}")
    with torch.no_grad():
        coef = norm_math.clip_coefficient(total_norm.reshape(()), max_norm)
        _scale(_plan(grads, backend), coef)
