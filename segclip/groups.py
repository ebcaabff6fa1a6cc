"""Per-group gradient norms alongside the global norm, from the same pass over the gradients.

    norms = segclip.clip_groups_({"backbone": model.backbone.parameters(),
                                  "classifier": model.classifier.parameters()}, max_norm=1.0)
    norms.total          # the global norm, as fused_clip_ returns it; every group is clipped by it
    norms["backbone"]    # one group's norm (a 0-dim tensor on the device: no synchronisation)
    norms.to_dict()      # {"backbone": 0.8, "classifier": 0.3} (one host read), e.g. for logging

The groups' partials and the total come from one kernel pass (see note: [group partials in one
pass] in segclip/partials.py); DTensor gradients and ``process_group=`` reduce all groups in the
same single all-reduce (segclip/distributed.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from . import _ext, distributed, norm_math, partials
from .clip import _check_backend, _grads_of, _parse_max_norm  # the public calls' own argument checks

__all__ = ["GroupNorms", "group_norms", "clip_groups_"]


@dataclasses.dataclass(frozen=True)
class GroupNorms:
    """The norms of a call over named groups of parameters.

    Attributes:
        names: the groups' names, in the order given.
        norms: a 1-D tensor, ``norms[i]`` the norm of group ``names[i]`` (0 for a group without
            gradients), float32 (float64 when any gradient is float64), on the first gradient's device.
        total: the norm of all groups together (0-dim, same dtype and device), what
            :func:`segclip.fused_clip_` returns for the same gradients: for DTensor gradients a DTensor
            replicated on their mesh, as there.
    """

    names: tuple[str, ...]
    norms: Tensor
    total: Tensor

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self.norms[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no group named {name!r}; groups: {list(self.names)}") from None

    def to_dict(self) -> dict[str, float]:
        """``{name: norm}`` as Python floats (one host read), with ``"total"`` unless a group has that name."""
        values = self.norms.tolist()
        out = dict(zip(self.names, values))
        total = self.total.full_tensor() if distributed.is_dtensor(self.total) else self.total
        out.setdefault("total", float(total))
        return out


def _named_groups(groups) -> list[tuple[str, list]]:
    """``groups`` as ``[(name, [parameters])]``: a mapping of names to parameters, or a sequence of
    parameter iterables or of optimizer param-group dicts (named by their ``"name"`` or position)."""
    if isinstance(groups, Mapping):
        items = list(groups.items())
    elif isinstance(groups, (Tensor, str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"groups must be a mapping of names to parameters or a list of parameter groups, "
                        f"got {type(groups).__name__}")
    else:
        items = []
        for i, g in enumerate(groups):
            if isinstance(g, Mapping):  # optimizer.param_groups
                if "params" not in g:
                    raise TypeError(f"groups[{i}] is a mapping without 'params' (expected an optimizer param group)")
                items.append((g.get("name", str(i)), g["params"]))
            else:
                items.append((str(i), g))
    out = []
    for name, params in items:
        if not isinstance(name, str):
            raise TypeError(f"group names must be strings, got {type(name).__name__}: {name!r}")
        out.append((name, [params] if isinstance(params, Tensor) else list(params)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    return out


def _collect(named: list[tuple[str, list]]) -> tuple[list[Tensor], list[int]]:
    grads, group_of = [], []
    for k, (name, params) in enumerate(named):
        try:
            gs = _grads_of(params)
        except TypeError as exc:
            raise TypeError(f"group {name!r}: {exc}") from None
        grads.extend(gs)
        group_of.extend([k] * len(gs))
    return grads, group_of


def _fast_norms(named, norm_type: float, backend: str, max_norm: float | None) -> tuple[Tensor, Tensor] | None:
    """The common case in one op call: the groups' norms and the total (with ``max_norm``: the
    gradients clipped too, by multi_tensor_group_clip_), or None when the general path must decide
    (see note: [fast path] in segclip/clip.py: the ops refuse what they cannot take before anything is
    computed or written).

    NOTE: [group fast path]
    On a model's 193 gradients, each pass of Python over the list costs ~10-20 us, and about three
    times that when the norm pass has just swept the caches (Intel Xeon, 2026-12-01): per-entry loops
    in Python were most of what per-group norms cost over the global norm. So the list is walked once
    here (``.grad`` of each parameter, Nones kept), and the rest is the op's work in C++: skipping the
    Nones, the partials, the roots, the norm's dtype (and the coefficient and the scaling).
    """
    if norm_type not in partials.KERNEL_NORM_TYPES or torch.compiler.is_compiling():
        return None
    grads: list = []
    group_of: list[int] = []
    try:
        for k, (_, params) in enumerate(named):
            gs = [p.grad for p in params]
            grads += gs
            group_of += [k] * len(gs)
    except AttributeError:
        return None  # not a parameter: the general path names it
    return group_op(grads, group_of, len(named), norm_type, backend, max_norm)


def group_op(entries: list, group_of: list[int], num_groups: int, norm_type: float, backend: str,
             max_norm: float | None = None) -> tuple[Tensor, Tensor] | None:
    """``(groups' norms, total)`` of ``entries`` (gradients, None where a parameter has none) by one
    call of multi_tensor_group_norms (with ``max_norm``: multi_tensor_group_clip_, which clips too),
    or None when the op cannot take them (the caller's general path decides). The fast paths of
    group_norms, clip_groups_ and clip_optimizer_(groups=) (segclip/fold.py) all end here."""
    first = next((g for g in entries if g is not None), None)
    if first is None or type(first) is not Tensor:
        return None
    device = first.device
    if not (_ext.use_kernel(backend, device) and partials.has_group_kernel(device)):
        return None
    ops = torch.ops.segclip
    with torch.no_grad():
        try:
            if max_norm is None:
                return ops.multi_tensor_group_norms(entries, group_of, num_groups, norm_type)
            return ops.multi_tensor_group_clip_(entries, group_of, num_groups, norm_type, max_norm)
        except (RuntimeError, TypeError):  # TypeError: an entry that is no Tensor
            return None


def _norms(groups, norm_type: float, error_if_nonfinite: bool, backend: str, process_group, what: str,
           max_norm: float | None = None) -> tuple[GroupNorms, list | None, Tensor | None]:
    """The norms, the local tensors to scale (None when the fast path has clipped them already, by
    ``max_norm``), and the plain total (for the clip coefficient)."""
    norm_type = float(norm_type)
    named = _named_groups(groups)
    names = tuple(n for n, _ in named)
    fast = _fast_norms(named, norm_type, backend, max_norm) if process_group is None else None
    if fast is not None:
        norms, total = fast
        if error_if_nonfinite:
            distributed.check_finite(total, norm_type)
        return GroupNorms(names, norms, total), None, total
    grads, group_of = _collect(named)
    if not grads and process_group is None:
        return GroupNorms(names, torch.zeros(len(names)), torch.tensor(0.0)), [], None
    with torch.no_grad():
        total, per_group, local = distributed.norms(grads, group_of, len(names), norm_type, backend, process_group,
                                                    error_if_nonfinite, what)
    return GroupNorms(names, per_group, distributed.as_result(total, local)), local.scaled, total


def group_norms(groups, norm_type: float = 2.0, error_if_nonfinite: bool = False, *, backend: str = "auto",
                process_group=None) -> GroupNorms:
    """The gradient norm of each group and of all of them, in one pass over the gradients.

    Args:
        groups: ``{name: parameters}`` (e.g. ``model.backbone.parameters()``), or a list of parameter
            iterables (named ``"0"``, ``"1"``, ...), or ``optimizer.param_groups`` (named by a
            ``"name"`` key where present, else by position). Parameters whose ``.grad`` is None are
            skipped; a parameter in two groups counts in both (and twice in the total).
        norm_type, error_if_nonfinite, backend, process_group: as for :func:`segclip.fused_clip_`
            (``error_if_nonfinite`` looks at the total).

    Returns:
        A :class:`GroupNorms`.
    """
    _check_backend(backend)
    return _norms(groups, norm_type, error_if_nonfinite, backend, process_group, "segclip.group_norms")[0]


def clip_groups_(groups, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, *,
                 backend: str = "auto", process_group=None) -> GroupNorms:
    """:func:`segclip.fused_clip_` over all groups' gradients (clipped by the global norm), returning
    each group's norm too, from the same pass.

    Args:
        groups: as for :func:`group_norms`.
        max_norm, norm_type, error_if_nonfinite, backend, process_group: as for :func:`segclip.fused_clip_`.

    Returns:
        A :class:`GroupNorms` of the norms before clipping.
    """
    _check_backend(backend)
    max_norm = _parse_max_norm(max_norm)
    with torch.no_grad():
        # One op clips too, unless the total must be checked before the write (error_if_nonfinite).
        result, scaled, total = _norms(groups, norm_type, error_if_nonfinite, backend, process_group,
                                       "segclip.clip_groups_", None if error_if_nonfinite else max_norm)
        if scaled:
            partials.scale_(scaled, norm_math.clip_coefficient(total, max_norm), backend)
    return result
