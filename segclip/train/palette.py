"""The PASCAL VOC class names and colour palette (index 255 = void, drawn in VOC's void colour)."""

from __future__ import annotations

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOID = 255
VOID_COLOUR = (224, 224, 192)


def voc_colour(index: int) -> tuple[int, int, int]:
    """The colour VOC gives class ``index`` (the bit-interleaving rule of the VOC devkit)."""
    if index == VOID:
        return VOID_COLOUR
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):
        r |= ((c >> 0) & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return r, g, b


def voc_palette() -> list[int]:
    """A flat 768-entry palette for ``PIL.Image.putpalette``: VOC's colours, void at 255."""
    flat: list[int] = []
    for i in range(256):
        flat.extend(voc_colour(i))
    return flat


def class_names(num_classes: int) -> list[str]:
    """VOC's names for the first classes, ``class_<i>`` beyond 21."""
    return [VOC_CLASSES[i] if i < len(VOC_CLASSES) else f"class_{i}" for i in range(num_classes)]
