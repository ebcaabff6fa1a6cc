"""``segclip predict``: segments images with a trained checkpoint.

For each input image ``NAME.ext`` it writes into the output folder:

    NAME.png          the predicted mask as a VOC palette PNG (class indices with VOC's colours;
                      pixels below --void-below confidence are 255 = void, in VOC's void colour)
    NAME_overlay.png  the image with the mask's colours blended over it (void and background left clear)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from . import checkpoint as ckpt_io
from .errors import DataError
from .models import build_model, extract_state_dict
from .palette import VOID, voc_colour, voc_palette
from .transforms import predict_transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def collect_images(inputs: list[str]) -> list[Path]:
    """Files given directly, and the images (by extension) in folders given, sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image not found: {p}")
    return files


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


def run(args) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, ck = load_model(args.checkpoint, device)
    size = args.size if args.size is not None else ck.get("eval_size", 520)
    files = collect_images(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        mask = predict_mask(model, image, size or None, device, args.void_below)
        colourise(mask).save(out / f"{path.stem}.png")
        overlay(image, mask, args.alpha).save(out / f"{path.stem}_overlay.png")
        classes = sorted(int(c) for c in np.unique(mask))
        print(f"{path} -> {out / (path.stem + '.png')}, {out / (path.stem + '_overlay.png')}  (classes {classes})")
    print(f"wrote {2 * len(files)} files into {out}")
    return 0
