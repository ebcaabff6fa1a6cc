"""``segclip predict``: segments images with a trained checkpoint.

For each input image ``NAME.ext`` it writes into the output folder:

    NAME.png          the predicted mask as a VOC palette PNG (class indices with VOC's colours;
                      pixels below --void-below confidence are 255 = void, in VOC's void colour)
    NAME_overlay.png  the image with the mask's colours blended over it (void and background left clear)

Folders are searched recursively and their tree is mirrored in the output folder (``photos/a/x.jpg``
-> ``OUT/a/x.png``); the output folder itself is skipped when it lies inside an input folder, and refused when it is an input
folder. When
two inputs would get the same output name (``A.JPG`` and ``A.png``, or ``x.jpg`` from two folders
given separately), the later one (in sorted order) gets its extension in the name (``A_png.png``),
then a number (``x_jpg-2.png``). An output that would replace one of the input images is refused
before anything is written. Photos are turned upright by their EXIF orientation first.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from . import checkpoint as ckpt_io
from .errors import DataError
from .models import build_model, extract_state_dict
from .palette import VOID, voc_colour, voc_palette
from .transforms import predict_transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _walk(folder: Path, exclude: Path | None, skipped: list[Path]) -> list[Path]:
    """The images under ``folder``, recursively, sorted; ``exclude`` (a folder) is left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if exclude is not None and (here / d).resolve() == exclude:
                skipped.append(here / d)
            else:
                keep.append(d)
        dirnames[:] = keep
        found += [here / f for f in sorted(filenames)
                  if Path(f).suffix.lower() in IMAGE_EXTENSIONS and (here / f).is_file()]
    return found


def collect_images(inputs: list[str], exclude: str | Path | None = None,
                   log=print) -> list[tuple[Path, PurePath]]:
    """``(image, output name without extension)`` for the files given directly and the images (by
    extension) found recursively in the folders given. The output name mirrors the file's place
    below the folder given (``photos/a/x.jpg`` -> ``a/x``); a file given directly gets its stem.
    ``exclude``: a folder never searched (the output folder); given as an input folder itself, it is
    refused (:class:`DataError`). The same file given twice counts once.
    """
    exclude_dir = Path(exclude).expanduser().resolve() if exclude is not None else None
    items: list[tuple[Path, PurePath]] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() and exclude_dir is not None and p.resolve() == exclude_dir:
            raise DataError(f"--out {exclude_dir} is the input folder {p}: the masks would be written "
                            f"among the images, and a second run would take them as input images; "
                            f"choose an --out outside it (or a subfolder, which is skipped)")
        if p.is_dir():
            skipped: list[Path] = []
            found = _walk(p, exclude_dir, skipped)
            for q in skipped:
                log(f"note: skipping {q}: it is the output folder")
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            pairs = [(q, PurePath(q.relative_to(p)).with_suffix("")) for q in found]
        elif p.is_file():
            pairs = [(p, PurePath(p.stem))]
        else:
            raise DataError(f"image not found: {p}")
        for q, rel in pairs:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                items.append((q, rel))
    return items


def _names(stem: str, ext: str):
    """Output names to try, in order: ``stem``, ``stem_ext``, ``stem_ext-2``, ``stem_ext-3``, ..."""
    yield stem
    yield f"{stem}_{ext}"
    n = 2
    while True:
        yield f"{stem}_{ext}-{n}"
        n += 1


def plan_outputs(items: list[tuple[Path, PurePath]], out: Path) -> list[tuple[Path, Path, Path]]:
    """``(image, mask path, overlay path)`` per input, every output path distinct (compared without
    case, for case-insensitive file systems); see the module doc for how clashes are named.

    Raises:
        DataError: an output path is one of the input images (nothing has been written yet).
    """
    taken: set[str] = set()
    plan = []
    for src, rel in items:
        for name in _names(rel.name, src.suffix.lstrip(".") or "image"):
            mask = out / rel.parent / f"{name}.png"
            over = out / rel.parent / f"{name}_overlay.png"
            keys = {str(mask).lower(), str(over).lower()}
            if not keys & taken:
                taken |= keys
                plan.append((src, mask, over))
                break
    inputs = {src.resolve(): src for src, _ in items}
    for src, mask, over in plan:
        for target in (mask, over):
            if target.resolve() in inputs:
                raise DataError(f"the output {target} (for {src}) would replace the input image "
                                f"{inputs[target.resolve()]}; choose an --out folder that holds no input "
                                f"images")
    return plan


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model a segclip checkpoint describes, with its weights, in eval mode."""
    ck = ckpt_io.load(checkpoint)
    args = ck.get("args", {})
    name = ck.get("model_name") or args.get("model")
    num_classes = ck.get("num_classes") or args.get("num_classes")
    if not name or not num_classes:
        raise ValueError(f"{checkpoint} does not say which model it holds (no model_name/num_classes)")
    state = extract_state_dict(ck)
    aux = any(k.startswith("aux_classifier.") for k in state)
    model = build_model(name, int(num_classes), aux_loss=aux)
    model.load_state_dict(state)
    return model.to(device).eval(), ck


def colourise(mask: np.ndarray) -> Image.Image:
    """A uint8 class-index mask as a VOC palette ("P" mode) image."""
    img = Image.fromarray(mask.astype(np.uint8), "P")
    img.putpalette(voc_palette())
    return img


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with the classes' colours blended in at ``alpha`` (background and void untouched)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    lut = np.array([voc_colour(i) for i in range(256)], dtype=np.float32)
    colours = lut[mask]
    blend = (mask != 0) & (mask != VOID)
    out = rgb.copy()
    out[blend] = (1 - alpha) * rgb[blend] + alpha * colours[blend]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), "RGB")


@torch.no_grad()
def predict_mask(model: torch.nn.Module, image: Image.Image, size: int | None, device: torch.device,
                 void_below: float = 0.0) -> np.ndarray:
    """The class-index mask (uint8, the image's own size) for one PIL image."""
    tensor = predict_transforms(size)(tv_tensors.Image(F.pil_to_tensor(image.convert("RGB"))))
    logits = model(tensor.unsqueeze(0).to(device))["out"].float()
    logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                             align_corners=False)
    prob, pred = logits.softmax(1).max(1)
    pred = pred[0].to(torch.uint8)
    if void_below > 0:
        pred[prob[0] < void_below] = VOID
    return pred.cpu().numpy()


def read_image(path: Path) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation (as photo viewers show it)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


EXIT_SKIPPED = 1  # some inputs could not be read: the others were written


def run(args) -> int:
    """Writes the mask and overlay of every input image. An image that cannot be read is skipped
    with a warning, the others are written, and the summary counts the skipped ones; the exit
    status is then 1 (0 when every image was written)."""
    import sys

    from .distributed import pick_device
    from .palette import class_names

    device = pick_device(args.device)
    out = Path(args.out).expanduser()
    plan = plan_outputs(collect_images(args.images, exclude=out), out)
    model, ck = load_model(args.checkpoint, device)
    names = class_names(int(ck.get("num_classes") or 21))
    size = args.size if args.size is not None else ck.get("eval_size", 520)
    written, skipped = 0, []
    for path, mask_path, overlay_path in plan:
        try:
            image = read_image(path)
        except DataError as exc:
            skipped.append(path)
            print(f"segclip predict: warning: skipping {path}: {str(exc).removeprefix(f'cannot read image {path}: ')}",
                  file=sys.stderr)
            continue
        mask = predict_mask(model, image, size or None, device, args.void_below)
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        colourise(mask).save(mask_path)
        overlay(image, mask, args.alpha).save(overlay_path)
        written += 1
        present = [names[c] if c < len(names) else ("void" if c == VOID else str(c))
                   for c in sorted(int(c) for c in np.unique(mask))]
        print(f"{path} -> {mask_path}, {overlay_path}  (classes: {', '.join(present)})")
    summary = f"wrote masks and overlays of {written} image{'s' if written != 1 else ''} into {out}"
    if skipped:
        print(f"{summary}; skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} "
              f"(warnings above)", file=sys.stderr)
        return EXIT_SKIPPED
    print(summary)
    return 0
