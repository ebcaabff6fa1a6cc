"""Data: the synthetic VOC generator, finding a VOC root, clear errors, transforms, determinism."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _train_util import TINY, segclip, tiny_voc
from segclip.train.data import (DataError, SegmentationSet, check_split, eval_loader, locate_voc,
                                open_split, pad_collate, sample_seed, train_loader)
from segclip.train.palette import VOID, voc_colour
from segclip.train.synthetic import SyntheticSpec, ensure_synthetic
from segclip.train.transforms import eval_transforms, train_transforms


@pytest.fixture()
def voc(tmp_path):
    """A private copy (tests below damage it)."""
    return tiny_voc(tmp_path / "cache")


def test_synthetic_layout_is_voc(voc):
    d = voc / "VOCdevkit" / "VOC2012"
    for split, n in (("train", 8), ("val", 4), ("trainval", 12)):
        names = (d / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert len(names) == n
    name = (d / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    with Image.open(d / "JPEGImages" / f"{name}.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    masks = []
    for p in sorted((d / "SegmentationClass").glob("*.png")):
        with Image.open(p) as m:
            assert m.mode == "P"
            pal = m.getpalette()
            assert tuple(pal[3:6]) == voc_colour(1) == (128, 0, 0)
            assert tuple(pal[3 * 255:3 * 256]) == (224, 224, 192)
            masks.append(np.array(m))
    values = np.unique(np.concatenate([m.ravel() for m in masks]))
    assert VOID in values and 0 in values and ((values > 0) & (values < 21)).any()
    assert values.max() == VOID and values[values != VOID].max() < 21


def test_synthetic_is_deterministic_and_cached(tmp_path):
    a = ensure_synthetic(SyntheticSpec(4, 2, 24, 5, seed=3), tmp_path / "a", log=lambda *x: None)
    b = ensure_synthetic(SyntheticSpec(4, 2, 24, 5, seed=3), tmp_path / "b", log=lambda *x: None)
    for f in sorted(a.rglob("*.*")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f
    logged = []
    ensure_synthetic(SyntheticSpec(4, 2, 24, 5, seed=3), tmp_path / "a", log=logged.append)
    assert logged == []  # generated once
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("where", ["root", "devkit", "voc2012"])
def test_locate_voc_accepts_each_level(voc, where):
    path = {"root": voc, "devkit": voc / "VOCdevkit", "voc2012": voc / "VOCdevkit" / "VOC2012"}[where]
    loc = locate_voc(path)
    assert loc.voc_dir.resolve() == (voc / "VOCdevkit" / "VOC2012").resolve() and loc.year == "2012"
    ds = open_split(loc, "val", eval_transforms(32), 21)
    assert len(ds) == 4 and ds[0][0].shape == (3, 32, 32)


def test_locate_voc_outside_a_vocdevkit_folder(voc, tmp_path):
    lone = tmp_path / "elsewhere" / "VOC2010"
    shutil.copytree(voc / "VOCdevkit" / "VOC2012", lone)
    loc = locate_voc(lone, cache=tmp_path / "links")
    assert loc.year == "2010"
    ds = open_split(loc, "train", eval_transforms(32), 21)
    assert len(ds) == 8 and ds[7][1].shape == (32, 32)


def test_missing_dataset_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as e:
        locate_voc(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "VOCdevkit/VOC2012" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no VOCdevkit/VOC20xx folder in .*empty"):
        locate_voc(tmp_path / "empty")


def test_missing_split_file(voc):
    split = voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    with pytest.raises(DataError) as e:
        check_split(locate_voc(voc), "val")
    assert f"split file not found: {split}" in str(e.value)


def test_missing_listed_image(voc):
    d = voc / "VOCdevkit" / "VOC2012"
    name = (d / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[1]
    (d / "JPEGImages" / f"{name}.jpg").unlink()
    with pytest.raises(DataError, match=f"{name}.jpg is missing"):
        check_split(locate_voc(voc), "val")


def test_unreadable_image_is_one_clear_error(voc):
    d = voc / "VOCdevkit" / "VOC2012"
    name = (d / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    bad = d / "JPEGImages" / f"{name}.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = open_split(locate_voc(voc), "val", eval_transforms(32), 21)
    with pytest.raises(DataError, match=f"cannot read {bad}"):
        ds[0]
    # Through a DataLoader worker too, the message names the file.
    with pytest.raises(DataError, match=f"cannot read {bad}"):
        for _ in train_loader(ds, 2, workers=1, seed=0):
            pass
    # The evaluation loader checks its images and masks before the first batch.
    with pytest.raises(DataError, match=f"cannot read {bad}"):
        eval_loader(ds, 2, workers=0)


def test_cli_reports_data_errors_without_traceback(voc, tmp_path):
    d = voc / "VOCdevkit" / "VOC2012"
    name = (d / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    (d / "JPEGImages" / f"{name}.jpg").write_bytes(b"\x00" * 10)
    r = segclip(["train", "--data", str(voc), *TINY, "--workers", "1", "--epochs", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "run")], tmp_path / "cache")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot read {d / 'JPEGImages' / name}.jpg" in r.stderr
    r = segclip(["train", "--data", str(tmp_path / "missing"), "--epochs", "1"], tmp_path / "cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"dataset folder not found: {tmp_path / 'missing'}" in r.stderr
    # SEGCLIP_DEBUG is the build's switch (-O0 -g) and leaves messages alone; SEGCLIP_TRACEBACK=1 asks for it.
    for extra, traceback in (({"SEGCLIP_DEBUG": "1"}, False), ({"SEGCLIP_TRACEBACK": "0"}, False),
                             ({"SEGCLIP_TRACEBACK": "1"}, True)):
        r = segclip(["train", "--data", str(tmp_path / "missing"), "--epochs", "1"], tmp_path / "cache", **extra)
        assert (r.returncode != 2) == traceback and ("Traceback" in r.stderr) == traceback, (extra, r.stderr)


def test_mask_values_beyond_num_classes(voc):
    ds = open_split(locate_voc(voc), "train", eval_transforms(32), num_classes=2)
    with pytest.raises(DataError, match="num_classes is 2"):
        for i in range(len(ds)):
            ds[i]


def test_train_transforms_keep_labels_and_pad_with_void():
    torch.manual_seed(0)
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.full((3, 20, 30), 200, dtype=torch.uint8))
    mask = torch.zeros((20, 30), dtype=torch.uint8)
    mask[5:15, 10:20] = 3
    mask[0, :] = VOID
    t = train_transforms(40, scale=(0.5, 0.6))  # the image shrinks below the crop: padding
    for _ in range(5):
        img, m = t(image, tv_tensors.Mask(mask))
        assert img.shape == (3, 40, 40) and img.dtype == torch.float32 and m.shape == (40, 40)
        assert set(torch.unique(m).tolist()) <= {0, 3, VOID}  # nearest neighbour: no blended labels
        padded = m == VOID
        assert padded.any()
        # padding is 0 in the image before normalisation: the normalised black pixel
        black = (torch.zeros(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        assert torch.allclose(img[:, -1, -1], black, atol=1e-5) or torch.allclose(img[:, 0, 0], black, atol=1e-5)


def test_augmentation_depends_only_on_seed_epoch_index(voc):
    loc = locate_voc(voc)
    ds = open_split(loc, "train", train_transforms(32), 21, seed=7)
    a = ds[3]
    torch.manual_seed(123)  # the process RNG does not matter
    b = ds[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    state = torch.get_rng_state()
    ds[3]
    assert torch.equal(state, torch.get_rng_state())  # and is not consumed
    ds.set_epoch(1)
    c = ds[3]
    assert not torch.equal(a[0], c[0])
    assert sample_seed(7, 1, 3) != sample_seed(7, 0, 3) != sample_seed(8, 0, 3)


def test_pad_collate_pads_images_with_zero_and_masks_with_void():
    batch = [(torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.uint8)),
             (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.uint8))]
    images, masks = pad_collate(batch)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5) and masks.dtype == torch.int64
    assert images[0, :, 4:].abs().sum() == 0 and (masks[0, 4:] == VOID).all()
    assert (masks[1, :, 3:] == VOID).all() and (masks[1, :, :3] == 1).all()


def test_segmentation_set_reads_through_vocsegmentation(voc):
    from torchvision.datasets import VOCSegmentation

    ds = open_split(locate_voc(voc), "val", eval_transforms(32), 21)
    assert isinstance(ds, SegmentationSet) and isinstance(ds.voc, VOCSegmentation)
    _, mask = ds[0]
    with Image.open(ds.voc.masks[0]) as m:
        assert torch.equal(mask.to(torch.uint8), torch.from_numpy(np.array(m)))


def test_split_files_of_any_name_blank_lines_and_bom(voc):
    seg = voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    train = (seg / "train.txt").read_text().split()
    val = (seg / "val.txt").read_text().split()
    # A byte order mark, CRLF line ends, blank lines in the middle and at the end.
    (seg / "train_aug.txt").write_bytes(("\ufeff" + "\r\n".join(train[:3]) + "\r\n\r\n"
                                         + "\n".join(train[3:]) + "\n\n").encode("utf-8"))
    (seg / "test.txt").write_text("\n".join(val[:2]) + "\n")
    loc = locate_voc(voc)
    ds = open_split(loc, "train_aug", eval_transforms(32), 21)
    assert len(ds) == 8 and ds.voc.images[0].endswith(f"JPEGImages/{train[0]}.jpg")
    for i in range(len(ds)):
        ds[i]
    assert len(open_split(loc, "test", eval_transforms(32), 21)) == 2  # torchvision refuses "test" for 2012
    # A standard split file with blank lines too, and a folder without train/val/trainval at all.
    (seg / "val.txt").write_text("\n" + "\n\n".join(val) + "\n\n")
    ds = open_split(loc, "val", eval_transforms(32), 21)
    assert len(ds) == 4 and ds.voc.images[-1].endswith(f"{val[-1]}.jpg")
    for name in ("train", "val", "trainval"):
        (seg / f"{name}.txt").rename(seg / f"my{name}.txt")
    ds = open_split(loc, "myval", eval_transforms(32), 21)
    assert len(ds) == 4 and ds[3][1].shape == (32, 32)
    # Only the requested split file is read: an unrelated, unreadable train.txt does not matter.
    (seg / "train.txt").write_bytes("\n".join(train).encode("utf-16"))
    ds = open_split(loc, "myval", eval_transforms(32), 21)
    assert len(ds) == 4 and ds[0][1].shape == (32, 32)


def _mixed_sizes(voc, sizes):
    """Resizes the val images (and masks, nearest) of ``voc`` to ``sizes`` in turn."""
    d = voc / "VOCdevkit" / "VOC2012"
    names = (d / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for name, size in zip(names, sizes):
        for sub, ext, resample in (("JPEGImages", "jpg", Image.BILINEAR), ("SegmentationClass", "png", Image.NEAREST)):
            with Image.open(d / sub / f"{name}.{ext}") as im:
                im.load()
            im.resize(size, resample).save(d / sub / f"{name}.{ext}")
    return names


def test_evaluation_does_not_depend_on_batch_size_or_processes(tmp_path):
    from segclip.train.evaluate import evaluate
    from segclip.train.models import build_model

    voc = tiny_voc(tmp_path / "cache", num_train=2, num_val=6)
    # Sizes after the resize to a shorter side of 32: 32x32, 48x32, 32x32, 40x32, 48x32, 32x48.
    _mixed_sizes(voc, [(32, 32), (96, 64), (64, 64), (40, 32), (48, 32), (32, 48)])
    ds = open_split(locate_voc(voc), "val", eval_transforms(32), 21)
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", 21).eval()
    with torch.no_grad():  # a head that predicts more than one class (a fresh one predicts only one)
        for name, p in model.named_parameters():
            if name.startswith("classifier") and p.ndim == 4:
                p.normal_(0, 1)
    cpu = torch.device("cpu")
    one = evaluate(model, eval_loader(ds, 1, 0), 21, cpu)["confusion_matrix"]
    three = evaluate(model, eval_loader(ds, 3, 0), 21, cpu)["confusion_matrix"]
    assert three == one
    # Two processes' shards (rank 0: 0, 2, 4; rank 1: 1, 3, 5) add up to the same matrix.
    shards = [evaluate(model, eval_loader(ds, 3, 0, rank=r, world=2), 21, cpu)["confusion_matrix"]
              for r in (0, 1)]
    assert (np.array(shards[0]) + np.array(shards[1])).tolist() == one
    batches = list(eval_loader(ds, 3, 0).batch_sampler)
    assert batches == [[0, 2], [1, 4], [3], [5]]  # one size (after the resize) per batch


def _plant_bad_val_mask(voc, position: int) -> Path:
    """Writes class value 30 (beyond 21 classes) into the mask of the val split's image at ``position``."""
    d = voc / "VOCdevkit" / "VOC2012"
    name = (d / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[position]
    mask_path = d / "SegmentationClass" / f"{name}.png"
    with Image.open(mask_path) as m:
        arr, palette = np.array(m), m.getpalette()
    arr[0, 0] = 30
    bad = Image.fromarray(arr, "P")
    bad.putpalette(palette)
    bad.save(mask_path)
    return mask_path


def test_every_rank_checks_the_whole_validation_split(voc):
    mask_path = _plant_bad_val_mask(voc, 0)  # in rank 0's shard
    ds = open_split(locate_voc(voc), "val", eval_transforms(32), 21)
    with pytest.raises(DataError, match=f"mask {mask_path} holds class values \\[30\\]"):
        eval_loader(ds, 2, 0, rank=1, world=2)  # under DDP rank 1 stops too, with the same message


def test_bad_validation_mask_stops_training_before_the_first_step(voc, tmp_path):
    mask_path = _plant_bad_val_mask(voc, 2)
    run = tmp_path / "run"
    r = segclip(["train", "--data", str(voc), *TINY, "--epochs", "1", "--batch-size", "2", "--out", str(run)],
                tmp_path / "cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"mask {mask_path} holds class values [30], but num_classes is 21" in r.stderr
    assert not (run / "steps.jsonl").exists()  # no epoch was trained (and lost)


def test_relative_data_paths_are_made_absolute(voc, tmp_path, monkeypatch):
    import argparse

    from segclip.train.trainer import resolve_data

    d = voc / "VOCdevkit" / "VOC2012"
    monkeypatch.chdir(d)
    assert locate_voc(".").voc_dir == d  # Path(".").name is ""
    monkeypatch.chdir(voc)
    args = argparse.Namespace(data="VOCdevkit", cache_dir="links", crop_size=None, eval_size=None)
    loc, _, _ = resolve_data(args, True, lambda *a: None)
    assert args.data == str(voc / "VOCdevkit") and args.cache_dir == str(voc / "links")  # as stored in checkpoints
    assert loc.voc_dir == d
