"""``segclip train --fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer.

What this module holds, and why each piece is needed:

* :func:`shard_model`: one FSDP unit per backbone block (a ResNet's bottleneck, a MobileNetV3
  inverted-residual block) and per head, then the root. A unit's parameters are all-gathered just
  before its forward and freed after it, so a rank holds one unit's full weights at a time beside
  its shards; the gradients are reduce-scattered (averaged over ranks, as DDP averages them).
* :func:`full_state_dicts` / :func:`load_state_dicts`: checkpoints hold the *full* (unsharded)
  model and optimizer state, gathered to rank 0 on the CPU with torch's
  ``torch.distributed.checkpoint.state_dict`` API (``full_state_dict=True, cpu_offload=True``),
  with the optimizer state keyed by parameter index as ``torch.optim.Optimizer.state_dict()`` keys
  it. So a file written under ``--fsdp`` is a plain segclip checkpoint: ``segclip eval``,
  ``predict``, ``--weights`` and a 1-process or DDP ``--resume`` load it as they load any other, and
  an ``--fsdp`` resume loads a file written without it.
* :func:`forward_count` / :func:`pad_forwards`: under FSDP every forward is a collective (each
  unit all-gathers its weights), so every rank must make the same number of forward calls.
  Evaluation gives the ranks disjoint shards of the validation set, which differ in size when the
  world size does not divide it; the ranks agree on the largest batch count first (one all-reduce,
  before any forward), and those with fewer batches then run forwards on a dummy batch, outputs
  dropped, until they have made as many as the busiest rank.

Under ``--fsdp`` the gradients are DTensors, so (docs/training.md, "Sharded training"):
``--clip fused`` goes through segclip's DTensor path (local kernel, one all-reduce: every rank gets
the global norm), and ``segclip.clip_optimizer_`` cannot fold a DTensor gradient into the fused
step, so it takes its plain path and the step records say ``clip_path: plain``; torch's fused SGD
has no DTensor implementation (``aten._fused_sgd_`` has no sharding strategy in torch 2.14), so SGD
runs as ``foreach`` (AdamW keeps ``fused``); ``segclip.adaptive_clip_`` (AGC) clips the rows of
>= 2-d parameters on each rank's shards (dim-0 sharding keeps them whole) and reduces the norms of
the 1-d ones, whole-tensor units that FSDP splits, over the mesh; fp16 with a GradScaler
(``--amp`` on CUDA) needs nothing more: torch 2.14's ``GradScaler.unscale_`` reduces ``found_inf``
over the DTensor gradients' mesh (``found_inf_reduce_handler`` in torch/distributed/tensor/_dispatch.py),
so every rank skips the same steps and keeps the same loss scale.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

def ensure_process_group(device: torch.device) -> bool:
    """For ``--fsdp`` without torchrun: a process group of one (a mesh of one rank: nothing is
    sharded, the code path is the sharded one). Returns True when it created the group."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return True


def _has_params(m: torch.nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The submodules that become FSDP units: each block of the backbone (the blocks of a ResNet's
    ``layer1`` .. ``layer4``; every child of a MobileNetV3 backbone that holds parameters), the
    classifier and the auxiliary classifier. What is left (a ResNet's stem) goes with the root."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    units = []
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        for name, child in backbone.named_children():
            if isinstance(child, torch.nn.Sequential) and len(child) and all(
                    isinstance(b, (BasicBlock, Bottleneck)) for b in child):
                units += [(f"backbone.{name}.{i}", b) for i, b in enumerate(child)]
            elif _has_params(child) and not isinstance(child, (torch.nn.Conv2d, torch.nn.modules.batchnorm._BatchNorm)):
                units.append((f"backbone.{name}", child))
    for head in ("classifier", "aux_classifier"):
        child = getattr(model, head, None)
        if isinstance(child, torch.nn.Module) and _has_params(child):
            units.append((head, child))
    return units


def shard_model(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Applies ``fully_shard`` to each unit of :func:`_blocks`, then to ``model`` (the root), on a
    1-d mesh of every rank. ``model`` is changed in place (FSDP2 swaps its class); its parameters
    become DTensors sharded on dim 0. Returns the units' names (root last)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = _blocks(model)
    for _, module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return [name for name, _ in units] + ["(root)"]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the module inside a torch.compile wrapper) is an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    model = getattr(model, "_orig_mod", model)
    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of ``optimizer``'s parameters, in the order its ``state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)]


def _ids_from_fqns(osd: dict, fqns: list[str]) -> dict:
    index = {n: i for i, n in enumerate(fqns)}
    return {"state": {index[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]]}


def _fqns_from_ids(sd: dict, fqns: list[str]) -> dict:
    return {"state": {fqns[int(k)]: v for k, v in sd["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full model and optimizer state dicts, on the CPU, on rank 0 (empty dicts elsewhere).

    A collective: every rank must call it. The optimizer's state is keyed as
    ``optimizer.state_dict()`` keys it (parameter indices), so the file loads without FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _options(cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not model_sd:  # not rank 0
        return {}, {}
    return dict(model_sd), _ids_from_fqns(optim_sd, _param_fqns(model, optimizer))


def load_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict,
                     optim_sd: dict | None) -> None:
    """Loads full (unsharded) state dicts, as :func:`full_state_dicts` or a run without FSDP saved
    them, into the sharded ``model`` and ``optimizer``: each rank keeps its shards. Every rank must
    call it, each with the full dicts (every rank reads the checkpoint file)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_options())
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, _fqns_from_ids(optim_sd, _param_fqns(model, optimizer)),
                                 options=_options())


def forward_count(model: torch.nn.Module, own: int, device: torch.device) -> int:
    """The number of forward calls every rank must make in an evaluation: the largest ``own`` (this
    rank's number of batches) over the ranks when ``model`` is sharded (one all-reduce, made before
    any forward: a rank that is still in a forward would not answer it), else ``own``."""
    if not (is_sharded(model) and dist.is_initialized() and dist.get_world_size() > 1):
        return own
    count = torch.tensor([own], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def pad_forwards(model: torch.nn.Module, missing: int, example: torch.Tensor | None, device: torch.device,
                 size: int) -> None:
    """Runs ``missing`` dummy forwards, outputs dropped (see the module doc), on the first image of
    ``example`` (one of this rank's batches), or on a ``1 x 3 x size x size`` zero image when this
    rank's shard was empty. The caller sets eval mode, ``no_grad`` and autocast."""
    if missing <= 0:
        return
    dummy = example[:1] if example is not None else torch.zeros(1, 3, size, size, device=device)
    for _ in range(missing):
        model(dummy)
