"""torchrun / DDP set-up and the few collectives the trainer needs.

``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE (and MASTER_ADDR/PORT); when they are absent the run
is a single process and every helper here is a no-op. The backend is nccl for CUDA, gloo for CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(device_arg: str) -> torch.device:
    """The device ``--device`` names: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or
    ``cuda:N``.

    Raises:
        ValueError: not a device name, or a CUDA device this machine does not have (one line for
            the command line, instead of torch's traceback).
    """
    text = str(device_arg).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device_arg}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device_arg}: not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'built without CUDA' if torch.version.cuda is None else 'no visible GPU'}); "
                             f"use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device_arg}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def setup(device_arg: str) -> tuple[DistInfo, torch.device]:
    """Initialises the process group when launched by torchrun; picks this process's device.

    ``device_arg``: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Under
    torchrun with CUDA, each process takes ``cuda:LOCAL_RANK``.
    """
    device = pick_device(device_arg)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return DistInfo(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return DistInfo(rank, local_rank, world), device


def is_distributed() -> bool:
    """True inside an initialised process group (torchrun), False for one process."""
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums ``t`` over ranks in place (no-op for one process) and returns it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` and/or DDP wrapper (or the model itself)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
