"""Segmentation metrics from a confusion matrix.

``mat[t, p]`` counts pixels of true class ``t`` predicted as ``p``; void pixels (255) are not
counted. From it:

* pixel accuracy = trace / total;
* IoU of class c = mat[c, c] / (row c + column c - mat[c, c]), i.e. TP / (TP + FP + FN);
* mIoU = the mean IoU over the classes *present*: those in the ground truth or the predictions
  (union > 0). A class that appears in neither has no IoU (None in JSON, "-" in the table) and does
  not enter the mean; a class predicted but absent from the ground truth has IoU 0 and does.
"""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum
from .palette import VOID


class ConfusionMatrix:
    """Accumulates a ``num_classes`` x ``num_classes`` int64 confusion matrix on ``device``."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        """Adds a batch: ``target`` and ``pred`` hold class indices, same shape; target 255 = void."""
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
        n = self.num_classes
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        keep = (target != VOID) & (target >= 0) & (target < n)
        idx = target[keep] * n + pred[keep]
        self.mat += torch.bincount(idx, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        """Sums the matrices of all ranks (each rank evaluated a disjoint shard)."""
        all_reduce_sum(self.mat)

    def compute(self) -> dict:
        return compute_metrics(self.mat)


def compute_metrics(mat: torch.Tensor, names: list[str] | None = None) -> dict:
    """Pixel accuracy, per-class IoU and mIoU (see the module doc) as plain Python values.

    Returns:
        ``{"pixel_accuracy", "mean_iou", "iou": [float | None per class], "present": [bool],
        "class_accuracy": [float | None], "pixels": int, "confusion_matrix": [[int]]}``; with
        ``names``, also ``"classes": names`` and ``"iou_by_class": {name: iou}``.
    """
    mat = mat.detach().to("cpu", torch.float64)
    tp = mat.diag()
    gt = mat.sum(1)
    predicted = mat.sum(0)
    union = gt + predicted - tp
    total = mat.sum()
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    class_acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    out = {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "mean_iou": float(iou[present].mean()) if present.any() else None,
        "iou": [None if v != v else float(v) for v in iou.tolist()],
        "present": present.tolist(),
        "class_accuracy": [None if v != v else float(v) for v in class_acc.tolist()],
        "pixels": int(total),
        "confusion_matrix": mat.to(torch.int64).tolist(),
    }
    if names is not None:
        out["classes"] = list(names)
        out["iou_by_class"] = dict(zip(names, out["iou"]))
    return out


def format_table(metrics: dict, names: list[str]) -> str:
    """The per-class table and the summary lines, for the terminal."""
    width = max(12, max(len(n) for n in names))
    lines = [f"{'class':<{width}} {'IoU':>7} {'acc':>7}", "-" * (width + 16)]
    for name, iou, acc in zip(names, metrics["iou"], metrics["class_accuracy"]):
        fmt = lambda v: f"{v:7.4f}" if v is not None else f"{'-':>7}"  # noqa: E731
        lines.append(f"{name:<{width}} {fmt(iou)} {fmt(acc)}")
    lines.append("-" * (width + 16))
    n_present = sum(metrics["present"])
    miou = metrics["mean_iou"]
    pa = metrics["pixel_accuracy"]
    lines.append(f"{'mIoU':<{width}} {miou if miou is not None else float('nan'):7.4f}   "
                 f"(mean over the {n_present} of {len(names)} classes present)")
    lines.append(f"{'pixel acc':<{width}} {pa if pa is not None else float('nan'):7.4f}   "
                 f"({metrics['pixels']:,} labelled pixels)")
    return "\n".join(lines)
