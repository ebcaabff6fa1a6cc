"""The run folder and its logs (written by rank 0 only).

    RUN_DIR/config.json     the arguments and the environment (torch, device, world size, ...)
    RUN_DIR/steps.jsonl     one JSON object per optimizer step (see docs/training.md)
    RUN_DIR/epochs.jsonl    one per epoch: training summary and validation metrics
    RUN_DIR/metrics.json    the last evaluation in full (per-class IoU, confusion matrix)
    RUN_DIR/last.pt, best.pt   checkpoints (segclip.train.checkpoint)
    RUN_DIR/plots/*.png     charts (segclip plot)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

STEPS = "steps.jsonl"
EPOCHS = "epochs.jsonl"
CONFIG = "config.json"
METRICS = "metrics.json"
# The timed phases of a step: steps.jsonl's t_<phase> fields (written by engine, drawn by plots).
PHASES = ("data", "forward", "backward", "clip", "step")


def default_run_dir(model: str, root: str | Path = "runs") -> Path:
    """``runs/<model>-<YYYYmmdd-HHMMSS>`` (with a suffix if that exists already)."""
    base = Path(root).expanduser() / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _clean(obj):
    """JSON-safe: non-finite floats become None, paths strings, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: a temporary file beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    """Writes JSON atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(_clean(obj), indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (the process was killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLog:
    """Appends JSONL records to the run folder; ``enabled=False`` (ranks other than 0) writes nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self._steps = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, epochs_done: int, steps_done: int) -> None:
        """On resume: keeps the records of the first ``epochs_done`` epochs and ``steps_done`` steps
        (what the checkpoint holds), and drops the rest: the steps a killed run made after its
        checkpoint are replayed, and must not be logged twice. (Epochs count from 1 in the logs.)"""
        if not self.enabled:
            return
        for name, key, done in ((STEPS, "step", steps_done), (EPOCHS, "epoch", epochs_done)):
            path = self.dir / name
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get(key, math.inf) <= done]
                write_text_atomic(path, "".join(json.dumps(_clean(r)) + "\n" for r in kept))

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._steps is None:
            self._steps = open(self.dir / STEPS, "a", buffering=1)
        self._steps.write(json.dumps(_clean(record)) + "\n")

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.dir / EPOCHS, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def write(self, name: str, obj) -> None:
        if self.enabled:
            write_json(self.dir / name, obj)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
