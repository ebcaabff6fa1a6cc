"""Image/mask transforms built on ``torchvision.transforms.v2``.

The mask travels as a ``tv_tensors.Mask``, so every geometric transform resizes it with nearest
neighbour (never blends class indices) and pads it with 255 (void, ignored by the loss and the
metrics) where the image is padded with 0.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .palette import VOID

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _finish() -> list:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(MEAN, STD),
        v2.ToPureTensor(),
    ]


def train_transforms(crop: int, scale: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5) -> v2.Compose:
    """Random scale (of the shorter side, around ``crop``), random ``crop`` x ``crop`` crop padded
    with 0 / void, random horizontal flip, normalisation."""
    lo, hi = int(round(crop * scale[0])), int(round(crop * scale[1]))
    return v2.Compose([
        v2.RandomResize(lo, max(hi, lo + 1)),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: VOID}),
        v2.RandomHorizontalFlip(hflip),
        *_finish(),
    ])


def eval_transforms(size: int) -> v2.Compose:
    """Resize the shorter side to ``size`` (mask: nearest), normalisation."""
    return v2.Compose([v2.Resize(size), *_finish()])


def predict_transforms(size: int | None) -> v2.Compose:
    """As for evaluation, without a mask; ``size=None`` keeps the image's own size."""
    steps = [v2.Resize(size)] if size else []
    return v2.Compose([*steps, *_finish()])
