"""The one place that loads segclip's compiled libraries and knows which backends exist, and why not.

Loading is tried once, at import. ``import segclip`` never fails because a library is missing or
broken: it warns once, naming the reason, and the pure-PyTorch backend takes over.

Environment:
    SEGCLIP_BACKEND: ``auto`` (default), ``torch``, ``cpu`` or ``cuda``. ``torch`` does not even load
        the compiled libraries; ``cpu``/``cuda`` make that backend the default for ``backend="auto"``
        (an error where it cannot be used). Read once, at import.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import warnings

import torch

BACKEND_NAMES = ("cpu", "cuda", "torch")
_VALID_ENV = ("auto",) + BACKEND_NAMES


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here.

    Attributes:
        name: ``cpu``, ``cuda`` or ``torch``.
        available: the backend can run on this machine now.
        loaded: its kernels are registered (``torch.ops.segclip.*`` has them); always True for torch.
        reason: why it is not available (None when it is).
    """

    name: str
    available: bool
    loaded: bool
    reason: str | None = None

    def __str__(self) -> str:
        return f"{self.name}: " + ("available" if self.available else f"unavailable ({self.reason})")


def _read_env_backend() -> str:
    value = os.environ.get("SEGCLIP_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID_ENV:
        warnings.warn(f"SEGCLIP_BACKEND={value!r} is not one of {_VALID_ENV}; using 'auto'", stacklevel=3)
        return "auto"
    return value


ENV_BACKEND = _read_env_backend()


def _try_import(module: str) -> str | None:
    """Imports a compiled module; returns None on success, else why it failed."""
    if importlib.util.find_spec(module) is None:
        return "not compiled"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken build must not break `import segclip`
        return f"failed to load: {type(exc).__name__}: {exc}"
    return None


def _load() -> tuple[str | None, str | None]:
    if ENV_BACKEND == "torch":
        reason = "disabled by SEGCLIP_BACKEND=torch"
        return reason, reason
    cpu_error = _try_import("segclip._C")
    if cpu_error == "not compiled":
        cpu_error = "not compiled (build with `make build` or `pip install --no-build-isolation -e .`)"
    if cpu_error is not None:
        return cpu_error, "the op library segclip._C is unavailable: " + cpu_error
    cuda_error = _try_import("segclip._C_cuda")
    if cuda_error == "not compiled":
        cuda_error = "not compiled (build with SEGCLIP_WITH_CUDA=1 and a CUDA toolkit)"
    return None, cuda_error


CPU_ERROR, CUDA_ERROR = _load()
CPU_LOADED = CPU_ERROR is None
CUDA_LOADED = CUDA_ERROR is None

if ENV_BACKEND != "torch":
    if not CPU_LOADED:
        warnings.warn(f"segclip: compiled kernels unavailable ({CPU_ERROR}); using the pure-PyTorch "
                      "backend", RuntimeWarning, stacklevel=2)
    elif not CUDA_LOADED and (CUDA_ERROR.startswith("failed") or torch.cuda.is_available()):
        warnings.warn(f"segclip: CUDA kernels unavailable ({CUDA_ERROR}); CUDA gradients use the "
                      "pure-PyTorch backend", RuntimeWarning, stacklevel=2)

def compiled_for(device_type: str) -> bool:
    """True when segclip's kernels are registered for this device type."""
    return (device_type == "cpu" and CPU_LOADED) or (device_type == "cuda" and CUDA_LOADED)


def use_kernel(backend: str, device: torch.device) -> bool:
    """True when ``device``'s gradients go to a compiled kernel, False for segclip.reference.

    ``backend`` is a public call's argument (``auto``, ``torch``, ``cpu`` or ``cuda``): ``auto`` follows
    SEGCLIP_BACKEND, then the kernels compiled here; an explicit one that cannot run raises.
    """
    requested = ENV_BACKEND if backend == "auto" else backend
    if requested == "auto":
        return compiled_for(device.type)
    if requested == "torch":
        return False
    if device.type != requested:
        raise ValueError(f"backend={requested!r} cannot handle gradients on {device}; "
                         "use backend='auto' to pick a backend per device")
    if not compiled_for(requested):
        raise RuntimeError(f"backend={requested!r} is unavailable: {backends()[requested].reason}")
    return True


def backends() -> dict[str, BackendInfo]:
    """Which backends exist on this machine and, for each one that does not, why.

    Returns:
        A dict ``{"cpu": BackendInfo, "cuda": BackendInfo, "torch": BackendInfo}``.
    """
    cuda_reason = CUDA_ERROR
    if cuda_reason is None and not torch.cuda.is_available():
        cuda_reason = "compiled and loaded, but no CUDA device is visible"
    return {
        "cpu": BackendInfo("cpu", CPU_LOADED, CPU_LOADED, CPU_ERROR),
        "cuda": BackendInfo("cuda", cuda_reason is None, CUDA_LOADED, cuda_reason),
        "torch": BackendInfo("torch", True, True, None),
    }
