"""Checkpoint files: written atomically, loadable with ``torch.load(weights_only=True)``.

Atomic: the checkpoint is written to a temporary file in the same folder, flushed and fsynced,
renamed over the destination (``os.replace``, atomic on POSIX), and the folder is fsynced. A crash
at any moment leaves either the previous complete file or the new complete file, never a
half-written one; at most a stray ``.<name>.tmp-<pid>`` file, which the next save in that folder
removes.

Contents hold only tensors and plain Python values (dict, list, tuple, str, int, float, bool,
None): no pickled classes, so ``weights_only=True`` loads them and a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

TMP_MARK = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Removes temporary files left by saves that were killed (not our own process's)."""
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit(TMP_MARK, 1)[1])
        except ValueError:
            continue
        if pid != os.getpid():
            p.unlink(missing_ok=True)


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(path: str | Path, map_location="cpu") -> dict:
    """Loads a checkpoint with ``weights_only=True``; a clear error when it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a segclip checkpoint (no 'model' entry)")
    return ckpt


def rng_state() -> dict:
    """This process's RNG states as plain values and tensors: python, numpy, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss_np)))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            torch.cuda.set_rng_state(cuda[0].cpu())
