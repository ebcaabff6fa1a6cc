"""The one JSON layout that every suite writes on every device (``segclip-bench/2``).

A file holds one run of one suite::

    {"schema": "segclip-bench/2", "suite": "clip",
     "machine": {"cpu_model", "cpu_cores", "torch_threads", "gpu_name", "cuda", "torch_version",
                 "python_version", "platform", "segclip_version", "segclip_backends", "date",
                 "command", "load_average_start", "load_average_end"},   # null where unknown
     "settings": {...},                  # what the run was asked to do (suite-specific keys)
     "cases": {device: {case: {"n_tensors", "n_elements", "description", ...}}},
     "extra": {...},                     # run-wide figures, e.g. "cuda_bandwidth"
     "wall_time_s": 12.3,
     "records": [Record, ...]}           # one per device x case x dtype x mode x implementation

A record (:class:`Record`) is flat: the keys below, then the suite's own figures (``extra``, e.g.
``norm_rel_err``, ``images_per_s``). ``median_s`` is null when the implementation did not run;
``available`` false and ``reason`` say why. Ratios (speedups, fraction of the bound) are not
stored: the report computes them from the medians.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
from pathlib import Path

import torch

from .timers import load_average

SCHEMA = "segclip-bench/2"


class BadJSON(ValueError):
    """A benchmark JSON that cannot be used: the message names the file, for a one-line error."""


@dataclasses.dataclass
class Record:
    """One figure: the median time of one call of ``impl`` on ``case`` (seconds)."""

    device: str
    case: str
    impl: str
    dtype: str = "fp32"
    mode: str = "-"
    median_s: float | None = None
    iqr_s: float | None = None
    min_s: float | None = None
    n_samples: int = 0
    timer: str | None = None  # "cpu", "cuda-events", "cuda-events-synced", "computed", or a suite's own
    available: bool = True
    reason: str | None = None
    noisy: bool = False  # timed while other processes kept the CPUs busy (after the retries)
    extra: dict = dataclasses.field(default_factory=dict)

    FIELDS = ()  # filled below: the names of the fields above, but extra

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.device, self.case, self.dtype, self.mode, self.impl

    def as_json(self) -> dict:
        out = {k: _round(getattr(self, k)) for k in self.FIELDS
               if getattr(self, k) is not None or k == "median_s"}
        return {**out, **{k: _round(v) for k, v in self.extra.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Record:
        return cls(**{k: d[k] for k in cls.FIELDS if k in d},
                   extra={k: v for k, v in d.items() if k not in cls.FIELDS})


Record.FIELDS = tuple(f.name for f in dataclasses.fields(Record) if f.name != "extra")


def _round(x, digits: int = 4):
    """Floats to 4 significant digits: timing noise is far larger."""
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return float(f"{x:.{digits}g}")
    return x


def machine_info(threads: int, command: str) -> dict:
    import segclip

    cuda = torch.cuda.is_available()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_model": cpu, "cpu_cores": os.cpu_count(), "torch_threads": threads,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "platform": platform.platform(), "segclip_version": getattr(segclip, "__version__", None),
        "segclip_backends": {name: {"available": b.available, "loaded": b.loaded, "reason": b.reason}
                             for name, b in segclip.backends().items()},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command, "load_average_start": load_average(), "load_average_end": None,
    }


def new_result(suite: str, machine: dict, settings: dict) -> dict:
    return {"schema": SCHEMA, "suite": suite, "machine": machine, "settings": settings, "cases": {},
            "extra": {}, "wall_time_s": None, "records": []}


def dumps(result: dict) -> str:
    """The JSON text: the head indented, one record per line (small; diffs read per figure)."""
    head = json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1)
    records = ",\n  ".join(json.dumps(r.as_json()) for r in result["records"])
    return head[:-2] + ',\n "records": [\n  ' + records + "\n ]\n}\n"


def load(path) -> dict:
    """A ``segclip-bench/2`` file, its records as :class:`Record`.

    Raises:
        BadJSON: missing or unreadable, not JSON, another layout, or a malformed record (one line
            naming the file).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadJSON(f"{path}: no such file") from None
    except OSError as exc:
        raise BadJSON(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadJSON(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        what = f"schema {data.get('schema')!r}" if isinstance(data, dict) else f"its top level is {type(data).__name__}"
        raise BadJSON(f"{path}: not a {SCHEMA} benchmark JSON ({what})")
    records = data.get("records")
    if not isinstance(records, list) or not isinstance(data.get("machine", {}), dict):
        raise BadJSON(f"{path}: 'records' must be a list and 'machine' an object")
    out = []
    for i, r in enumerate(records):
        t = r.get("median_s") if isinstance(r, dict) else None
        if (not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("device", "case", "impl"))
                or not (t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0))):
            raise BadJSON(f"{path}: record {i} is not a record (device, case, impl: strings; median_s: "
                          f"a time > 0 or null): {json.dumps(r)[:120]}")
        out.append(Record.from_json(r))
    data["records"] = out
    data.setdefault("machine", {})
    return data
