"""One training epoch: forward (optionally under autocast), backward, clipping, optimizer step.

Per step, in order:

1. data: wait for the batch and copy it to the device;
2. forward: the model and the loss (cross-entropy, + 0.5 x the aux head's where there is one);
3. backward: ``scaler.scale(loss).backward()`` (the scaler is a no-op unless fp16 on CUDA);
4. clip: ``--clip fused``: ``segclip.clip_optimizer_(optimizer, scaler=scaler)``, which replaces
   ``unscale_`` + clip; with torch's fused optimizer (the default where it exists) only the norm is
   computed here and the clip is folded into the optimizer step, so the clip's write shows in
   ``step`` (docs/fold.md; which path ran is ``clip_path`` in every step record and epoch summary).
   Otherwise ``scaler.unscale_(optimizer)`` first, so clipping always sees the true gradients, then
   ``torch.nn.utils.clip_grad_norm_`` (``torch``) or only the norm (``none``: ``segclip.total_norm``,
   for the log and the non-finite check). Wherever segclip computes the norm (``fused`` and
   ``none``, and the value/AGC modes' logged norm) the norm of each top-level module (``backbone``,
   ``classifier``, ``aux_classifier``) comes from the same pass (``clip_optimizer_(groups=...)``,
   ``segclip.group_norms``) and is logged as ``group_norms``; ``torch`` and the auto/zscore
   clippers log none (they would need an extra pass);
5. step: when the loss and the norm are finite, ``scaler.step(optimizer)``; otherwise the step is
   skipped and counted, and after ``max_nonfinite`` consecutive skips :class:`NonFiniteStop` is
   raised. Then ``scaler.update()`` and the LR schedule's per-iteration step.

Host synchronisation: the loss and the norm are read once per step (one small device-to-host copy,
needed to decide whether to skip, to log, and to show on the progress bar). Per-phase timings on
CUDA need ``torch.cuda.synchronize()`` at every phase boundary, which stalls the launch queue
(typically a few percent of throughput); that happens only with ``sync_timing=True``. Without
it, CUDA phase times are the host's launch times, not the GPU's. CPU ops are synchronous, so CPU
timings are exact and cost nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import segclip
from segclip.distributed import is_dtensor

from . import distributed as dist_utils
from .models import segmentation_loss
from .palette import VOID
from .runlog import PHASES

CLIP_MODES = ("fused", "torch", "none")
# What is clipped (--clip-mode): the total norm, each element, each unit (AGC), or the norm to a bound
# that follows its history (AutoClip, ZClip; their state is in TrainState and so in the checkpoint).
CLIP_KINDS = ("norm", "value", "agc", "auto", "zscore")


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class StepConfig:
    device: torch.device
    clip: str = "fused"
    max_norm: float = 1.0
    norm_type: float = 2.0
    amp: bool = False
    sync_timing: bool = False
    max_nonfinite: int = 20
    channels_last: bool = False  # input batches in channels_last (the model is converted by the caller)
    clip_mode: str = "norm"
    clip_value: float = 1.0
    clip_factor: float = 0.01
    clipper: object = None  # segclip.AutoClip / ZClip for clip_mode auto / zscore
    # --clip fused steps through clip_optimizer_ (the clip folded into the optimizer step where it can
    # be); False: fused_clip_, then the step (the train benchmark's fused_clip mode)
    optimizer_clip: bool = True

    def norm_bounded(self) -> bool:
        """Whether a norm above max_norm means this step was clipped (for the log)."""
        return self.clip != "none" and self.clip_mode == "norm"

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16


@dataclass
class TrainState:
    """Counters that live across epochs (and in the checkpoint)."""

    step: int = 0               # optimizer iterations done (skipped ones included)
    skipped_total: int = 0      # steps skipped for a non-finite loss or norm
    consecutive_nonfinite: int = 0
    clipper: object = None      # AutoClip / ZClip: its history resumes with the run

    def to_dict(self) -> dict:
        return {"step": self.step, "skipped_total": self.skipped_total,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "clipper": None if self.clipper is None else self.clipper.state_dict()}


@dataclass
class EpochSummary:
    epoch: int
    steps: int = 0
    skipped: int = 0
    clipped: int = 0
    loss_sum: float = 0.0
    norms: list = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    phase_seconds: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    clip_path: str | None = None  # --clip fused: segclip.fold.fold_path's answer; else the clip mode
    foreground_pixels: int = 0  # training pixels of a class >= 1 (not void), all ranks (approximate when large)
    stopped: bool = False       # the epoch stopped early: a stop was requested (see segclip.train.interrupt)

    def state(self) -> dict:
        """The partial epoch as plain values (a mid-epoch checkpoint holds it); see :meth:`from_state`."""
        return {"epoch": self.epoch, "steps": self.steps, "skipped": self.skipped, "clipped": self.clipped,
                "loss_sum": self.loss_sum, "norms": list(self.norms), "images": self.images,
                "seconds": self.seconds, "phase_seconds": dict(self.phase_seconds),
                "foreground_pixels": self.foreground_pixels}

    @classmethod
    def from_state(cls, state: dict) -> "EpochSummary":
        return cls(**{k: (list(v) if k == "norms" else dict(v) if k == "phase_seconds" else v)
                      for k, v in state.items()})

    def to_dict(self) -> dict:
        finite = self.steps - self.skipped
        norms = sorted(self.norms)
        return {
            "epoch": self.epoch + 1, "steps": self.steps, "skipped": self.skipped, "clipped": self.clipped,
            "clipped_share": self.clipped / finite if finite else None,
            "train_loss": self.loss_sum / finite if finite else None,
            "grad_norm_median": norms[len(norms) // 2] if norms else None,
            "images": self.images, "seconds": self.seconds,
            "images_per_second": self.images / self.seconds if self.seconds > 0 else None,
            "phase_seconds": dict(self.phase_seconds), "clip_path": self.clip_path,
        }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def module_groups(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """The trainable parameters by top-level module (``backbone``, ``classifier``, ``aux_classifier``
    for torchvision's segmentation models): the groups whose norms the step records log."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in dist_utils.unwrap(model).named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split(".", 1)[0], []).append(p)
    return groups


def clip_gradients(params: list[torch.Tensor], cfg: StepConfig,
                   groups: dict[str, list[torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The total gradient norm before clipping, clipping in place unless ``cfg.clip == 'none'``, and
    (given ``groups``) each group's norm where segclip computes the norm, from the same pass (a 1-D
    tensor in ``groups`` order), else None."""
    if cfg.clip != "none" and cfg.clip_mode != "norm":
        return _clip_other(params, cfg, groups)
    if cfg.clip == "fused":
        return segclip.fused_clip_(params, cfg.max_norm, cfg.norm_type), None
    if cfg.clip == "torch":
        return torch.nn.utils.clip_grad_norm_(params, cfg.max_norm, cfg.norm_type), None
    if cfg.clip == "none":
        return _norms(params, cfg, groups)
    raise ValueError(f"unknown clip mode {cfg.clip!r}; choose one of {CLIP_MODES}")


def _norms(params: list[torch.Tensor], cfg: StepConfig, groups) -> tuple[torch.Tensor, torch.Tensor | None]:
    if groups is None:
        return segclip.total_norm([p.grad for p in params if p.grad is not None], cfg.norm_type), None
    norms = segclip.group_norms(groups, cfg.norm_type)
    return norms.total, norms.norms


def _clip_other(params: list[torch.Tensor], cfg: StepConfig, groups) -> tuple[torch.Tensor, torch.Tensor | None]:
    """--clip-mode value / agc / auto / zscore; the norm returned is the one before clipping."""
    if cfg.clip_mode in ("auto", "zscore"):
        return cfg.clipper(params), None
    norm, group_norms = _norms(params, cfg, groups)
    if cfg.clip_mode == "value":
        clip_value = segclip.clip_grad_value_ if cfg.clip == "fused" else torch.nn.utils.clip_grad_value_
        clip_value(params, cfg.clip_value)
    elif cfg.clip_mode == "agc":
        segclip.adaptive_clip_(params, cfg.clip_factor, backend="auto" if cfg.clip == "fused" else "torch")
    else:
        raise ValueError(f"unknown clip mode {cfg.clip_mode!r}; choose one of {CLIP_KINDS}")
    return norm, group_norms


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, cfg: StepConfig, epoch: int,
                    state: TrainState, on_step: Callable[[dict], None] | None = None,
                    progress=None, stop=None, summary: EpochSummary | None = None,
                    start_iter: int = 0) -> EpochSummary:
    """Trains one pass over ``loader``; calls ``on_step(record)`` after every step (every rank).

    ``progress``: a tqdm-like bar (``update``, ``set_postfix``) or None.
    ``stop``: a :class:`segclip.train.interrupt.StopSignal` (or None); ``stop.in_step`` is set while
    a step runs. Once ``stop.requested`` holds on any rank (it rides along the step's all-reduce),
    the epoch ends after that step with ``summary.stopped`` set.
    ``summary``, ``start_iter``: continue a partial epoch (a resume from a mid-epoch checkpoint;
    ``loader`` then yields only the remaining batches).

    Raises:
        NonFiniteStop: ``cfg.max_nonfinite`` consecutive steps were skipped.
    """
    model.train()
    device = cfg.device
    params = [p for p in model.parameters() if p.requires_grad]
    groups = module_groups(model)
    world = dist.get_world_size() if dist_utils.is_distributed() else 1
    sync = (lambda: torch.cuda.synchronize(device)) if (device.type == "cuda" and cfg.sync_timing) \
        else (lambda: None)
    summary = summary if summary is not None else EpochSummary(epoch)
    start = time.perf_counter()
    seconds_before = summary.seconds
    mark = start
    for it, (images, masks) in enumerate(loader, start=start_iter):
        if stop is not None:
            stop.in_step = True  # until the step's end the weights, optimizer and schedule disagree
        images = images.to(device, non_blocking=True,
                           memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        masks = masks.to(device, non_blocking=True)
        sync()
        times = {}
        now = time.perf_counter(); times["data"] = now - mark; mark = now

        with torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp):
            outputs = model(images)
        loss = segmentation_loss(outputs, masks)
        sync()
        now = time.perf_counter(); times["forward"] = now - mark; mark = now

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        sync()
        now = time.perf_counter(); times["backward"] = now - mark; mark = now

        if cfg.clip == "fused" and cfg.clip_mode == "norm" and cfg.optimizer_clip:  # unscale_ + clip folded into a fused step
            if summary.clip_path is None:
                summary.clip_path = segclip.fold.fold_path(optimizer, scaler=scaler, norm_type=cfg.norm_type)
            result = segclip.clip_optimizer_(optimizer, cfg.max_norm, scaler=scaler, norm_type=cfg.norm_type,
                                             groups=groups)
            norm, group_norms = result.total, result.norms
        else:
            summary.clip_path = cfg.clip
            scaler.unscale_(optimizer)  # clipping sees unscaled gradients (no-op without fp16)
            norm, group_norms = clip_gradients(params, cfg, groups)
        if is_dtensor(norm):  # --fsdp: replicated on the mesh; its local value is the global norm
            norm = norm.to_local()
        if is_dtensor(group_norms):
            group_norms = group_norms.to_local()
        sync()
        now = time.perf_counter(); times["clip"] = now - mark; mark = now

        # The one host sync of the step. Under DDP the gradients (so the norm) already agree;
        # the loss is averaged so that every rank takes the same skip decision and logs the same.
        # The count of foreground pixels rides along (binary 0/255 masks have none: all void).
        foreground = ((masks > 0) & (masks != VOID)).sum().float().to(loss.device)
        stopping = torch.tensor(float(stop is not None and stop.requested), device=loss.device)
        pair = torch.stack([loss.detach().float(), norm.detach().float().to(loss.device), foreground, stopping])
        if group_norms is not None:  # the groups' norms ride along (like the norm, the same on every rank)
            pair = torch.cat([pair, group_norms.detach().float().to(loss.device)])
        if world > 1:
            dist_utils.all_reduce_sum(pair)
            pair[:2] /= world
            pair[4:] /= world
        loss_value, norm_value, foreground_value, stop_votes, *group_values = pair.tolist()
        summary.foreground_pixels += int(foreground_value)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        lr = optimizer.param_groups[0]["lr"]
        if finite:
            scaler.step(optimizer)
            state.consecutive_nonfinite = 0
        else:
            state.skipped_total += 1
            state.consecutive_nonfinite += 1
            summary.skipped += 1
        scaler.update()
        scheduler.step()
        sync()
        now = time.perf_counter(); times["step"] = now - mark; mark = now

        state.step += 1
        clipped = finite and cfg.norm_bounded() and norm_value > cfg.max_norm
        summary.steps += 1
        summary.images += images.shape[0] * world
        if finite:
            summary.loss_sum += loss_value
            summary.norms.append(norm_value)
            summary.clipped += int(clipped)
        for k, v in times.items():
            summary.phase_seconds[k] += v
        record = {
            "step": state.step, "epoch": epoch + 1, "iter": it, "lr": lr,  # logs count epochs from 1
            "loss": _finite_or_none(loss_value), "grad_norm": _finite_or_none(norm_value),
            "clipped": bool(clipped), "skipped": not finite, "batch": images.shape[0],
            "clip_path": summary.clip_path,
            **({"group_norms": {k: _finite_or_none(v) for k, v in zip(groups, group_values)}}
               if group_norms is not None else {}),
            **{f"t_{k}": v for k, v in times.items()},
        }
        if on_step is not None:
            on_step(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", norm=f"{norm_value:.3g}",
                                 lr=f"{lr:.2e}", refresh=False)
        if stop is not None:
            stop.in_step = False
            if stop_votes > 0 or (world == 1 and stop.requested):  # under DDP the vote alone: same step everywhere
                summary.stopped = True
                break
        if state.consecutive_nonfinite >= cfg.max_nonfinite:
            summary.seconds = seconds_before + time.perf_counter() - start
            raise NonFiniteStop(
                f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient norm "
                f"(last: loss {loss_value}, grad norm {norm_value}) at epoch {epoch + 1}, step {state.step}; "
                f"stopping")
    summary.seconds = seconds_before + time.perf_counter() - start
    return summary
