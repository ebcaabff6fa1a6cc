"""Runs a model over an evaluation loader and returns the metrics of all ranks together."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import is_distributed, unwrap
from .metrics import ConfusionMatrix, compute_metrics


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Gives every rank rank 0's buffers (BatchNorm running statistics), so all ranks evaluate the
    model that rank 0 saves."""
    if is_distributed():
        for b in unwrap(model).buffers():
            dist.broadcast(b, src=0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device, amp: bool = False,
             names: list[str] | None = None, progress=None) -> dict:
    """Pixel accuracy, IoU and mIoU (see :mod:`segclip.train.metrics`) over ``loader``.

    Each rank evaluates its shard; the confusion matrices are summed across ranks before the metrics
    are computed, so every rank returns the metrics of the whole split. Under ``--fsdp`` a forward is
    a collective, so a rank whose shard has fewer batches runs dummy forwards (outputs dropped) until
    it has made as many as the busiest rank (segclip.train.fsdp.forward_count / pad_forwards).
    """
    from .fsdp import forward_count, pad_forwards

    broadcast_buffers(model)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    cm = ConfusionMatrix(num_classes, device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    forwards = forward_count(net, len(loader), device)
    done, example = 0, None
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = net(images)["out"]
        done, example = done + 1, images
        cm.update(masks, logits.argmax(1))
        if progress is not None:
            progress.update(1)
    with torch.autocast(device.type, dtype=dtype, enabled=amp):
        pad_forwards(net, forwards - done, example, device, size=64)  # 64: any side the models take
    cm.all_reduce()
    net.train(was_training)
    return compute_metrics(cm.mat, names)


def run(args) -> int:
    """``segclip eval``: evaluates a checkpoint on a split (also under torchrun), prints the table,
    writes the metrics as JSON."""
    from pathlib import Path

    from . import distributed as dist_utils
    from .data import eval_loader, open_split, resolve_data
    from .metrics import format_table
    from .palette import class_names
    from .predict import load_model
    from .runlog import write_json
    from .transforms import eval_transforms

    info, device = dist_utils.setup(args.device)
    try:
        model, ck = load_model(args.checkpoint, device)
        saved = ck.get("args", {})
        num_classes = int(ck["num_classes"])
        # Unset data options come from the checkpoint's training run.
        for key in ("data", "synthetic_train", "synthetic_val", "synthetic_size", "synthetic_seed", "cache_dir"):
            if getattr(args, key, None) is None:
                setattr(args, key, saved.get(key))
        if args.data is None:
            args.data = "synthetic"
        args.num_classes = num_classes
        args.crop_size = None
        if args.eval_size is None:
            args.eval_size = ck.get("eval_size")
        for key, default in (("synthetic_train", 240), ("synthetic_val", 60), ("synthetic_size", 96),
                             ("synthetic_seed", 0)):
            if getattr(args, key) is None:
                setattr(args, key, default)
        loc, _, size = resolve_data(args, info.is_main, print if info.is_main else (lambda *a: None))
        dataset = open_split(loc, args.split, eval_transforms(size), num_classes)
        loader = eval_loader(dataset, args.batch_size, args.workers, info.rank, info.world,
                             device.type == "cuda")
        names = class_names(num_classes)
        metrics = evaluate(model, loader, num_classes, device, args.amp, names)
        if info.is_main:
            print(f"{ck.get('model_name')} from {args.checkpoint} on {len(dataset)} {args.split} images "
                  f"of {loc.voc_dir} (size {size}):")
            print(format_table(metrics, names))
            out = (Path(args.out).expanduser() if args.out
                   else Path(args.checkpoint).expanduser().parent / f"eval-{args.split}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            metrics.update(checkpoint=str(args.checkpoint), split=args.split, dataset=str(loc.voc_dir),
                           eval_size=size)
            write_json(out, metrics)
            print(f"metrics written to {out}")
        return 0
    finally:
        dist_utils.cleanup()
