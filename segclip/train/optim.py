"""The optimizer (SGD with momentum, or AdamW; torch's fused implementation where this device has
one) and the learning-rate schedule (linear warmup, then poly decay), stepped every iteration."""

from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adamw")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (1-d tensors), as usual for these models."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def fused_supported(device: torch.device) -> bool:
    """Whether torch has fused optimizer kernels for this device type."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # a torch without the helper: try it
        return True


def build_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    device: torch.device, fused: bool = True, log=print) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and which implementation it uses (``fused``, ``foreach``).

    ``fused=True`` asks for torch's fused kernels; when this device has none (or constructing one
    fails), a note is logged and the multi-tensor ``foreach`` implementation is used.
    """
    groups = _param_groups(model, weight_decay)
    if name == "sgd":
        make = lambda **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum, **kw)  # noqa: E731
    elif name == "adamw":
        make = lambda **kw: torch.optim.AdamW(groups, lr=lr, **kw)  # noqa: E731
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if fused:
        if fused_supported(device):
            try:
                return make(fused=True), "fused"
            except (RuntimeError, ValueError, TypeError) as exc:
                log(f"note: fused {name} is not available here ({exc}); using foreach")
        else:
            log(f"note: torch has no fused {name} kernel for {device.type}; using foreach")
    return make(foreach=True), "foreach"


class PolyWarmup:
    """The LR factor at iteration ``it``: linear from ``warmup_factor`` to 1 over ``warmup`` iterations,
    then ``(1 - progress) ** power`` down to 0 at ``total``. A plain object, so ``LambdaLR`` saves its
    fields in its state dict."""

    def __init__(self, total: int, warmup: int = 0, power: float = 0.9, warmup_factor: float = 0.001):
        self.total = max(int(total), 1)
        self.warmup = max(min(int(warmup), self.total - 1), 0)
        self.power = float(power)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            alpha = it / self.warmup
            return self.warmup_factor * (1 - alpha) + alpha
        progress = (it - self.warmup) / max(self.total - self.warmup, 1)
        return max(1.0 - progress, 0.0) ** self.power


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int,
                    power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyWarmup(total_iters, warmup_iters, power))


def load_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer,
                  saved: dict, position: int) -> str | None:
    """Restores a checkpoint's LR schedule into ``scheduler`` (built from this run's arguments).

    When the saved schedule is the one this run would build (same total and warmup steps, power,
    peak LR), the saved state is loaded as it is, and a resumed run replays the original exactly.
    Otherwise (a resume with another ``--epochs``, batch size, steps per epoch, warmup or ``--lr``)
    the schedule of this run's arguments is kept and moved to step ``position`` (the completed
    epochs times this run's steps per epoch), the optimizer's LR set to its value there, and a note
    describing the change is returned (None when nothing changed).
    """
    fresh = [dict(vars(fn)) for fn in scheduler.lr_lambdas]
    fresh_base = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    old = [dict(vars(fn)) for fn in scheduler.lr_lambdas]
    old_base = list(scheduler.base_lrs)
    if old == fresh and old_base == fresh_base and scheduler.last_epoch == position:
        return None
    for fn, values in zip(scheduler.lr_lambdas, fresh):
        vars(fn).update(values)
    scheduler.base_lrs = fresh_base
    scheduler.last_epoch = position
    for group, base, fn in zip(optimizer.param_groups, fresh_base, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(position)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    was, now = old[0], fresh[0]
    changes = [f"{label} {was[key]} -> {now[key]}" for key, label in
               (("total", "total steps"), ("warmup", "warmup steps"), ("power", "poly power"))
               if was.get(key) != now.get(key)]
    if old_base[:1] != fresh_base[:1]:
        changes.append(f"peak lr {old_base[0]:g} -> {fresh_base[0]:g}")
    if not changes:
        changes.append(f"position step {saved.get('last_epoch')} -> {position}")
    return (f"resume: the LR schedule follows this run's arguments ({', '.join(changes)}); it continues "
            f"at step {position} of {now['total']} with lr {scheduler._last_lr[0]:.4g}")
