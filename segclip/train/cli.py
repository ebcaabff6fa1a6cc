"""The ``train``, ``eval``, ``predict`` and ``plot`` subcommands (registered in segclip.cli).

Errors a user can fix (a missing dataset or file, a bad checkpoint, a path that cannot be read or
written) are printed as one message naming the path, with exit status 2; set ``SEGCLIP_TRACEBACK=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

from . import options
from .errors import DataError
from .models import MODELS
from .options import at_least, between, non_negative, non_negative_finite, positive, positive_finite, zero_or_at_least

# The smallest image side the options accept (--crop-size, --eval-size, predict --size): the
# models downsample by up to 32, and the synthetic images are at least this large.
MIN_SIZE = 16


class FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default; required options say so instead of "(default: None)"."""

    def _get_help_string(self, action):
        if action.required and action.option_strings:
            return (action.help or "") + " (required)"
        return super()._get_help_string(action)



def _clean_message(exc: BaseException) -> str:
    """The user-facing message; for an error re-raised from a DataLoader worker, the original one
    (the last line of the worker's traceback) rather than the traceback."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, tail = last.partition(": ")
        return tail if sep and head.split(".")[-1].endswith(("Error", "Exception")) else last
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        return text[1:-1]
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        # "[Errno 17] File exists: 'x'" -> "x: File exists" (and "a -> b" for a rename or a link)
        names = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{names}: {exc.strerror}"
    return text


def _guarded(command: str, func, parser: argparse.ArgumentParser):
    """``func(args)`` with every option's check run first (before any work), and errors a user can
    fix printed as one line (exit status 2)."""
    @functools.wraps(func)
    def wrapper(args):
        try:
            setattr(args, options.CHECKS, options.checks_of(parser))
            options.check_options(args)
            return func(args)
        except (DataError, OSError, ValueError) as exc:  # OSError: a path that cannot be read or written
            if os.environ.get("SEGCLIP_TRACEBACK", "0") == "1":
                raise
            print(f"segclip {command}: error: {_clean_message(exc)}", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            if not _lost_peer(exc) or os.environ.get("SEGCLIP_TRACEBACK", "0") == "1":
                raise
            # NOTE: under torchrun, a process that stops with a clear error (a bad data file in its
            # shard) makes the others' next collective fail; their gloo/NCCL tracebacks would bury
            # that one line, so they exit quietly with the same status.
            return 2
    return wrapper


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the group ended."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:  # torchrun's; the group may be destroyed by now
        return False
    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "[gloo]",
                                  "gloo/transport", "NCCL communicator was aborted"))


def _lazy_run(module: str):
    """``segclip.train.<module>.run``, imported only when the command runs (fast ``--help``)."""
    def run(args):
        return importlib.import_module(f"{__package__}.{module}").run(args)
    return run


def _norm_type(text: str) -> float:
    try:
        return float(text)  # accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 2, 1 or inf)") from None


def _bn_momentum(text: str) -> float | None:
    if text.strip().lower() in ("model", "none", "default"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'model': {text!r}") from None


def _add_data_options(p: argparse.ArgumentParser, for_eval: bool = False):
    """The data options of ``train`` and ``eval``; returns their argument group."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None if for_eval else "synthetic",
                   help="'synthetic' (generated VOC-format dataset, cached) or a PASCAL VOC folder: the "
                        "folder holding VOCdevkit, or VOCdevkit/VOC20xx itself"
                        + (" (default: the checkpoint's training data)" if for_eval else ""))
    g.add_argument("--synthetic-train", type=int, default=None if for_eval else 240, check=at_least(1),
                   help="synthetic dataset: number of train images")
    g.add_argument("--synthetic-val", type=int, default=None if for_eval else 60, check=at_least(1),
                   help="synthetic dataset: number of val images")
    g.add_argument("--synthetic-size", type=int, default=None if for_eval else 96, check=at_least(MIN_SIZE),
                   help="synthetic dataset: image side in pixels")
    g.add_argument("--synthetic-seed", type=int, default=None if for_eval else 0, check=at_least(0),
                   help="synthetic dataset: generator seed")
    g.add_argument("--cache-dir", default=None,
                   help="where the synthetic dataset is generated (None: $SEGCLIP_CACHE, else "
                        "$XDG_CACHE_HOME/segclip, else ~/.cache/segclip)")
    g.add_argument("--workers", type=int, default=0 if for_eval else 2, check=at_least(0),
                   help="DataLoader worker processes per rank (0: load in the main process); they "
                        "persist across epochs")
    g.add_argument("--prefetch-factor", type=int, default=2, check=at_least(1),
                   help="batches each loader worker prepares ahead (with --workers > 0)")
    return g


def _register_train(sub) -> None:
    from .engine import CLIP_KINDS, CLIP_MODES
    from .optim import OPTIMIZERS

    p = options.track(sub.add_parser(
        "train", help="train a torchvision segmentation model with fused gradient clipping",
        description="Train a torchvision segmentation model on PASCAL VOC or the synthetic VOC-format "
                    "dataset, clipping gradients with segclip.fused_clip_. Multi-process: "
                    "torchrun --standalone --nproc-per-node N -m segclip train [--fsdp] ...; several "
                    "machines: torchrun --nnodes M --nproc-per-node N --rdzv-backend=c10d "
                    "--rdzv-endpoint=HOST:PORT --rdzv-id=ID -m segclip train [--fsdp] ... on each "
                    "(README, 'Training on several machines')",
        formatter_class=FORMATTER))
    # NOTE: every option is declared here with its check (options.py): the checks run before any
    # work, and again on a resume's merged arguments. On --resume, each option not typed on the
    # command line takes the checkpoint's value (trainer.resume_args), unless it is in
    # trainer.NOT_RESUMED; a boolean option that a resume may need to switch off is a
    # BooleanOptionalAction (--deterministic / --no-deterministic).
    g = p.add_argument_group("model")
    g.add_argument("--model", default="lraspp_mobilenet_v3_large", choices=MODELS,
                   help="torchvision segmentation model (randomly initialised; nothing is downloaded)")
    g.add_argument("--num-classes", type=int, default=21, check=between(2, 255),
                   help="classes including background (VOC: 21)")
    g.add_argument("--aux-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="use the auxiliary head's loss (weight 0.5) where the model has one (not lraspp)")
    g.add_argument("--bn-momentum", type=_bn_momentum, default=0.1, check=between(0, 1),
                   help="momentum of every BatchNorm layer; 'model' keeps the model's own (0.01 for the "
                        "MobileNetV3 models, whose running statistics then lag a short run from scratch)")
    g.add_argument("--weights", default=None,
                   help="local state dict or checkpoint to start from (heads of another shape are skipped)")
    g = _add_data_options(p)
    g.add_argument("--train-split", default="train", help="split file used for training")
    g.add_argument("--val-split", default="val", help="split file used for evaluation")
    g = p.add_argument_group("data augmentation")
    g.add_argument("--crop-size", type=int, default=None, check=at_least(MIN_SIZE),
                   help="training crop side (None: 480 for VOC, the image size for synthetic)")
    g.add_argument("--eval-size", type=int, default=None, check=at_least(MIN_SIZE),
                   help="evaluation: shorter side resized to this (None: 520 for VOC, the image size for synthetic)")
    g.add_argument("--scale-min", type=float, default=0.5, check=positive_finite(),
                   help="random scale: smallest factor of the crop size")
    g.add_argument("--scale-max", type=float, default=2.0, check=positive_finite(),
                   help="random scale: largest factor of the crop size")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, check=at_least(1), help="training epochs")
    g.add_argument("--batch-size", type=int, default=16, check=at_least(1), help="images per step and process")
    g.add_argument("--eval-batch-size", type=int, default=None, check=at_least(1),
                   help="evaluation batch size (None: --batch-size)")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--lr", type=float, default=0.05, check=positive_finite(), help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, check=between(0, 1, high_open=True), help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, check=non_negative_finite(),
                   help="weight decay (not applied to biases and norm weights)")
    g.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="torch's fused optimizer kernels where this device has them (else foreach, noted)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, check=non_negative_finite(),
                   help="linear LR warmup length in epochs")
    g.add_argument("--warmup-iters", type=int, default=None, check=at_least(0),
                   help="warmup length in steps (overrides --warmup-epochs)")
    g.add_argument("--poly-power", type=float, default=0.9, check=non_negative_finite(),
                   help="poly decay: lr * (1 - progress) ** power")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU")
    g = p.add_argument_group("speed")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="model and input batches in channels_last memory format (faster convolutions "
                        "on most CPUs and on GPUs with tensor cores)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (forward and backward; the clip stays segclip's op); the "
                        "first step's compilation time is reported apart")
    g = p.add_argument_group("gradient clipping")
    g.add_argument("--clip", default="fused", choices=CLIP_MODES,
                   help="fused: segclip.fused_clip_; torch: torch.nn.utils.clip_grad_norm_; none: only "
                        "measure the norm (for the log and the non-finite check)")
    g.add_argument("--max-norm", type=float, default=2.0, check=non_negative(),
                   help="clip the total gradient norm to this (0 zeroes every update)")
    g.add_argument("--norm-type", type=_norm_type, default=2.0,
                   check=lambda v: None if positive()(v) is None else "a positive number or inf (the p of the p-norm)",
                   help="p of the p-norm (e.g. 1, 2, inf)")
    g.add_argument("--clip-mode", default="norm", choices=CLIP_KINDS,
                   help="what is clipped: norm: the total norm to --max-norm; value: every element to "
                        "[-A, A] (--clip-value A); agc: unit-wise adaptive clipping (--clip-factor); auto: "
                        "AutoClip, the norm to the --clip-percentile of the norms so far; zscore: ZClip, "
                        "norm spikes above mean + --z-thresh std of its EMA")
    g.add_argument("--clip-value", type=float, default=1.0, check=non_negative(),
                   help="--clip-mode value: the bound A of clip(grad, -A, A)")
    g.add_argument("--clip-factor", type=float, default=0.01, check=non_negative_finite(),
                   help="--clip-mode agc: the largest gradient-to-weight norm ratio per unit")
    g.add_argument("--clip-percentile", type=float, default=10.0, check=between(0, 100),
                   help="--clip-mode auto: the percentile of the norms seen so far")
    g.add_argument("--z-thresh", type=float, default=2.5, check=non_negative_finite(),
                   help="--clip-mode zscore: the z-score above which a norm is a spike")
    g.add_argument("--max-nonfinite", type=int, default=20, check=at_least(1),
                   help="stop (with a checkpoint) after this many consecutive non-finite steps")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, check=at_least(0),
                   help="seed of the weights, the data order and augmentation")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.use_deterministic_algorithms (bit-identical CPU reruns and resumes)")
    g.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=None, check=at_least(1),
                   help="torch intra-op threads (None: torch's default)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="shard the model with FSDP2 (torch.distributed.fsdp.fully_shard: one unit per "
                        "backbone block and head, then the root) instead of DDP; under torchrun, or on "
                        "one process as a mesh of one. Checkpoints hold the full state dicts "
                        "(docs/training.md, 'Sharded training')")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="SyncBatchNorm across DDP processes")
    g.add_argument("--sync-timing", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA: synchronise at each phase so per-step timings are exact (costs a few %% "
                        "throughput); CPU timings are always exact")
    g.add_argument("--eval-every", type=int, default=1, check=at_least(1),
                   help="evaluate every N epochs (and after the last)")
    g.add_argument("--out", default=None, help="run folder (None: RUNS_ROOT/<model>-<time>, or the "
                                                 "--resume checkpoint's folder)")
    g.add_argument("--runs-root", default="runs", help="parent of default run folders")
    g.add_argument("--resume", default=None,
                   help="checkpoint (e.g. RUN/last.pt) to resume from; options not given on this command "
                        "line are taken from the checkpoint")
    g.add_argument("--no-plot", action="store_true", help="do not write the charts at the end")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    dests = frozenset(a.dest for a in p._actions if a.dest != "help")

    def run(args):
        from .trainer import run as train_run
        args._dests = dests  # for --resume: the options this parser knows
        return train_run(args)
    p.set_defaults(func=_guarded("train", run, p))


def _register_eval(sub) -> None:
    p = options.track(sub.add_parser(
        "eval", help="evaluate a checkpoint: per-class IoU, mIoU, pixel accuracy",
        description="Evaluate a checkpoint on a split; prints the table and writes JSON. Works under "
                    "torchrun too.", formatter_class=FORMATTER))
    p.add_argument("--checkpoint", required=True, help="a segclip checkpoint (best.pt, last.pt)")
    p.add_argument("--split", default="val", help="split file to evaluate")
    p.add_argument("--eval-size", type=int, default=None, check=at_least(MIN_SIZE),
                   help="shorter side resize (None: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8, check=at_least(1), help="images per batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    p.add_argument("--out", default=None, help="JSON output (None: eval-<split>.json next to the checkpoint)")
    _add_data_options(p, for_eval=True)

    p.set_defaults(func=_guarded("eval", _lazy_run("evaluate"), p))


def _register_predict(sub) -> None:
    p = options.track(sub.add_parser(
        "predict", help="write VOC palette masks and overlays for images",
        description="Segment images with a checkpoint: NAME.png (VOC palette mask, void in VOC's void "
                    "colour) and NAME_overlay.png per image.", formatter_class=FORMATTER))
    p.add_argument("--checkpoint", required=True, help="a segclip checkpoint (best.pt, last.pt)")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images (searched recursively, tree mirrored under --out)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=None, check=zero_or_at_least(MIN_SIZE),
                   help="resize the shorter side to this for the model (None: the checkpoint's eval size; "
                        "0: the image's own size); masks are written at the image's size")
    p.add_argument("--void-below", type=float, default=0.0, check=between(0, 1),
                   help="mark pixels whose top class probability is below this as void (255)")
    p.add_argument("--alpha", type=float, default=0.5, check=between(0, 1),
                   help="opacity of the overlay colours (0 to 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    p.set_defaults(func=_guarded("predict", _lazy_run("predict"), p))


def _register_plot(sub) -> None:
    p = options.track(sub.add_parser(
        "plot", help="PNG charts of a run and a suggested max_norm",
        description="Charts of a run folder (loss, LR, mIoU, grad norm with max_norm and share clipped, "
                    "grad-norm histogram with a suggested max_norm, timing).", formatter_class=FORMATTER))
    p.add_argument("run_dir", help="a run folder (holds steps.jsonl)")
    p.add_argument("--out", default=None, help="output folder (None: RUN_DIR/plots)")
    p.add_argument("--percentile", type=float, default=95.0, check=between(0, 100),
                   help="suggest max_norm at this percentile of the norms observed after warmup")

    def run(args):
        from .plots import plot_run
        paths = plot_run(args.run_dir, args.out, args.percentile)
        for path in paths:
            print(path)
        return 0
    p.set_defaults(func=_guarded("plot", run, p))


def register(sub) -> None:
    _register_train(sub)
    _register_eval(sub)
    _register_predict(sub)
    _register_plot(sub)
