"""Loading and choosing backends: backends() reports, SEGCLIP_BACKEND, and an import that survives a
missing or broken compiled library with one clear warning."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import segclip

PKG = Path(segclip.__file__).parent


def _run(code: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("SEGCLIP_BACKEND", None) if "SEGCLIP_BACKEND" not in (env_extra or {}) else None
    if cwd is not None:
        env["PYTHONPATH"] = str(cwd)
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=cwd)


CHECK_VALUES = """
    import torch, segclip
    p = torch.nn.Parameter(torch.zeros(1000)); p.grad = torch.randn(1000, dtype=torch.float64).float()
    ref = p.grad.double().norm().item()
    total = segclip.fused_clip_([p], ref / 2)
    assert abs(total.item() - ref) / ref < 1e-6, (total, ref)
    assert abs(p.grad.double().norm().item() - ref / 2) / ref < 1e-6
    print({k: (v.available, v.reason) for k, v in segclip.backends().items()})
"""


def test_backends_reports_every_backend_with_a_reason():
    info = segclip.backends()
    assert set(info) == {"cpu", "cuda", "torch"}
    assert info["torch"].available and info["torch"].reason is None
    for b in info.values():
        assert b.available == (b.reason is None)
        assert str(b).startswith(b.name)
    if glob.glob(str(PKG / "_C.*.so")):  # built (as `make test` does): it must have loaded
        assert info["cpu"].available, info["cpu"].reason


def test_segclip_backend_torch_skips_the_libraries():
    out = _run(CHECK_VALUES, {"SEGCLIP_BACKEND": "torch"})
    assert out.returncode == 0, out.stderr
    assert "disabled by SEGCLIP_BACKEND=torch" in out.stdout
    assert "Warning" not in out.stderr


def test_bad_segclip_backend_value_warns_and_uses_auto():
    out = _run(CHECK_VALUES, {"SEGCLIP_BACKEND": "fastest"})
    assert out.returncode == 0, out.stderr
    assert "SEGCLIP_BACKEND='fastest'" in out.stderr


def _package_copy(tmp_path: Path, so_bytes: bytes | None) -> Path:
    dest = tmp_path / "segclip"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if so_bytes is not None:
        suffix = next(s for s in __import__("importlib.machinery").machinery.EXTENSION_SUFFIXES if s.endswith(".so"))
        (dest / f"_C{suffix}").write_bytes(so_bytes)
    return tmp_path


def test_missing_library_warns_once_and_falls_back(tmp_path):
    root = _package_copy(tmp_path, None)
    out = _run(CHECK_VALUES, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("compiled kernels unavailable (not compiled") == 1
    assert "'cpu': (False, 'not compiled" in out.stdout


def test_broken_library_warns_with_the_load_error_and_falls_back(tmp_path):
    root = _package_copy(tmp_path, b"this is not an ELF file")
    out = _run(CHECK_VALUES + """
    try:
        segclip.fused_clip_([p], 1.0, backend="cpu")
    except RuntimeError as e:
        print("explicit:", e)
    """, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("failed to load: ImportError") == 1
    assert "explicit: backend='cpu' is unavailable: failed to load: ImportError" in out.stdout
