"""segclip predict: VOC palette masks (void in VOC's void colour) and overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segclip.cli import main
from segclip.train.checkpoint import atomic_save
from segclip.train.models import build_model

# VOC's colours as published with the dataset (not computed by the code under test).
VOC_FIRST = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
             (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128),
             (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0),
             (128, 192, 0), (0, 64, 128)]
VOC_VOID = (224, 224, 192)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 21)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    atomic_save({"format": "segclip-train-checkpoint", "model_name": "lraspp_mobilenet_v3_large",
                 "num_classes": 21, "eval_size": 32, "model": model.state_dict(), "args": {}}, path)
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_masks_are_voc_palette_pngs_and_overlays_exist(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    for name, size in (("a", (40, 30)), ("b", (25, 25))):
        with Image.open(out / f"{name}.png") as m:
            assert m.format == "PNG" and m.mode == "P" and m.size == size
            pal = m.getpalette()
            assert [tuple(pal[3 * i:3 * i + 3]) for i in range(21)] == VOC_FIRST
            assert tuple(pal[3 * 255:3 * 256]) == VOC_VOID
            assert np.array(m).max() < 21
        with Image.open(out / f"{name}_overlay.png") as o:
            assert o.mode == "RGB" and o.size == size


def test_low_confidence_pixels_are_void_in_the_void_colour(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    # --void-below 1 (the largest allowed): a softmax over 21 classes of an untrained model stays below
    # 1 everywhere, so every pixel is void.
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(images / "a.jpg"),
                 "--out", str(out), "--void-below", "1", "--size", "0", "--device", "cpu"]) == 0
    with Image.open(out / "a.png") as m:
        assert (np.array(m) == 255).all()
        assert set(map(tuple, np.array(m.convert("RGB")).reshape(-1, 3).tolist())) == {VOC_VOID}
    with Image.open(out / "a_overlay.png") as o, Image.open(images / "a.jpg") as src:
        assert np.array_equal(np.array(o), np.array(src.convert("RGB")))  # void is left clear


def test_missing_images_are_one_clear_error(checkpoint, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "nope.jpg"),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"image not found: {tmp_path / 'nope.jpg'}" in capsys.readouterr().err


def _save(path, w, h, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, **kw)


def test_an_output_that_would_replace_an_input_is_refused_before_writing(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    _save(folder / "gray.jpg", 20, 20)
    _save(folder / "gray.png", 20, 20, seed=1)  # gray.jpg's mask would be written over it
    before = {p: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(folder / "gray.jpg"),
                 str(folder / "gray.png"), "--out", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"would replace the input image {folder / 'gray.png'}" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    # --out an input folder: refused up front (a second run would read the first run's masks).
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(folder), "--out",
                 str(tmp_path / "." / "photos"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'photos'} is the input folder {folder}" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in folder.iterdir()} == before


def test_clashing_names_get_unique_outputs_and_subfolders_are_mirrored(checkpoint, tmp_path, capsys):
    photos, other, out = tmp_path / "photos", tmp_path / "other", tmp_path / "photos" / "pred"
    for rel in ("A.JPG", "A.png", "sub/A.jpg", "sub/deeper/b.png"):
        _save(photos / rel, 24, 20)
    _save(other / "A.jpg", 24, 20)
    _save(out / "old.jpg", 24, 20)  # the output folder inside an input folder is not searched
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(photos), str(other),
                 "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(["A.png", "A_overlay.png", "A_png.png", "A_png_overlay.png", "A_jpg.png",
                              "A_jpg_overlay.png", "sub/A.png", "sub/A_overlay.png", "sub/deeper/b.png",
                              "sub/deeper/b_overlay.png"])
    assert f"wrote masks and overlays of 5 images into {out}" in text and f"skipping {out}" in text


def test_unreadable_images_are_skipped_with_a_warning_a_summary_and_exit_status_1(checkpoint, tmp_path, capsys):
    from segclip.train.palette import VOC_CLASSES

    photos, out = tmp_path / "photos", tmp_path / "out"
    _save(photos / "a.jpg", 24, 20)
    (photos / "b.jpg").write_text("not an image")
    _save(photos / "c.png", 24, 20)
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(photos), "--out", str(out),
                 "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "c.png", "c_overlay.png"]
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"segclip predict: warning: skipping {photos / 'b.jpg'}: ")
    assert err[1] == f"wrote masks and overlays of 2 images into {out}; skipped 1 unreadable image (warnings above)"
    # Each written image lists the classes found, by name.
    lines = [ln for ln in captured.out.splitlines() if " -> " in ln]
    assert len(lines) == 2
    for ln in lines:
        found = ln.split("(classes: ")[1].rstrip(")").split(", ")
        assert found and set(found) <= set(VOC_CLASSES) | {"void"}


def test_exif_orientation_is_applied(checkpoint, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: a 40x30 sensor image is shown as 30x40
    _save(tmp_path / "in" / "photo.jpg", 40, 30, exif=exif)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "in"),
                 "--out", str(out), "--device", "cpu"]) == 0
    for name in ("photo.png", "photo_overlay.png"):
        with Image.open(out / name) as m:
            assert m.size == (30, 40)
