"""Global norms across processes: DTensor gradients (FSDP2 ``fully_shard``, tensor parallel) and plain
local shards with ``process_group=`` (ZeRO-style code that shards gradients itself).

segclip.clip hands a call here, early, when a gradient is a DTensor or a ``process_group`` is given.
The kernels run on the local shards; then one all-reduce per mesh dimension (one for FSDP2's and
tensor parallel's 1-D meshes, one for a process group) combines the partials; every rank gets the
global norm and scales its shards by the same coefficient.

NOTE: [one all-reduce of the partials]
Each rank reduces its local tensors to partials (segclip.partials: the sum of |g|^p, the max |g| for
inf), one per group and one in all, and the vector is all-reduced once: summed, or maxed for inf (min
for -inf), in float32 (float64 when a gradient is float64). The roots are taken after the reduction,
so the result is the norm of the whole gradient, as if one process held it. A DTensor replicated on
a mesh dimension holds the same values on every rank of that dimension: only the rank at coordinate 0
there counts it (the others scale it all the same), so nothing is counted twice. Max and min drop
NaN in some collective backends, so for inf norms a NaN flag travels in the same vector.
DDP needs none of this: its gradients are already all-reduced, identical on every rank, so the
local norm is the global one.

NOTE: [process group consistency check]
With ``process_group=`` every rank passes its own list, and lists that disagree in the norm type,
the number of groups or the accumulation dtype would make the all-reduce mix different things, or
hang on a size mismatch. So each such call first all-gathers a 3-number signature (norm type, dtype,
group count; the same shape on every rank, so it cannot mismatch) and raises ``ValueError`` on every
rank, naming the ranks, when they disagree. It costs one small collective and, on CUDA, one host
read per call. DTensor calls skip it: the DTensors' mesh and placements already agree across ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import norm_math, partials

_DTYPE_CODE = {None: 0.0, torch.float32: 1.0, torch.float64: 2.0}
_CODE_DTYPE = {1.0: torch.float32, 2.0: torch.float64}


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor  # imported on first use: it costs ~0.1 s

    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (cheap for plain tensors)."""
    if type(t) is Tensor or t is None:
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def any_dtensor(tensors) -> bool:
    return any(type(t) is not Tensor and is_dtensor(t) for t in tensors)


def _check_norm_type(norm_type: float, what: str) -> None:
    if norm_type == 0:
        raise ValueError(f"{what}: norm_type=0 counts whole tensors, which sharded gradients do not "
                         "show any one process; use a p > 0 or inf across processes")
    if math.isnan(norm_type):
        raise ValueError(f"{what}: norm_type must be a number, got nan")


class _Local:
    """The local side of a distributed call: what to norm, what to scale, how to reduce."""

    def __init__(self, normed: list[Tensor], group_of: list[int], scaled: list[Tensor], mesh, reduce_groups: list,
                 process_group):
        self.normed, self.group_of, self.scaled = normed, group_of, scaled
        self.mesh, self.reduce_groups, self.process_group = mesh, reduce_groups, process_group


def localize(tensors: list[Tensor], group_of: list[int], process_group, what: str) -> _Local:
    """Splits a list of DTensors into local shards (or takes plain shards with a group).

    Raises:
        ValueError: DTensors mixed with plain tensors, DTensors on different meshes, a ``Partial``
            placement, or a ``process_group`` given with DTensors.
    """
    first_dt = next((i for i, t in enumerate(tensors) if is_dtensor(t)), None)
    if first_dt is None:
        if process_group is None:
            raise ValueError(f"{what}: neither a DTensor nor a process_group to reduce over")
        return _Local(list(tensors), list(group_of), list(tensors), None, [process_group], process_group)
    if process_group is not None:
        raise ValueError(f"{what}: process_group= was given with DTensor gradients; the DTensors' device "
                         "mesh names the processes to reduce over: drop process_group")
    from torch.distributed.tensor import Partial, Replicate

    mesh = tensors[first_dt].device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{what}: this rank is not in the DTensors' device mesh {mesh}")
    normed, normed_groups, scaled = [], [], []
    for i, (t, g) in enumerate(zip(tensors, group_of)):
        if not is_dtensor(t):
            raise ValueError(f"{what}: tensors[{i}] is a plain {type(t).__name__} while tensors[{first_dt}] is a "
                             "DTensor; pass all gradients as DTensors (e.g. all parameters sharded by "
                             "fully_shard) or none")
        if t.device_mesh != mesh:
            raise ValueError(f"{what}: tensors[{i}] lives on device mesh {t.device_mesh}, tensors[{first_dt}] on "
                             f"{mesh}; one call reduces over one mesh: call once per mesh and combine")
        local = t.to_local()
        scaled.append(local)
        if any(isinstance(p, Partial) for p in t.placements):
            raise ValueError(f"{what}: tensors[{i}] has placements {t.placements}; a Partial DTensor holds "
                             "unreduced values whose norm no shard knows: redistribute it first")
        # Replicated on a mesh dimension: counted by the rank at coordinate 0 there only.
        if all(coordinate[d] == 0 for d, p in enumerate(t.placements) if isinstance(p, Replicate)):
            normed.append(local)
            normed_groups.append(g)
    reduce_groups = [mesh.get_group(d) for d in range(mesh.ndim)]
    return _Local(normed, normed_groups, scaled, mesh, reduce_groups, None)


def _collective_device(local: _Local, group) -> torch.device:
    if local.normed:
        return local.normed[0].device
    if local.mesh is not None:
        return torch.device(local.mesh.device_type)
    backend = torch.distributed.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(local: _Local, norm_type: float, num_groups: int, dtype: torch.dtype | None, what: str) -> torch.dtype:
    """See note: [process group consistency check]. Returns the accumulation dtype all ranks use."""
    group = local.process_group
    device = _collective_device(local, group)
    mine = torch.tensor([norm_type, _DTYPE_CODE[dtype], float(num_groups)], dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(rows, mine, group=group)
    table = [r.tolist() for r in rows]  # one host read
    problems = []
    for name, col in (("norm_type", 0), ("the number of groups", 2)):
        values = sorted({row[col] for row in table})
        if len(values) > 1:
            problems.append(f"{name} differs: " + ", ".join(f"rank {r}: {row[col]:g}" for r, row in enumerate(table)))
    codes = {row[1] for row in table if row[1] != 0}
    if len(codes) > 1:
        problems.append("the gradients' accumulation dtype differs (float64 on some ranks, float32 on others): "
                        + ", ".join(f"rank {r}: {_CODE_DTYPE.get(row[1], 'no tensors')}"
                                    for r, row in enumerate(table)))
    if problems:
        raise ValueError(f"{what}(process_group=...): the ranks passed inconsistent lists; " + "; ".join(problems))
    return _CODE_DTYPE[codes.pop()] if codes else torch.float32


def global_partials(local: _Local, num_groups: int, norm_type: float, backend: str,
                    what: str) -> tuple[Tensor, torch.dtype]:
    """The partials of every rank's shards, all-reduced (see note: [one all-reduce of the partials]).

    Returns:
        The float64-or-float32 partials of shape ``(num_groups + 1,)``, identical on every rank, and
        the norm's dtype.
    """
    _check_norm_type(norm_type, what)
    dist = torch.distributed
    mine = norm_math.accumulate_dtype(t.dtype for t in local.normed) if local.normed else None
    if local.process_group is not None:
        dtype = _agree(local, norm_type, num_groups, mine, what)
    else:
        dtype = norm_math.accumulate_dtype(t.dtype for t in local.scaled) if local.scaled else torch.float32
    device = _collective_device(local, local.reduce_groups[0])
    vec = partials.local_partials(local.normed, local.group_of, num_groups, norm_type, backend).to(device)
    kind = partials.combine_kind(norm_type)
    if kind == "sum":
        op, payload = dist.ReduceOp.SUM, vec.to(dtype)
    else:  # a NaN flag in the same vector: max/min drop NaN in some backends
        nan = torch.isnan(vec).any().to(dtype).reshape(1)
        op = dist.ReduceOp.MAX if kind == "max" else dist.ReduceOp.MIN
        payload = torch.cat([torch.nan_to_num(vec.to(dtype), nan=0.0), nan if kind == "max" else -nan])
    for group in local.reduce_groups:
        dist.all_reduce(payload, op=op, group=group)
    if kind != "sum":
        flag = payload[-1] != 0
        payload = torch.where(flag, torch.full_like(payload[:-1], math.nan), payload[:-1])
    return payload, dtype


def as_result(total: Tensor, local: _Local) -> Tensor:
    """What torch returns: a DTensor replicated on the mesh for DTensor gradients, else a tensor."""
    if local.mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(total, local.mesh, [Replicate()] * local.mesh.ndim, run_check=False)


def check_finite(total: Tensor, norm_type: float) -> None:
    if not bool(torch.isfinite(total)):  # the one documented host synchronisation, as in torch
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`")


def norms(tensors: list[Tensor], group_of: list[int], num_groups: int, norm_type: float, backend: str,
          process_group, error_if_nonfinite: bool, what: str) -> tuple[Tensor, Tensor, _Local]:
    """Global norms: ``(total, per-group norms of shape (num_groups,), the local side)``, plain tensors.

    Without a DTensor and without ``process_group``, the local norms (no collective).
    """
    if process_group is None and not any_dtensor(tensors):
        local = _Local(tensors, group_of, tensors, None, [], None)
        dtype = norm_math.accumulate_dtype(t.dtype for t in tensors)
        vec = partials.local_partials(tensors, group_of, num_groups, norm_type, backend)
    else:
        local = localize(tensors, group_of, process_group, what)
        vec, dtype = global_partials(local, num_groups, norm_type, backend, what)
    result = partials.finish(vec, norm_type, dtype)
    total, per_group = result[-1], result[:-1]
    if error_if_nonfinite:
        check_finite(total, norm_type)
    return total, per_group, local


def fused_clip_(grads: list[Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool,
                backend: str, process_group) -> Tensor:
    """segclip.fused_clip_ for DTensor gradients or local shards with a group (checked arguments)."""
    with torch.no_grad():
        total, _, local = norms(grads, [0] * len(grads), 1, norm_type, backend, process_group,
                                error_if_nonfinite, "segclip.fused_clip_")
        if local.scaled:
            partials.scale_(local.scaled, norm_math.clip_coefficient(total, max_norm), backend)
    return as_result(total, local)


def total_norm(tensors: list[Tensor], norm_type: float, error_if_nonfinite: bool, backend: str,
               process_group) -> Tensor:
    """segclip.total_norm for DTensors or local shards with a group (checked arguments)."""
    with torch.no_grad():
        total, _, local = norms(tensors, [0] * len(tensors), 1, norm_type, backend, process_group,
                                error_if_nonfinite, "segclip.total_norm")
    return as_result(total, local)


def clip_with_norm_(grads: list[Tensor], max_norm: float, total_norm: Tensor | float, backend: str) -> None:
    """segclip.clip_with_norm_ for DTensor gradients: every rank scales its shards by one coefficient.

    A DTensor ``total_norm`` that is not replicated (a ``Partial`` from a hand-written reduction) is
    reduced first with ``full_tensor()``, a collective, as torch's own ``clip_grads_with_norm_`` does.
    """
    if any_dtensor(grads):
        local = localize(grads, [0] * len(grads), None, "segclip.clip_with_norm_")
    else:  # plain gradients, a DTensor norm
        local = _Local(grads, [0] * len(grads), grads, None, [], None)
    if not local.scaled:
        return
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()
    if not isinstance(total_norm, Tensor):
        dtype = norm_math.accumulate_dtype(t.dtype for t in local.scaled)
        device = local.scaled[0].device if local.scaled else torch.device("cpu")
        total_norm = torch.tensor(float(total_norm), device=device, dtype=dtype)
    if total_norm.numel() != 1:
        raise ValueError(f"total_norm must hold one value, got shape {tuple(total_norm.shape)}")
    with torch.no_grad():
        if local.scaled:
            partials.scale_(local.scaled, norm_math.clip_coefficient(total_norm.reshape(()), max_norm), backend)
