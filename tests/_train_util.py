"""Helpers shared by the tests/test_train_*.py files (tiny datasets, running the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A tiny but real training configuration: 32 px synthetic images, a handful of steps.
TINY = ["--synthetic-train", "16", "--synthetic-val", "4", "--synthetic-size", "32",
        "--batch-size", "4", "--workers", "0", "--no-progress", "--threads", "1"]


def env(cache: Path, **extra: str) -> dict:
    """The environment for a CLI subprocess: the synthetic cache under ``cache``, one thread."""
    e = dict(os.environ)
    e.update(SEGCLIP_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("SEGCLIP_TRACEBACK", None)
    e.update(extra)
    return e


def segclip(args: list[str], cache: Path, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    """Runs ``python -m segclip ARGS`` and returns the finished process (output captured)."""
    return subprocess.run([sys.executable, "-m", "segclip", *args], cwd=REPO, env=env(cache, **extra),
                          capture_output=True, text=True, timeout=timeout)


def tiny_voc(cache: Path, num_train: int = 8, num_val: int = 4, size: int = 32, num_classes: int = 21) -> Path:
    """A generated VOC-format folder (holding VOCdevkit) in ``cache``."""
    from segclip.train.synthetic import SyntheticSpec, ensure_synthetic

    return ensure_synthetic(SyntheticSpec(num_train, num_val, size, num_classes, seed=0), cache,
                            log=lambda *a: None)
