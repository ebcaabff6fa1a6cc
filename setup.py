"""Builds segclip's kernels: segclip._C (op schemas + CPU kernels) and, when switched on,
segclip._C_cuda (CUDA kernels).

Build switches (environment variables), each printed with its resolved value:
  SEGCLIP_WITH_CUDA   auto (default): build the CUDA library when a CUDA toolkit is found and torch
                      was built with CUDA; 1: require it (fail if impossible); 0: never.
  CUDA_HOME           the toolkit's root (holds bin/nvcc and include/cuda_runtime.h). When unset it
                      is resolved from the nvcc on PATH, following symlinks and wrapper scripts.
  TORCH_CUDA_ARCH_LIST  GPU targets, default "7.5;8.0;9.0+PTX" (T4, A100/RTX 30xx/40xx, H100/H200,
                        PTX for newer chips).
  SEGCLIP_CPU_ARCH    native (default): compile the CPU kernels for the building machine's vector
                      width (-march=native: AVX2 / AVX-512 where present); portable: generic x86-64
                      code that runs anywhere (slower). See csrc/cpu/vec_capability.h.
  SEGCLIP_DEBUG       1: -O0 -g instead of -O3.
  SEGCLIP_NO_EXTENSIONS  1: install the Python package only (the pure-PyTorch backend); the Makefile
                      uses it for the one-time editable install, then builds in place with ninja.
  MAX_JOBS            parallel compile jobs (ninja), as usual for torch extensions.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def resolve_cuda_home():
    """The CUDA toolkit root, or None. Set before torch.utils.cpp_extension is imported, since
    torch resolves CUDA_HOME once at import time (and guesses wrong from a wrapper script)."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if _is_toolkit(explicit) else None
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


SEGCLIP_WITH_CUDA = os.environ.get("SEGCLIP_WITH_CUDA", "auto").strip().lower()
if SEGCLIP_WITH_CUDA not in ("auto", "0", "1"):
    sys.exit(f"SEGCLIP_WITH_CUDA must be auto, 0 or 1, got {SEGCLIP_WITH_CUDA!r}")
CUDA_HOME = resolve_cuda_home() if SEGCLIP_WITH_CUDA != "0" else None
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0+PTX")

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEBUG = os.environ.get("SEGCLIP_DEBUG", "0") == "1"
CPU_ARCH = os.environ.get("SEGCLIP_CPU_ARCH", "native").strip().lower()
if CPU_ARCH not in ("native", "portable"):
    sys.exit(f"SEGCLIP_CPU_ARCH must be native or portable, got {CPU_ARCH!r}")
TORCH_HAS_CUDA = torch.version.cuda is not None
BUILD_CUDA = SEGCLIP_WITH_CUDA != "0" and bool(CUDA_HOME) and TORCH_HAS_CUDA
if SEGCLIP_WITH_CUDA == "1" and not BUILD_CUDA:
    sys.exit("SEGCLIP_WITH_CUDA=1 but the CUDA library cannot be built: "
             + ("torch has no CUDA support" if not TORCH_HAS_CUDA
                else "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"))

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags = opt + ["-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]
if CPU_ARCH == "native":
    cxx_flags.append("-march=native")
nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo"]

cpu_sources = ["csrc/segclip.cpp", "csrc/adapt_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))

NO_EXTENSIONS = os.environ.get("SEGCLIP_NO_EXTENSIONS", "0") == "1"
ext_modules = [] if NO_EXTENSIONS else [
    CppExtension("segclip._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                 extra_link_args=["-fopenmp"]),
]
if BUILD_CUDA and cuda_sources and not NO_EXTENSIONS:
    ext_modules.append(CUDAExtension(
        "segclip._C_cuda", cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": opt + ["-Wall"], "nvcc": nvcc_flags}))

print("segclip build configuration:")
for key, value in [
    ("torch", torch.__version__), ("torch CUDA", torch.version.cuda),
    ("SEGCLIP_WITH_CUDA", SEGCLIP_WITH_CUDA), ("CUDA_HOME", CUDA_HOME),
    ("BUILD_CUDA", BUILD_CUDA), ("TORCH_CUDA_ARCH_LIST", os.environ["TORCH_CUDA_ARCH_LIST"] if BUILD_CUDA else "-"),
    ("SEGCLIP_CPU_ARCH", CPU_ARCH), ("SEGCLIP_DEBUG", DEBUG), ("cxx flags", " ".join(cxx_flags)),
    ("nvcc flags", " ".join(nvcc_flags) if BUILD_CUDA else "-"),
    ("extensions", ", ".join(e.name for e in ext_modules)),
]:
    print(f"  {key:<22} = {value}")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
