"""``segclip train``: data, model, optimizer, the epoch loop, evaluation, checkpoints and resume.

Resume restores model, optimizer, LR schedule, grad scaler, epoch, step counters and every RNG
state (python, numpy, torch CPU and CUDA, per rank), and continues at the epoch after the one the
checkpoint closed. Because the sampler order and each sample's augmentation are functions of
(seed, epoch, index) (see segclip.train.data), the resumed run sees exactly the batches the
uninterrupted run would have seen; with ``--deterministic`` and the same number of threads it ends
with the same weights.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import segclip

from . import checkpoint as ckpt_io
from . import distributed as dist_utils
from . import fsdp as fsdp_utils
from .data import DataError, absolute_path, open_split, eval_loader, resolve_data, train_loader
from .engine import EpochSummary, NonFiniteStop, StepConfig, TrainState, train_one_epoch
from .interrupt import StopSignal, exit_status
from .evaluate import evaluate
from .metrics import format_table
from .models import build_model, load_weights
from .optim import build_optimizer, build_scheduler, load_schedule
from .palette import VOID, class_names
from .runlog import CONFIG, EPOCHS, METRICS, PHASES, STEPS, RunLog, default_run_dir
from .transforms import eval_transforms, train_transforms

CHECKPOINT_FORMAT = "segclip-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: ``position`` (a mid-epoch checkpoint); version 1 files load as epoch ends
EXIT_NONFINITE = 3


# Arguments a resumed run never takes from its checkpoint: where and how it runs, not what it trains.
NOT_RESUMED = ("resume", "out", "runs_root", "no_progress", "no_plot", "device", "weights")


def plain_args(args: argparse.Namespace) -> dict:
    """The arguments as plain values (what checkpoints and config.json hold)."""
    out = {}
    for k, v in vars(args).items():
        if callable(v) or k.startswith("_"):
            continue
        out[k] = str(v) if isinstance(v, Path) else v
    return out


def resume_args(args: argparse.Namespace, saved: dict, log) -> None:
    """Takes the checkpoint's value for every option not typed on this command line, so
    ``segclip train --resume RUN/last.pt`` continues the run as it was started. What was typed
    wins, even when it equals the parser's default (``--epochs 10``, ``--no-deterministic``).
    Options in :data:`NOT_RESUMED`, and those the checkpoint does not know (added since), keep
    this command line's values."""
    from .options import typed

    known = getattr(args, "_dests", None)
    given = typed(args)
    taken = []
    for key, value in saved.items():
        if key in NOT_RESUMED or key in given or key.endswith("_resolved") or not hasattr(args, key):
            continue
        if known is not None and key not in known:
            continue
        if getattr(args, key) != value:
            setattr(args, key, value)
            taken.append(f"--{key.replace('_', '-')} {value}")
    if taken:
        log(f"resume: from the checkpoint's arguments: {', '.join(taken)}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Printer:
    """Prints on rank 0 only, without breaking a tqdm bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, *parts) -> None:
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
            sys.stdout.flush()


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def check_args(args: argparse.Namespace) -> None:
    """Refuses values that would fail later with a less clear error: each option's own check
    (declared with the option in segclip.train.cli, see segclip.train.options) and the checks that
    involve several options."""
    from .options import check_options

    check_options(args)
    if not args.scale_min <= args.scale_max:
        raise ValueError(f"need 0 < --scale-min <= --scale-max, got {args.scale_min} and {args.scale_max}")
    if args.model.startswith("deeplabv3_") and args.batch_size < 2:
        raise ValueError(f"--model {args.model} needs --batch-size 2 or more (images per process): the "
                         f"image-pooling branch of its ASPP head applies BatchNorm to a 1x1 map, and "
                         f"BatchNorm in training needs more than one value per channel")


def check_run_folder(args: argparse.Namespace) -> list[str]:
    """Refuses an ``--out`` folder that already holds another run: its logs would be appended to
    (steps 1, 2, 1, 2) and its plots would mix two runs.

    * Without ``--resume``: a folder with ``last.pt`` (a completed epoch) is refused; a folder with
      logs but no ``last.pt`` (a run stopped during its first epoch: nothing to resume) is reused,
      and the names of its log files to replace are returned (the caller removes them).
    * With ``--resume CKPT`` and an ``--out`` other than CKPT's folder: refused when ``--out``
      already holds a run (``steps.jsonl`` or ``last.pt``); an empty or new ``--out`` starts a copy
      of the run there.
    """
    if not args.out:
        return []
    out = Path(args.out)
    held = [name for name in (STEPS, "last.pt") if (out / name).exists()]
    if not held:
        return []
    if args.resume:
        home = Path(args.resume).parent
        if os.path.abspath(out) == os.path.abspath(home):
            return []
        raise ValueError(f"--out {out} already holds another run ({', '.join(held)}), and --resume "
                         f"{args.resume} continues the run in {home}; leave out --out to continue it "
                         f"there, or choose an --out that holds no run")
    if "last.pt" in held:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); continue it with "
                         f"--resume {out / 'last.pt'}, or choose another --out (or delete the folder)")
    return [name for name in (STEPS, EPOCHS, METRICS) if (out / name).exists()]


def make_clipper(args):
    """The stateful clipper of --clip-mode auto / zscore (None for the other modes)."""
    if args.clip == "none":
        return None
    if args.clip_mode == "auto":
        return segclip.AutoClip(args.clip_percentile)
    if args.clip_mode == "zscore":
        return segclip.ZClip(z_thresh=args.z_thresh)
    return None


def state_dicts(model, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts as a checkpoint holds them: full (unsharded, on
    the CPU, optimizer state keyed by parameter index) under --fsdp, where gathering them is a
    collective that every rank must call (rank 0 gets them, the others empty dicts)."""
    if fsdp_utils.is_sharded(model):
        return fsdp_utils.full_state_dicts(dist_utils.unwrap(model), optimizer)
    return dist_utils.unwrap(model).state_dict(), optimizer.state_dict()


def make_checkpoint(states: tuple[dict, dict], scheduler, scaler, epoch: int, state: TrainState, best_miou,
                    metrics_summary: dict | None, args, rng_states: list, world: int,
                    stopped: str | None = None, position: dict | None = None) -> dict:
    """Everything a resume needs; only tensors and plain values (loads with weights_only=True).
    ``states``: what :func:`state_dicts` returned (the model's and the optimizer's).
    ``stopped``: why the run stopped mid-epoch (such a file is for inspection, not for resuming).
    ``position``: for a run interrupted in the middle of epoch ``epoch + 1`` (see
    segclip.train.interrupt), ``{"epoch": 0-based epoch, "iter": steps done in it, "batch_size",
    "world_size", "summary": the partial EpochSummary}``; a resume continues with the next step."""
    return {
        "stopped": stopped,
        "position": position,
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_name": args.model, "num_classes": args.num_classes,
        "crop_size": args.crop_size_resolved, "eval_size": args.eval_size_resolved,
        "model": states[0],
        "optimizer": states[1],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,                      # the last completed epoch
        "train_state": state.to_dict(),
        "best_miou": best_miou,
        "metrics": metrics_summary,
        "args": plain_args(args),
        "rng": rng_states,                   # one entry per rank
        "world_size": world,
        "sampler": {"seed": args.seed, "next_epoch": epoch + 1},
        "torch_version": str(torch.__version__),
    }


def apply_hyperparameters(optimizer: torch.optim.Optimizer, args) -> str | None:
    """After loading a checkpoint's optimizer state: sets this run's ``--weight-decay`` (on the
    decayed group; biases and norm weights keep 0) and, for SGD, ``--momentum``, which the loaded
    param_groups would otherwise override. Returns a note of what changed (None: nothing)."""
    changes = []
    group = optimizer.param_groups[0]
    if group["weight_decay"] != args.weight_decay:
        changes.append(f"weight decay {group['weight_decay']:g} -> {args.weight_decay:g}")
    group["weight_decay"] = args.weight_decay
    if "momentum" in group:
        if group["momentum"] != args.momentum:
            changes.append(f"momentum {group['momentum']:g} -> {args.momentum:g}")
        for g in optimizer.param_groups:
            g["momentum"] = args.momentum
    if changes:
        return f"resume: the optimizer follows this run's arguments ({', '.join(changes)})"
    return None


def _metric_summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("pixel_accuracy", "mean_iou", "iou")}


def _nonfinite_stop(exc: NonFiniteStop, run_dir: Path, checkpoint: dict, is_main: bool, runlog) -> int:
    """Writes ``nonfinite.pt`` (for inspection) and says, in one message, what to change."""
    path = run_dir / "nonfinite.pt"
    runlog.close()
    if is_main:
        ckpt_io.atomic_save(checkpoint, path)
    dist_utils.barrier()  # no rank exits (and has torchrun end the others) before the file is written
    if not is_main:
        return EXIT_NONFINITE
    last = run_dir / "last.pt"
    kept = (f"{last} holds the last saved state (resume with --resume {last})" if last.exists()
            else "no epoch was completed, so there is no last.pt to resume from")
    print(f"segclip train: error: {exc}. The weights at this point are in {path} (for inspection); {kept}. "
          f"Lower --lr, enable clipping (--clip fused) or lower --max-norm, or check the data.", file=sys.stderr)
    return EXIT_NONFINITE


def _interrupted(exc: BaseException, stop: StopSignal, summary, epoch: int, state, run_dir: Path, runlog,
                 info, save_position) -> int:
    """The end of a run stopped by SIGINT/SIGTERM: last.pt at the current step when the state is
    consistent (between steps: always, unless a second Ctrl-C broke into a step), then one line."""
    signum = stop.signum or getattr(exc, "signum", None) or signal.SIGINT
    runlog.close()
    last = run_dir / "last.pt"
    if summary is not None and not stop.in_step:
        stop.signum = signum
        stop.deferring = True  # the SIGTERM that torchrun or a scheduler sends next waits for the save
        try:
            save_position(epoch, summary)
        finally:
            stop.deferring = False
        note = " (saved at this step)"
    elif last.exists():
        note = " (inside a step: the steps since the last save are lost)"
    else:
        note = " (inside a step, before the first save: nothing to resume)"
    if info.is_main:
        resume = f"; resume with: segclip train --resume {last}" if last.exists() else ""
        print(f"segclip train: interrupted at epoch {epoch + 1} step {state.step}{note}{resume}", file=sys.stderr)
    return exit_status(signum)


def run(args: argparse.Namespace) -> int:
    info, device = dist_utils.setup(args.device)
    try:
        return _train(args, info, device)
    finally:
        dist_utils.cleanup()


def _train(args, info: dist_utils.DistInfo, device: torch.device) -> int:
    log = _Printer(info.is_main)
    for key in ("out", "resume", "weights"):
        setattr(args, key, absolute_path(getattr(args, key)))
    replace_logs = check_run_folder(args)
    resume = None
    if args.resume:
        resume = ckpt_io.load(args.resume)
        if resume.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume: {args.resume} is not a segclip training checkpoint")
        if resume.get("stopped"):
            raise ValueError(f"--resume: {args.resume} holds the weights where the run stopped "
                             f"({resume['stopped']}), in the middle of an epoch; resume from last.pt "
                             f"in the same folder (the last completed epoch)")
        resume_args(args, resume.get("args", {}), log)
    check_args(args)  # after resume_args: the values this run will use
    if args.clip != "none" and args.max_norm == 0:
        log("warning: --max-norm 0 scales every gradient to zero: the weights change only through "
            "weight decay; give a positive --max-norm, or --clip none")
    position = None
    if resume is not None:
        done = int(resume["epoch"]) + 1
        position = resume.get("position")
        if position is not None and (position["batch_size"] != args.batch_size
                                     or position["world_size"] != info.world):
            raise ValueError(f"--resume: {args.resume} was interrupted in the middle of epoch "
                             f"{position['epoch'] + 1} with --batch-size {position['batch_size']} on "
                             f"{position['world_size']} process(es); resume it with the same batch size "
                             f"and number of processes (this run: --batch-size {args.batch_size}, "
                             f"{info.world}), and change them once that epoch has ended")
        if done >= args.epochs:  # before anything is read or written
            log(f"nothing left to train ({done} epoch{'s' if done != 1 else ''} done, --epochs "
                f"{args.epochs}); the run folder is left as it is. Give a larger --epochs to train on.")
            return 0
        saved_opt = resume.get("args", {}).get("optimizer")
        if saved_opt and saved_opt != args.optimizer:
            raise ValueError(f"--optimizer {args.optimizer}: {args.resume} was trained with {saved_opt}, "
                             f"whose state cannot continue as {args.optimizer}; resume with --optimizer "
                             f"{saved_opt}, or start a new run from its weights with --weights {args.resume}")
    if args.fsdp and not dist_utils.is_distributed():
        fsdp_utils.ensure_process_group(device)  # run() destroys it at the end
        log("note: --fsdp on one process (not launched by torchrun): FSDP on a mesh of one, nothing is "
            "sharded; launch with torchrun --nproc-per-node N to shard over N processes")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    t_start = time.perf_counter()

    # Data
    loc, crop, eval_size = resolve_data(args, info.is_main, log)
    args.crop_size_resolved, args.eval_size_resolved = crop, eval_size
    names = class_names(args.num_classes)
    train_set = open_split(loc, args.train_split, train_transforms(crop, (args.scale_min, args.scale_max)),
                           args.num_classes, seed=args.seed)
    val_set = open_split(loc, args.val_split, eval_transforms(eval_size), args.num_classes)
    pin = device.type == "cuda"
    loader = train_loader(train_set, args.batch_size, args.workers, args.seed, info.rank, info.world, pin,
                          args.prefetch_factor)
    val_loader = eval_loader(val_set, args.eval_batch_size or args.batch_size, args.workers, info.rank,
                             info.world, pin, args.prefetch_factor)

    # Model, optimizer, schedule
    model = build_model(args.model, args.num_classes, args.aux_loss, args.bn_momentum)
    if args.weights:
        load_weights(model, args.weights, log=log)
    if args.sync_bn and info.enabled:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log(f"note: --sync-bn ignored: torch's SyncBatchNorm runs only on CUDA, this run is on {device.type}")
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    if args.fsdp:
        units = fsdp_utils.shard_model(model, device)
        log(f"fsdp: {len(units)} FSDP units ({', '.join(units[:3])}, ..., {units[-1]}) on a mesh of "
            f"{info.world} process{'es' if info.world > 1 else ''}")
    elif info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        # The model (forward and backward, DDP's buckets included); the loss, the clip (segclip's
        # ops) and the optimizer stay eager. Evaluation runs the eager module (dist_utils.unwrap),
        # so its other image sizes cause no recompilation. SEGCLIP_COMPILE_BACKEND (a debugging and
        # test hook) picks another torch.compile backend, e.g. aot_eager.
        model = torch.compile(model, backend=os.environ.get("SEGCLIP_COMPILE_BACKEND") or "inductor")
    # Same initial weights on every rank (DDP also broadcasts rank 0's); from here on each rank
    # draws its own random numbers (dropout).
    seed_everything(args.seed + info.rank)
    fused = args.fused_optimizer
    if fused and args.fsdp and args.optimizer == "sgd":
        fused = False  # aten._fused_sgd_ has no DTensor (sharding) implementation in torch 2.14
        log("note: --fsdp: torch's fused SGD does not take sharded (DTensor) parameters; using foreach")
    optimizer, opt_impl = build_optimizer(dist_utils.unwrap(model), args.optimizer, args.lr, args.momentum,
                                          args.weight_decay, device, fused=fused, log=log)
    iters_per_epoch = len(loader)
    warmup = args.warmup_iters if args.warmup_iters is not None else int(args.warmup_epochs * iters_per_epoch)
    scheduler = build_scheduler(optimizer, args.epochs * iters_per_epoch, warmup, args.poly_power)
    amp = bool(args.amp)
    # Under --fsdp too: each rank unscales its own shards, and torch (2.14) reduces found_inf over the
    # DTensor gradients' mesh in unscale_ (DTensor's found_inf_reduce_handler), so every rank skips
    # the same steps and keeps the same loss scale (tests/test_distributed.py checks this).
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    cfg = StepConfig(device=device, clip=args.clip, max_norm=args.max_norm, norm_type=args.norm_type,
                     amp=amp, sync_timing=args.sync_timing, max_nonfinite=args.max_nonfinite,
                     channels_last=args.channels_last,
                     clip_mode=args.clip_mode, clip_value=args.clip_value, clip_factor=args.clip_factor,
                     clipper=make_clipper(args))
    state = TrainState(clipper=cfg.clipper)
    start_epoch, start_iter, partial, best_miou = 0, 0, None, None

    # Run folder (rank 0 picks the name; every rank agrees on it)
    run_dir = Path(args.out) if args.out else (Path(args.resume).parent if args.resume else None)
    if run_dir is None:
        run_dir = dist_utils.broadcast_object(default_run_dir(args.model, args.runs_root) if info.is_main else None)
    runlog = RunLog(run_dir, enabled=info.is_main)
    if replace_logs and info.is_main:
        for name in replace_logs:
            (run_dir / name).unlink(missing_ok=True)
        log(f"note: {run_dir} holds a run stopped before its first epoch ended (no last.pt, nothing to "
            f"resume); starting afresh there, replacing its {', '.join(replace_logs)}")

    if resume is not None:
        if fsdp_utils.is_sharded(model):  # the full state dicts, sharded onto every rank
            fsdp_utils.load_state_dicts(dist_utils.unwrap(model), optimizer, resume["model"], resume["optimizer"])
        else:
            dist_utils.unwrap(model).load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
        note = apply_hyperparameters(optimizer, args)
        if note:
            log(note)
        start_epoch = int(resume["epoch"]) + 1
        if position is not None:
            start_epoch, start_iter = int(position["epoch"]), int(position["iter"])
            partial = EpochSummary.from_state(position["summary"])
        note = load_schedule(scheduler, optimizer, resume["scheduler"],
                             start_epoch * iters_per_epoch + start_iter)
        if note:
            log(note)
        scaler.load_state_dict(resume["scaler"])
        ts = resume["train_state"]
        state = TrainState(ts["step"], ts["skipped_total"], ts["consecutive_nonfinite"], cfg.clipper)
        if cfg.clipper is not None and ts.get("clipper") is not None:
            cfg.clipper.load_state_dict(ts["clipper"])  # the norm history, so the bound resumes exactly
        best_miou = resume.get("best_miou")
        rngs = resume["rng"]
        if resume.get("world_size") == info.world:
            ckpt_io.set_rng_state(rngs[info.rank])
        else:
            log(f"note: the checkpoint was written by {resume.get('world_size')} processes, this run has "
                f"{info.world}; RNG states are reseeded, so this run will not replay the original exactly")
            seed_everything(args.seed + start_epoch * 1000 + info.rank)
        runlog.truncate_after(int(resume["epoch"]) + 1, state.step)
        where = (f"in epoch {start_epoch + 1} after its step {start_iter} of {iters_per_epoch}"
                 if position is not None else f"at epoch {start_epoch + 1}")
        log(f"resumed from {args.resume}: {start_epoch} of {args.epochs} epochs done; continuing {where} "
            f"(step {state.step + 1})")

    runlog.write(CONFIG, {
        "args": plain_args(args), "device": str(device), "world_size": info.world,
        "dataset": str(loc.voc_dir), "year": loc.year, "crop_size": crop, "eval_size": eval_size,
        "train_images": len(train_set), "val_images": len(val_set), "iters_per_epoch": iters_per_epoch,
        "warmup_iters": warmup, "optimizer_impl": opt_impl, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "segclip_backends": {k: str(v) for k, v in __import__("segclip").backends().items()},
    })
    mode = " (FSDP)" if args.fsdp else ""
    if info.enabled:
        mode = f" x{info.world} ({'FSDP' if args.fsdp else 'DDP'})"
    log(f"{args.model} on {device}{mode}: "
        f"{len(train_set)} train / {len(val_set)} val images from {loc.voc_dir}, crop {crop}, "
        f"{iters_per_epoch} steps/epoch, {args.optimizer} ({opt_impl}), clip={args.clip} mode={args.clip_mode}"
        f"{f' max_norm={args.max_norm:g}' if args.clip != 'none' else ''} norm_type={args.norm_type:g}, "
        f"amp={'off' if not amp else cfg.amp_dtype}; run folder {run_dir}")

    hang_at = int(os.environ.get("SEGCLIP_TEST_HANG_AT_STEP", "0") or 0)
    stop = StopSignal()

    compile_step: dict = {}  # the first step of this process when compiling: {"epoch", "seconds", "images"}

    def on_step(record: dict) -> None:
        runlog.step(record)
        if args.compile and not compile_step:
            seconds = sum(record[f"t_{p}"] for p in PHASES)
            compile_step.update(epoch=record["epoch"] - 1, seconds=seconds, images=record["batch"] * info.world)
            log(f"torch.compile: the first step took {seconds:.1f} s, compilation included; it is reported "
                f"apart (compile_seconds in epochs.jsonl), not in the epoch's img/s")
        if hang_at and record["step"] == hang_at:  # test hook: wait here to be killed or interrupted
            runlog.close()
            while not stop.requested:
                time.sleep(0.05)

    def save_position(epoch: int, summary) -> Path:
        """last.pt at the current step of ``epoch`` (0-based; ``summary``: its partial record)."""
        rngs = dist_utils.gather_objects(ckpt_io.rng_state())
        states = state_dicts(model, optimizer)  # every rank: a collective under --fsdp
        path = run_dir / "last.pt"
        if info.is_main:
            ckpt_io.atomic_save(make_checkpoint(
                states, scheduler, scaler, epoch - 1, state, best_miou, None, args, rngs,
                info.world, position={"epoch": epoch, "iter": summary.steps, "batch_size": args.batch_size,
                                      "world_size": info.world, "summary": summary.state()}), path)
        dist_utils.barrier()  # no rank exits (and has torchrun end the others) before the file is written
        return path

    metrics = None
    warned_foreground = False
    show = info.is_main and not args.no_progress

    def end_epoch(epoch: int, summary: EpochSummary) -> tuple:
        """Evaluation, the epoch's record and checkpoints; returns ``(metrics, best_miou, improved)``
        without changing the loop's variables, so an interruption here leaves them as they were
        before the epoch's end (a resume then evaluates again)."""
        record = summary.to_dict()
        record["lr"] = optimizer.param_groups[0]["lr"]
        if compile_step.get("epoch") == epoch:
            record["compile_seconds"] = compile_step["seconds"]
            rest = summary.seconds - compile_step["seconds"]
            record["images_per_second"] = (summary.images - compile_step["images"]) / rest if rest > 0 else None
        last = epoch == args.epochs - 1
        new_metrics, new_best, improved = metrics, best_miou, False
        if last or (epoch + 1) % args.eval_every == 0:
            new_metrics = evaluate(model, val_loader, args.num_classes, device, amp, names)
            record.update(val_mean_iou=new_metrics["mean_iou"], val_pixel_accuracy=new_metrics["pixel_accuracy"],
                          val_iou=new_metrics["iou"])
            improved = new_metrics["mean_iou"] is not None and (best_miou is None or new_metrics["mean_iou"] > best_miou)
            if improved:
                new_best = new_metrics["mean_iou"]
        record["best_mean_iou"] = new_best
        record["skipped_total"] = state.skipped_total
        rngs = dist_utils.gather_objects(ckpt_io.rng_state())
        states = state_dicts(model, optimizer)  # every rank: a collective under --fsdp
        if info.is_main:
            ck = make_checkpoint(states, scheduler, scaler, epoch, state, new_best,
                                 _metric_summary(new_metrics) if new_metrics else None, args, rngs, info.world)
            ckpt_io.atomic_save(ck, run_dir / "last.pt")
            if improved:
                ckpt_io.atomic_save(ck, run_dir / "best.pt")
        runlog.epoch(record)  # after last.pt: a resume from the previous last.pt drops it again
        clipped = record["clipped_share"]
        miou_txt = f"val mIoU {record['val_mean_iou']:.4f}" if record.get("val_mean_iou") is not None else ""
        log(f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss'] if record['train_loss'] is not None else float('nan'):.4f}, "
            f"{record['images_per_second'] or 0:.1f} img/s, clipped {100 * (clipped or 0):.0f}% of steps"
            f"{f', skipped {summary.skipped}' if summary.skipped else ''}"
            f"{', ' + miou_txt if miou_txt else ''}{' (best)' if improved else ''}")
        return new_metrics, new_best, improved

    epoch, summary = start_epoch, None
    with stop:
        try:
            for epoch in range(start_epoch, args.epochs):
                loader.sampler.set_epoch(epoch)
                train_set.set_epoch(epoch)
                skip = start_iter if epoch == start_epoch else 0
                summary = partial if (epoch == start_epoch and partial is not None) else EpochSummary(epoch)
                loader.sampler.start = skip * args.batch_size
                bar = _progress(show, iters_per_epoch, f"epoch {epoch + 1}/{args.epochs}")
                if bar is not None and skip:
                    bar.update(skip)
                stop.deferring = True  # a signal waits for the end of the step (see interrupt.py)
                try:
                    train_one_epoch(model, loader, optimizer, scheduler, scaler, cfg, epoch, state,
                                    on_step=on_step, progress=bar, stop=stop, summary=summary, start_iter=skip)
                except NonFiniteStop as exc:
                    stop.deferring = False
                    if bar is not None:
                        bar.close()
                    return _nonfinite_stop(exc, run_dir, make_checkpoint(
                        state_dicts(model, optimizer), scheduler, scaler, epoch - 1, state, best_miou, None, args,
                        dist_utils.gather_objects(ckpt_io.rng_state()), info.world,
                        stopped="non-finite loss or gradient norm"), info.is_main, runlog)
                finally:
                    loader.sampler.start = 0
                stop.deferring = False
                if bar is not None:
                    bar.close()
                if summary.stopped:
                    raise KeyboardInterrupt  # a signal during the epoch: handled below
                if summary.foreground_pixels == 0 and not warned_foreground:
                    warned_foreground = True
                    log(f"warning: epoch {epoch + 1}'s training masks hold no pixel of any class 1..{args.num_classes - 1}, "
                        f"only background (0) and void ({VOID}, ignored by the loss and the metrics): the model "
                        f"learns nothing but background. If the masks store the foreground as 255 (binary 0/255 "
                        f"masks), write it as 1 (255 means void in VOC masks).")
                metrics, best_miou, _ = end_epoch(epoch, summary)
                summary = None  # the epoch is saved: an interruption now has nothing new to save
        except KeyboardInterrupt as exc:
            return _interrupted(exc, stop, summary, epoch, state, run_dir, runlog, info, save_position)
        except RuntimeError as exc:
            if not stop.requested:
                raise
            # A SIGTERM sent to the whole process group also ended a loader worker ("DataLoader
            # worker ... killed by signal"): that is this interruption, not an error of its own.
            return _interrupted(exc, stop, summary, epoch, state, run_dir, runlog, info, save_position)
    runlog.close()
    dist_utils.barrier()

    if info.is_main:
        runlog.write(METRICS, metrics)
        log("\n" + format_table(metrics, names))
        pictures = []
        if not args.no_plot:
            from .plots import plot_run
            pictures = plot_run(run_dir, log=log)
        elapsed = time.perf_counter() - t_start
        log(f"\nfinal mIoU {metrics['mean_iou']:.4f} (pixel accuracy {metrics['pixel_accuracy']:.4f}) on "
            f"{len(val_set)} {args.val_split} images; best mIoU {best_miou if best_miou is not None else float('nan'):.4f}; "
            f"{state.skipped_total} skipped steps; {elapsed:.0f} s")
        log(f"run folder: {run_dir}  (config.json, best.pt, last.pt, steps.jsonl, epochs.jsonl, metrics.json)")
        if pictures:
            log(f"pictures:   {Path(pictures[0]).parent}  ({', '.join(Path(p).name for p in pictures)})")
    return 0
