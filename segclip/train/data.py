"""Datasets and loaders: PASCAL VOC (or the synthetic VOC look-alike) through torchvision's
``VOCSegmentation(download=False)``.

Layout problems (no dataset, no split file, a listed image missing) are found before training,
and an image that cannot be decoded raises :class:`DataError` naming the file, instead of a
traceback from deep inside PIL.

Reproducibility: the random augmentation of sample ``i`` in epoch ``e`` is drawn from a generator
seeded with ``(seed, e, i)``, and the training order comes from ``DistributedSampler`` seeded with
``seed`` and ``set_epoch(e)``. So the batches of an epoch do not depend on the process's RNG state,
the number of loader workers, or whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.datasets import VOCSegmentation
from torchvision.datasets.voc import DATASET_YEAR_DICT
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from . import distributed as dist_utils
from .errors import DataError
from .interrupt import ignore_in_worker
from .palette import VOID
from .synthetic import SyntheticSpec, ensure_synthetic

__all__ = ["DataError", "VOCLocation", "locate_voc", "check_split", "open_split", "SegmentationSet",
           "train_loader", "eval_loader", "pad_collate", "ShardSampler", "SameSizeBatches", "sample_seed",
           "transformed_size", "absolute_path", "resolve_data"]

_YEAR_DIR = re.compile(r"^VOC(20(0[7-9]|1[0-2]))$")
EXPECTED_LAYOUT = (
    "expected a PASCAL VOC folder: either the folder that holds VOCdevkit/VOC2012 or the VOC2012 "
    "folder itself (any VOCdevkit/VOC2007..VOC2012 works), laid out as\n"
    "    VOC2012/ImageSets/Segmentation/{train,val}.txt   image names, one per line\n"
    "    VOC2012/JPEGImages/<name>.jpg                      images\n"
    "    VOC2012/SegmentationClass/<name>.png               palette PNG masks, 255 = void\n"
    "or use --data synthetic (the default) for the generated dataset")


@dataclass(frozen=True)
class VOCLocation:
    """Where a VOC dataset lies: ``voc_dir`` is the ``VOC20xx`` folder; ``root`` and ``year`` are
    what ``VOCSegmentation`` is given (``root/<base_dir of year>`` is ``voc_dir``)."""

    voc_dir: Path
    root: Path
    year: str


def _voc_dirs_in(folder: Path) -> list[Path]:
    found = []
    for sub in (folder, folder / "VOCdevkit", folder / "TrainVal" / "VOCdevkit"):
        if sub.is_dir():
            found += [p for p in sub.iterdir() if p.is_dir() and _YEAR_DIR.match(p.name)]
    return found


def _shim_root(voc_dir: Path, year: str, cache: Path) -> Path:
    """A folder whose ``<base_dir of year>`` is a symlink to ``voc_dir``, for a VOC20xx folder that
    does not sit inside a ``VOCdevkit`` folder (VOCSegmentation insists on that nesting)."""
    key = hashlib.sha1(str(voc_dir.resolve()).encode()).hexdigest()[:12]
    root = cache / "voc-links" / key
    link = root / DATASET_YEAR_DICT[year]["base_dir"]
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        tmp.symlink_to(voc_dir.resolve(), target_is_directory=True)
        os.replace(tmp, link)
    return root


def locate_voc(path: str | os.PathLike, cache: Path | None = None) -> VOCLocation:
    """Finds the VOC20xx folder at or under ``path`` (the highest year when several are there).

    Raises:
        DataError: ``path`` does not exist or holds no VOC20xx folder; the message shows the layout.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"dataset folder not found: {path}\n{EXPECTED_LAYOUT}")
    if not path.is_dir():
        raise DataError(f"dataset path is not a folder: {path}\n{EXPECTED_LAYOUT}")
    # Absolute, without "." or ".." (so "." inside VOC2012 has the name VOC2012); symlinks are kept.
    path = Path(os.path.abspath(path))
    if _YEAR_DIR.match(path.name):
        voc_dir = path
    else:
        candidates = sorted(_voc_dirs_in(path), key=lambda p: p.name)
        if not candidates:
            raise DataError(f"no VOCdevkit/VOC20xx folder in {path}\n{EXPECTED_LAYOUT}")
        voc_dir = candidates[-1]
    year = _YEAR_DIR.match(voc_dir.name).group(1)
    base_dir = Path(DATASET_YEAR_DICT[year]["base_dir"])
    n = len(base_dir.parts)
    if voc_dir.parts[-n:] == base_dir.parts:
        root = Path(*voc_dir.parts[:-n]) if len(voc_dir.parts) > n else Path(".")
    else:
        from .synthetic import cache_dir
        root = _shim_root(voc_dir, year, cache if cache is not None else cache_dir())
    return VOCLocation(voc_dir=voc_dir, root=root, year=year)


def check_split(loc: VOCLocation, split: str) -> list[str]:
    """The names listed in ``split``'s file, after checking that the file and every image and mask
    it lists exist.

    Raises:
        DataError: naming the missing split file, folder, or the first missing files.
    """
    split_file = loc.voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"split file not found: {split_file}\n(the '{split}' split lists its image names "
                        f"there, one per line)\n{EXPECTED_LAYOUT}")
    try:
        # utf-8-sig: a byte order mark at the start is not part of the first name.
        names = [line.strip() for line in split_file.read_text(encoding="utf-8-sig").splitlines()
                 if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file {split_file}: {exc}") from None
    if not names:
        raise DataError(f"split file {split_file} lists no images")
    for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        folder = loc.voc_dir / sub
        if not folder.is_dir():
            raise DataError(f"folder not found: {folder}\n{EXPECTED_LAYOUT}")
        missing = [folder / f"{n}{ext}" for n in names if not (folder / f"{n}{ext}").is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"{split_file} lists {len(names)} images, but {missing[0]}{more} "
                            f"{'is' if len(missing) == 1 else 'are'} missing")
    return names


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a hash of (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1, np.uint64)[0]
               >> 1)


class SegmentationSet(Dataset):
    """A ``VOCSegmentation`` split as (image float CxHxW, mask int64 HxW) pairs.

    Args:
        voc: the torchvision dataset (no transforms of its own).
        transforms: a v2 transform taking ``(tv_tensors.Image, tv_tensors.Mask)``.
        num_classes: mask values must be below it or 255 (checked per sample).
        seed: when not None, sample ``i`` of epoch ``e`` is transformed under ``sample_seed(seed, e, i)``
            (random augmentation); None for deterministic transforms.
    """

    def __init__(self, voc: VOCSegmentation, transforms, num_classes: int, seed: int | None = None):
        self.voc = voc
        self.transforms = transforms
        self.num_classes = num_classes
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Takes effect in the next ``iter(loader)`` (workers copy the dataset when they start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.voc)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The untransformed pair, read through ``VOCSegmentation.__getitem__``."""
        image_path, mask_path = self.voc.images[index], self.voc.masks[index]
        try:
            image, mask = self.voc[index]
            mask_array = np.array(mask)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            which = image_path if not _readable(image_path) else mask_path
            raise DataError(f"cannot read {which}: {type(exc).__name__}: {exc}") from None
        self._check_mask(index, mask_array, mask.mode, (image.width, image.height))
        return (tv_tensors.Image(F.pil_to_tensor(image)),
                tv_tensors.Mask(torch.from_numpy(mask_array)))

    def _check_mask(self, index: int, mask_array: np.ndarray, mode: str, image_size: tuple[int, int]) -> None:
        """A clear error unless the mask is single-channel, of the image's size, with valid values."""
        image_path, mask_path = self.voc.images[index], self.voc.masks[index]
        if mask_array.ndim != 2:
            raise DataError(f"mask {mask_path} is not a single-channel (palette) PNG: mode "
                            f"{mode}, shape {mask_array.shape}")
        if mask_array.shape != (image_size[1], image_size[0]):
            raise DataError(f"mask {mask_path} is {mask_array.shape[1]}x{mask_array.shape[0]} but image "
                            f"{image_path} is {image_size[0]}x{image_size[1]}")
        bad = np.unique(mask_array[(mask_array >= self.num_classes) & (mask_array != VOID)])
        if bad.size:
            raise DataError(f"mask {mask_path} holds class values {bad.tolist()[:8]}, but num_classes is "
                            f"{self.num_classes} (valid: 0..{self.num_classes - 1} and {VOID} = void)")

    def _scan_one(self, index: int) -> tuple[int, int]:
        image_path, mask_path = self.voc.images[index], self.voc.masks[index]
        try:
            with Image.open(image_path) as im:  # the header only: the size, and that it is an image
                size = im.size
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read {image_path}: {type(exc).__name__}: {exc}") from None
        try:
            with Image.open(mask_path) as m:
                mode, mask_array = m.mode, np.array(m)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read {mask_path}: {type(exc).__name__}: {exc}") from None
        self._check_mask(index, mask_array, mode, size)
        return size

    def scan(self, indices: list[int] | None = None) -> dict[int, tuple[int, int]]:
        """Checks the masks of ``indices`` (all by default) as :meth:`load` does, without decoding the
        images (only their headers), and returns each image's ``(width, height)``. Cheap next to an
        epoch (the masks are small PNGs), so evaluation data errors show up before training."""
        from concurrent.futures import ThreadPoolExecutor

        indices = list(range(len(self))) if indices is None else list(indices)
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            return dict(zip(indices, pool.map(self._scan_one, indices)))

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index`` of the epoch set by :meth:`set_epoch`, or ``(epoch, index)`` (what
        :class:`ResumableSampler` yields, so persistent loader workers, which keep the dataset copy
        they started with, still augment each epoch differently)."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image, mask = self.load(index)
        if self.seed is None:
            image, mask = self.transforms(image, mask)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                image, mask = self.transforms(image, mask)
        return image, mask


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks a batch, padding to the largest height and width: images with 0, masks with void.
    (Evaluation batches hold images of one size, see :class:`SameSizeBatches`: padding would change
    what the models' global pooling sees, so the predictions would depend on the batching.)"""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = batch[0][0].new_zeros((len(batch), batch[0][0].shape[0], h, w))
    masks = torch.full((len(batch), h, w), VOID, dtype=torch.int64)
    for i, (img, mask) in enumerate(batch):
        images[i, :, :img.shape[-2], :img.shape[-1]] = img
        masks[i, :mask.shape[-2], :mask.shape[-1]] = mask
    return images, masks


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, in order, without padding: each sample is evaluated by
    exactly one rank, so summed confusion matrices count every pixel once."""

    def __init__(self, length: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _open_voc(loc: VOCLocation, split: str, names: list[str]) -> VOCSegmentation:
    """``VOCSegmentation`` for the images ``names`` of any split file.

    torchvision's constructor only accepts the image sets train/trainval/val (and test for 2007),
    reads that split's file, and keeps its lines as they are (a blank line becomes the image
    ".jpg"). So it is always constructed from an empty ``train.txt`` in a temporary stand-in
    folder, and its ``images``/``targets`` lists are then set from ``names`` (the cleaned lines of
    ``split``'s file, see :func:`check_split`): no split file but ``split``'s own is ever read (an
    unrelated, unreadable ``train.txt`` does not matter). Reading a sample stays
    ``VOCSegmentation.__getitem__``.
    """
    with tempfile.TemporaryDirectory(prefix="segclip-voc-") as stand_in:
        stub = Path(stand_in) / DATASET_YEAR_DICT[loc.year]["base_dir"] / "ImageSets" / "Segmentation"
        stub.mkdir(parents=True)
        (stub / "train.txt").write_text("")
        voc = VOCSegmentation(stand_in, year=loc.year, image_set="train", download=False)
    voc.root = str(loc.root)
    voc.image_set = split
    voc.images = [str(loc.voc_dir / "JPEGImages" / f"{n}.jpg") for n in names]
    voc.targets = [str(loc.voc_dir / "SegmentationClass" / f"{n}.png") for n in names]
    return voc


def open_split(loc: VOCLocation, split: str, transforms, num_classes: int,
               seed: int | None = None) -> SegmentationSet:
    """Checks ``split`` (see :func:`check_split`) and opens it through ``VOCSegmentation``; any
    split file name works (``train_aug``, ``test``, ...), see :func:`_open_voc`."""
    names = check_split(loc, split)
    try:
        voc = _open_voc(loc, split, names)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(f"torchvision's VOCSegmentation cannot open {loc.voc_dir} (split {split!r}): "
                        f"{exc}\n{EXPECTED_LAYOUT}") from None
    return SegmentationSet(voc, transforms, num_classes, seed)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start after its first ``start`` indices (a resume in
    the middle of an epoch: the batches already trained are not loaded again). The order is the
    epoch's usual one, so the remaining batches are those the uninterrupted run would see. It
    yields ``(epoch, index)`` pairs (see :meth:`SegmentationSet.__getitem__`)."""

    start = 0

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return super().__len__() - self.start


def _worker_options(workers: int, prefetch_factor: int | None) -> dict:
    """DataLoader settings for ``workers`` processes: persistent (not started again every epoch),
    ``prefetch_factor`` batches each in flight, Ctrl-C left to the main process."""
    if not workers:
        return {}
    return {"persistent_workers": True, "prefetch_factor": prefetch_factor or 2,
            "worker_init_fn": ignore_in_worker}


def train_loader(dataset: SegmentationSet, batch_size: int, workers: int, seed: int, rank: int = 0,
                 world: int = 1, pin_memory: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """Shuffled (``DistributedSampler`` seeded with ``seed``; call ``loader.sampler.set_epoch(e)``
    before each epoch), dropping the last incomplete batch. ``pin_memory``: page-locked batches
    (CUDA: faster, asynchronous copies); see :func:`_worker_options` for the rest."""
    per_rank = len(dataset) // world
    if per_rank < batch_size:
        raise DataError(f"the training split has {len(dataset)} images: {per_rank} per process, fewer "
                        f"than --batch-size {batch_size}; lower the batch size")
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                               drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=pad_collate, drop_last=True, pin_memory=pin_memory,
                      **_worker_options(workers, prefetch_factor))


def transformed_size(transforms, size: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of an image of ``size`` after ``transforms`` (a ``v2.Compose`` or one
    transform): its ``v2.Resize`` steps, which depend on the size alone, are applied to an empty
    bounding box of that canvas; the other evaluation steps (dtype, normalisation) keep the size."""
    box = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(size[1], size[0]))
    for step in getattr(transforms, "transforms", [transforms]):
        if isinstance(step, v2.Resize):
            box = step(box)
    height, width = box.canvas_size
    return int(width), int(height)


class SameSizeBatches(Sampler[list[int]]):
    """Batches of up to ``batch_size`` indices whose images have the same size (the order of the
    indices within each size, sizes in order of first appearance). Every image then gets the same
    prediction whatever the batch size or number of processes: nothing is padded, and the models'
    global pooling (LRASPP, the ASPP of DeepLabV3) sees only the image. ``sizes`` should be the
    sizes the model sees (after the evaluation resize, see :func:`transformed_size`), so images of
    different raw sizes that resize alike share batches."""

    def __init__(self, indices: list[int], sizes: dict[int, tuple[int, int]], batch_size: int):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in indices:
            groups.setdefault(sizes[i], []).append(i)
        self.batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def eval_loader(dataset: SegmentationSet, batch_size: int, workers: int, rank: int = 0, world: int = 1,
                pin_memory: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """This rank's shard (:class:`ShardSampler`) in batches of images of the same size after the
    evaluation transform (:class:`SameSizeBatches`). Checks the masks of the whole split first
    (:meth:`SegmentationSet.scan`, on every rank: a bad mask in another rank's shard stops every
    rank with the same message, instead of one rank failing and the others losing their peer), so
    a bad evaluation mask is reported before training, naming the file."""
    indices = ShardSampler(len(dataset), rank, world).indices
    raw = dataset.scan()
    memo: dict[tuple[int, int], tuple[int, int]] = {}
    for size in raw.values():
        if size not in memo:
            memo[size] = transformed_size(dataset.transforms, size)
    sizes = {i: memo[raw[i]] for i in indices}
    batches = SameSizeBatches(indices, sizes, batch_size)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=pad_collate,
                      pin_memory=pin_memory, **_worker_options(workers, prefetch_factor))


def absolute_path(path) -> str | None:
    """A path option as an absolute path (``~`` expanded, ``.`` and ``..`` removed), so the
    checkpoint's copy works from any directory; None and ``synthetic`` stay as they are. Symlinks
    are kept (not resolved): a ``VOC2012`` link to a folder named otherwise must keep its name."""
    if path is None or str(path) == "synthetic":
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def resolve_data(args, is_main: bool, log) -> tuple:
    """(VOCLocation, crop size, eval size) for ``--data``; the synthetic set is generated by rank 0.
    ``args.data`` and ``args.cache_dir`` are made absolute (they are stored in checkpoints)."""
    args.data, args.cache_dir = absolute_path(args.data), absolute_path(args.cache_dir)
    if str(args.data) == "synthetic":
        spec = SyntheticSpec(args.synthetic_train, args.synthetic_val, args.synthetic_size,
                             args.num_classes, args.synthetic_seed)
        cache = Path(args.cache_dir) if args.cache_dir else None
        if is_main:
            ensure_synthetic(spec, cache, log=log)
        dist_utils.barrier()
        root = ensure_synthetic(spec, cache, log=log)
        default_crop = default_eval = args.synthetic_size
        loc = locate_voc(root, cache)
    else:
        loc = locate_voc(args.data, Path(args.cache_dir) if args.cache_dir else None)
        default_crop, default_eval = 480, 520
    return (loc, args.crop_size if args.crop_size is not None else default_crop,
            args.eval_size if args.eval_size is not None else default_eval)
