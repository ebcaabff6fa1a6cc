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

import errno
import os
import pickle
import random
import shutil
import zipfile
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder that cannot be written); the
    message says so in one line, and that the previous file of that name is intact."""


def _write_failure(path: Path, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:  # torch's writer: "[enforce fail at inline_container.cc:...] ... file write failed"
        reason = "the write failed"
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        try:
            free = shutil.disk_usage(path.parent).free
            reason += f" ({free / 1e6:.0f} MB free on its file system)"
        except OSError:
            pass
    kept = (f"the previous {path.name} is intact (the save writes a temporary file and renames it)"
            if path.exists() else "nothing was written")
    return f"cannot write checkpoint {path}: {reason}; {kept}"


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically (see the module doc).

    Raises:
        CheckpointWriteError: the file could not be written (``path`` is then as it was).
    """
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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, CheckpointWriteError):
            raise CheckpointWriteError(_write_failure(path, exc)) from None
        raise
    _fsync_dir(path.parent)


def load(path: str | Path, map_location="cpu") -> dict:
    """Loads a checkpoint with ``weights_only=True``; a clear error when it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot load checkpoint {path}: the file is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # NOTE: torch's own message advises weights_only=False: wrong here (segclip's checkpoints
        # never need it) and unsafe (unpickling runs code from the file), so it is not passed on.
        if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
            raise ValueError(f"cannot load checkpoint {path}: not a file written by torch.save") from None
        if isinstance(exc, pickle.UnpicklingError):
            raise ValueError(f"cannot load checkpoint {path}: it holds Python objects other than tensors "
                             f"and plain values, so it is not a segclip checkpoint (segclip does not load "
                             f"such files: unpickling them can run code)") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot load checkpoint {path}: {type(exc).__name__}: {first}") from None
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} holds only model weights (a state dict), not a segclip checkpoint; to "
                         f"start a training run from them, use segclip train --weights {path}")
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
