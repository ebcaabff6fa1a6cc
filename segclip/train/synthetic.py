"""The synthetic dataset: a deterministic, learnable PASCAL VOC look-alike, generated once.

It is written in VOC's own format (``VOCdevkit/VOC2012`` with ``JPEGImages/*.jpg``, palette PNGs in
``SegmentationClass`` with 255 = void along object borders, ``ImageSets/Segmentation/{train,val,
trainval}.txt``), so training on it goes through exactly the code that reads the real VOC.

Each image is a low-saturation textured background (a colour gradient, noise and grey clutter
strokes, all class 0) with 1-3 objects. Class ``k`` always has the same shape (ellipse, rectangle,
triangle), hue (spread around the colour wheel) and texture (solid, stripes, checks); each object
gets random size, position, brightness and a little hue jitter. A small CNN separates the classes
by colour and texture, so a model trained from scratch reaches a useful mIoU in minutes on a CPU.

The folder is keyed by every generation parameter and a format version, written into a temporary
folder and renamed into place, so concurrent processes (DDP ranks, parallel tests) never see a
half-written dataset and each configuration is generated only once.

Cache folder: ``$SEGCLIP_CACHE`` when set, else ``$XDG_CACHE_HOME/segclip``, else
``~/.cache/segclip``.
"""

from __future__ import annotations

import colorsys
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .palette import VOID, voc_palette

FORMAT_VERSION = 1
SHAPES = ("ellipse", "rectangle", "triangle")
TEXTURES = ("solid", "stripes", "checks")


def cache_dir() -> Path:
    """The folder for generated data: $SEGCLIP_CACHE, else $XDG_CACHE_HOME/segclip, else ~/.cache/segclip."""
    env = os.environ.get("SEGCLIP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "segclip"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Every field is part of the cache folder's name."""

    num_train: int = 240
    num_val: int = 60
    size: int = 96
    num_classes: int = 21
    seed: int = 0

    def __post_init__(self):
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError("the synthetic dataset needs at least one train and one val image")
        if self.size < 16:
            raise ValueError(f"synthetic image size must be at least 16 pixels, got {self.size}")
        if not 2 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be in [2, 255] for the synthetic dataset, got {self.num_classes}")

    @property
    def folder_name(self) -> str:
        return (f"synthetic-v{FORMAT_VERSION}-train{self.num_train}-val{self.num_val}-s{self.size}"
                f"-c{self.num_classes}-seed{self.seed}")


def class_appearance(k: int, num_classes: int) -> tuple[str, str, tuple[float, float, float]]:
    """Shape, texture and base HSV colour of foreground class ``k`` (1 .. num_classes-1)."""
    n = num_classes - 1
    # Neighbouring classes on the colour wheel get different shapes and textures.
    hue = ((k - 1) * 7 % n) / n if n % 7 else (k - 1) / n
    shape = SHAPES[(k - 1) % len(SHAPES)]
    texture = TEXTURES[((k - 1) // len(SHAPES)) % len(TEXTURES)]
    value = 0.95 if (k - 1) % 2 == 0 else 0.75
    return shape, texture, (hue, 0.85, value)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                angle: float) -> np.ndarray:
    if shape == "ellipse":
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(yy - cy) <= ry * 0.85) & (np.abs(xx - cx) <= rx * 0.85)
    # triangle: three half-planes around the centre, rotated by `angle`
    pts = [(cy + ry * np.sin(angle + a), cx + rx * np.cos(angle + a))
           for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
    inside = np.ones_like(yy, dtype=bool)
    for (y0, x0), (y1, x1) in zip(pts, pts[1:] + pts[:1]):
        side_c = (x1 - x0) * (cy - y0) - (y1 - y0) * (cx - x0)
        side_p = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        inside &= side_p * np.sign(side_c) >= 0
    return inside


def _texture(texture: str, yy: np.ndarray, xx: np.ndarray, period: int, phase: int) -> np.ndarray:
    if texture == "solid":
        return np.ones_like(yy, dtype=np.float32)
    if texture == "stripes":
        return np.where(((xx + yy + phase) // period) % 2 == 0, 1.0, 0.55).astype(np.float32)
    return np.where(((xx + phase) // period + (yy // period)) % 2 == 0, 1.0, 0.55).astype(np.float32)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    dtype=np.float32)


def _void_border(labels: np.ndarray) -> np.ndarray:
    """Pixels next to a change of label, grown by one pixel: VOC's void band around objects."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    grown = edge.copy()
    grown[1:, :] |= edge[:-1, :]
    grown[:-1, :] |= edge[1:, :]
    grown[:, 1:] |= edge[:, :-1]
    grown[:, :-1] |= edge[:, 1:]
    return grown


def render(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its label map (uint8 HxW, 255 = void)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: a gradient between two greyish colours, grey clutter strokes, noise.
    c0 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.8))
    c1 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.8))
    theta = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(theta) * xx + np.sin(theta) * yy) / size + 1) / 2
    image = (1 - t)[..., None] * c0 + t[..., None] * c1
    for _ in range(rng.integers(0, 4)):
        grey = rng.uniform(0.2, 0.9)
        if rng.random() < 0.5:
            y0 = rng.integers(0, size)
            image[y0:y0 + rng.integers(1, 3), :] = grey
        else:
            x0 = rng.integers(0, size)
            image[:, x0:x0 + rng.integers(1, 3)] = grey
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        k = int(rng.integers(1, num_classes))
        shape, texture, (h, s, v) = class_appearance(k, num_classes)
        ry, rx = rng.uniform(0.14, 0.3, size=2) * size
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        inside = _shape_mask(shape, yy, xx, cy, cx, ry, rx, rng.uniform(0, 2 * np.pi))
        if not inside.any():
            continue
        colour = _hsv_to_rgb(h + rng.uniform(-0.015, 0.015), s * rng.uniform(0.85, 1.0),
                             v * rng.uniform(0.85, 1.05))
        shade = _texture(texture, yy, xx, period=max(3, size // 16), phase=int(rng.integers(0, 8)))
        image[inside] = colour * shade[inside][:, None]
        labels[inside] = k
    image = image * 255 + rng.normal(0, 8, size=image.shape)
    labels[_void_border(labels)] = VOID
    return np.clip(image, 0, 255).astype(np.uint8), labels


def _write(root: Path, spec: SyntheticSpec) -> None:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    rng = np.random.default_rng(spec.seed)
    names = {"train": [], "val": []}
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        for i in range(count):
            name = f"{split}_{i:05d}"
            image, labels = render(rng, spec.size, spec.num_classes)
            Image.fromarray(image, "RGB").save(voc / "JPEGImages" / f"{name}.jpg", quality=92)
            mask = Image.fromarray(labels, "P")
            mask.putpalette(palette)
            mask.save(voc / "SegmentationClass" / f"{name}.png")
            names[split].append(name)
    for split, lines in (("train", names["train"]), ("val", names["val"]),
                         ("trainval", names["train"] + names["val"])):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def ensure_synthetic(spec: SyntheticSpec, cache: Path | None = None, log=print) -> Path:
    """The folder holding ``VOCdevkit`` for ``spec``; generated on first use.

    Generation goes to a temporary sibling folder that is renamed into place when complete; a
    process that loses the race to another one discards its copy.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    final = cache / spec.folder_name
    if (final / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "trainval.txt").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    log(f"generating the synthetic dataset ({spec.num_train} train + {spec.num_val} val images, "
        f"{spec.size}x{spec.size}, {spec.num_classes} classes) into {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder_name}.", dir=cache))
    try:
        _write(tmp, spec)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
