"""Tests of segclip's CUDA kernels (csrc/cuda/), called directly through ``torch.ops.segclip.*``.

Without a GPU (CI): the CUDA library was built and loads, its kernels are registered, its argument
checks run (by redispatching to the CUDA key), and the chunking / per-thread index logic is checked
by two host programs compiled from csrc/cuda/test/. With a GPU (``-m cuda`` or just run it there):
results against float64 CPU references on fresh random inputs, determinism, no host
synchronisation, CUDA graphs, opcheck, a tensor of more than 2^31 elements.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_cpu_kernel
from test_adaptive import agc_reference

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "segclip"
INF = math.inf
NORM_TYPES = (1.0, 2.0, INF)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Relative tolerance of a norm against the float64 reference, by the least precise dtype in the list.
RTOL = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}
OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
          torch.float64: torch.float64}


# ----------------------------------------------------------------------------------------------
# Finding the build and the toolkit


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit root, resolved like setup.py (CUDA_HOME, the nvcc on PATH, /usr/local/cuda*)."""
    def is_toolkit(root):
        return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h"))

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if is_toolkit(explicit) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "rb") as f:
                head = f.read(4096).decode(errors="replace")
            if head.startswith("#!"):
                candidates += [w[: -len("/bin/nvcc")] for w in head.split() if w.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    return next((c for c in candidates if is_toolkit(c)), None)


TOOLKIT = _cuda_toolkit()
CPU_LIB = sorted(PKG.glob("_C.*.so")) + sorted(PKG.glob("_C.*.pyd"))
CUDA_LIB = sorted(PKG.glob("_C_cuda.*.so")) + sorted(PKG.glob("_C_cuda.*.pyd"))
CUDA_EXPECTED = (TOOLKIT is not None and torch.version.cuda is not None
                 and os.environ.get("SEGCLIP_WITH_CUDA", "auto").strip().lower() != "0")


def _why_no_cuda_lib() -> str | None:
    if not CPU_LIB:
        return "segclip is not built here (run `make build` or `python setup.py build_ext --inplace`)"
    if TOOLKIT is None:
        return "no CUDA toolkit here, so the CUDA library was not built"
    if torch.version.cuda is None:
        return "this torch has no CUDA support, so the CUDA library was not built"
    if not CUDA_EXPECTED:
        return "the CUDA library is switched off (SEGCLIP_WITH_CUDA=0)"
    return None


SKIP_REASON = _why_no_cuda_lib()
if SKIP_REASON is None and CUDA_LIB:
    import segclip._C  # noqa: E402,F401  (declares the schemas and the CPU kernels)
    import segclip._C_cuda as C_cuda  # noqa: E402  (the CUDA kernels)
else:
    C_cuda = None

needs_lib = pytest.mark.skipif(SKIP_REASON is not None or not CUDA_LIB,
                               reason=SKIP_REASON or "segclip/_C_cuda was not built")
HAS_GPU = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_gpu = [needs_lib, cuda, pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible")]


def gpu_test(fn):
    for mark in needs_gpu:
        fn = mark(fn)
    return fn


ops = torch.ops.segclip
CHUNK = C_cuda.CHUNK_ELEMS if C_cuda else 1 << 16
MAX_TENSORS = C_cuda.MAX_TENSORS_PER_LAUNCH if C_cuda else 100
MAX_BLOCKS = C_cuda.MAX_BLOCKS_PER_LAUNCH if C_cuda else 2048


def _fakes_registered() -> bool:
    """True when segclip/_ops.py (the Python package, written separately) registered the fakes."""
    try:
        import importlib.util
        if importlib.util.find_spec("segclip._ops") is None:
            return False
        import segclip._ops  # noqa: F401
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# Comparison helpers


def assert_rel_close(actual, expected, rtol: float, what: str = "") -> None:
    """|actual - expected| <= rtol * |expected|; NaN must match NaN, inf must match inf exactly."""
    a, e = float(actual), float(expected)
    if math.isnan(e) or math.isinf(e):
        assert (math.isnan(a) and math.isnan(e)) or a == e, f"{what}: got {a!r}, expected {e!r}"
        return
    assert math.isfinite(a), f"{what}: got {a!r}, expected {e!r}"
    assert abs(a - e) <= rtol * abs(e), f"{what}: got {a!r}, expected {e!r} (rel. error {abs(a - e) / max(abs(e), 1e-300):.3g} > {rtol:g})"


def ref_norm(tensors, norm_type: float) -> float:
    """The norm of the concatenation, in float64 on the CPU, one tensor at a time."""
    total = 0.0
    for t in tensors:
        x = t.detach().to("cpu", torch.float64).reshape(-1)
        if x.numel() == 0:
            continue
        if norm_type == INF:
            m = float(x.abs().max())  # torch.max propagates NaN
            total = m if math.isnan(m) or math.isnan(total) else max(total, m)
        else:
            total += float(x.abs().pow(norm_type).sum())
    return total if norm_type == INF else total ** (1.0 / norm_type)


def rtol_for(tensors) -> float:
    return max(RTOL[t.dtype] for t in tensors)


def out_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ref_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient for this norm, on the CPU: ``clamp(max_norm /
    (norm + 1e-6), max=1)`` in norm's dtype (number / tensor is reciprocal() * number; NaN kept)."""
    return torch.clamp(max_norm / (norm.cpu() + 1e-6), max=1.0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (NaN-safe equality)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view)


def is_dense(t: torch.Tensor) -> bool:
    """c10's is_non_overlapping_and_dense: the elements fill [data_ptr, data_ptr + numel) exactly."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def expected_scaled(t: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """t * coef as the fused kernel computes it: in t's op-math type, rounded once."""
    op = OPMATH[t.dtype]
    c = coef.to(torch.float64).to(op)  # the kernel reads coef exactly, then converts
    return (t.to(op) * c).to(t.dtype)


# ----------------------------------------------------------------------------------------------
# Inputs (GPU)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs on every run; the seed is printed (pytest shows it for a failing test)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)


def _rand(n, dtype, device, scale=1.0):
    return (torch.randn(n, device=device, dtype=torch.float32) * scale).to(dtype)


def structural_tensors(dtype, device="cuda"):
    """Every layout and boundary case in one list: empties first/middle/last, chunk size +-1,
    misaligned views, transposed, channels_last, a non-dense view, 0-dim."""
    C = CHUNK
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return [
        r(0),                                                  # empty, first
        r(C - 1), r(C, scale=3.0), r(C + 1, scale=0.1),        # chunk size +-1
        r(2 * C + 5)[1:],                                      # misaligned by one element
        r(1003)[3:],                                           # misaligned, short
        r(9)[1:],                                              # shorter than one vector
        r(0),                                                  # empty, middle
        r(300, 517).t(),                                       # transposed (dense, not contiguous)
        r(6, 16, 9, 7).contiguous(memory_format=torch.channels_last),
        r(64, 130, scale=2.0)[:, ::2],                         # non-dense view
        r(()),                                                 # 0-dim
        r(3, 0, 5),                                            # empty with a shape
        r(1),
        r(0),                                                  # empty, last
    ]


def many_tensors(dtype, device="cuda"):
    """More tensors than one tensor table and more chunks than one block table (several launches),
    with tensors cut across launches, empties between them, misaligned views, and magnitudes
    spread over six orders."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))  # follows _fresh_seed
    ts = []
    n_small = MAX_TENSORS + 22
    for i in range(n_small):
        n = int(torch.randint(0, 3 * CHUNK // 2, (1,), generator=gen))
        scale = 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=gen))
        if i % 17 == 0:
            n = 0
        base = _rand(n + (i % 3), dtype, device, scale if dtype != torch.float16 else min(scale, 10.0))
        ts.append(base[i % 3:])
        if i == 10:
            ts.append(_rand((MAX_BLOCKS // 2) * CHUNK + 17, dtype, device))
        if i == 100:
            ts.append(_rand((MAX_BLOCKS // 2 + 50) * CHUNK - 1, dtype, device))
    ts.append(_rand(0, dtype, device))
    return ts


def chunks_of(tensors):
    return sum((t.numel() + CHUNK - 1) // CHUNK for t in tensors)


# ----------------------------------------------------------------------------------------------
# Without a GPU


def test_comparison_can_fail():
    """The helpers these tests rely on do detect a wrong result."""
    assert_rel_close(1.0 + 0.5e-6, 1.0, 1e-6)
    for actual, expected, rtol in [(1.0 + 3e-6, 1.0, 1e-6), (float("nan"), 1.0, 1e-3), (1.0, float("nan"), 1e-3),
                                   (1e300, float("inf"), 1e-3), (float("inf"), 1e300, 1e-3), (-1.0, 1.0, 1e-3)]:
        with pytest.raises(AssertionError):
            assert_rel_close(actual, expected, rtol)
    x = [torch.randn(1000, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    ref = ref_norm(x, 2.0)
    assert_rel_close(torch.linalg.vector_norm(torch.cat(x)), ref, 1e-12)
    with pytest.raises(AssertionError):
        assert_rel_close(ref * (1 + 1e-9), ref, RTOL[torch.float64])
    assert not torch.equal(bits(torch.tensor([float("nan")])), bits(torch.tensor([1.0])))


def test_cuda_library_built():
    if not CPU_LIB:
        pytest.skip(SKIP_REASON)
    if not CUDA_EXPECTED:
        pytest.skip(SKIP_REASON)
    assert CUDA_LIB, (f"a CUDA toolkit is present ({TOOLKIT}) and torch has CUDA {torch.version.cuda}, "
                      f"but segclip/_C_cuda*.so was not built")


@needs_lib
def test_import_without_gpu():
    """The CUDA library loads on a machine without a GPU (here: with every GPU hidden)."""
    code = ("import torch, segclip._C, segclip._C_cuda as m\n"
            "assert not torch.cuda.is_available()\n"
            "print(m.CHUNK_ELEMS)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == CHUNK


@needs_lib
@pytest.mark.parametrize("op", ["multi_tensor_norm", "multi_tensor_norm_coef", "multi_tensor_scale_",
                                "multi_tensor_clip_"])
def test_cuda_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segclip::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segclip::{op}", "CPU")


def _toolkit_cudart_version() -> int | None:
    """CUDART_VERSION of the toolkit's headers (13000 for CUDA 13.0), or None."""
    header = Path(TOOLKIT or "/nonexistent") / "include" / "cuda_runtime_api.h"
    try:
        for line in header.read_text(errors="replace").splitlines():
            if line.startswith("#define CUDART_VERSION"):
                return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


@needs_lib
def test_module_sizes():
    assert CHUNK > 0 and CHUNK % 8 == 0  # a chunk keeps 16-byte alignment for every dtype
    assert 0 < MAX_BLOCKS < 65536
    assert C_cuda.BLOCK_THREADS % 32 == 0
    # see note: [kernel argument space]: 32 KiB tables with CUDA >= 13, as torch's foreach kernels
    version = _toolkit_cudart_version()
    if version is not None:
        assert C_cuda.KERNEL_PARAM_BYTES == (32768 if version >= 13000 else 4096), version
    assert (MAX_TENSORS, MAX_BLOCKS) == ({32768: (1024, 6144), 4096: (100, 2048)}[C_cuda.KERNEL_PARAM_BYTES])


@needs_lib
def test_argument_checks_without_gpu():
    """The CUDA kernels' argument checks run (by redispatching CPU tensors to the CUDA key): clear
    RuntimeErrors (what segclip.fused_clip_'s fast path catches), before anything is queued."""
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    norm = ops.multi_tensor_norm.default
    coef_op = ops.multi_tensor_norm_coef.default
    scale = ops.multi_tensor_scale_.default
    with pytest.raises(RuntimeError, match="norm_type 1, 2 and inf, got 3"):
        norm.redispatch(ks, [torch.ones(3)], 3.0)
    with pytest.raises(RuntimeError, match="norm_type 1, 2 and inf"):
        coef_op.redispatch(ks, [torch.ones(3)], -INF, 1.0)
    with pytest.raises(RuntimeError, match="non-empty list"):
        norm.redispatch(ks, [], 2.0)
    with pytest.raises(RuntimeError, match=r"no CUDA tensor \(tensors\[0\] is on cpu\)"):
        norm.redispatch(ks, [torch.ones(3)], 2.0)
    with pytest.raises(RuntimeError, match="0-dim"):
        scale.redispatch(ks, [torch.ones(3)], torch.ones(2))
    with pytest.raises(RuntimeError, match="floating point"):
        scale.redispatch(ks, [torch.ones(3)], torch.tensor(1))
    with pytest.raises(RuntimeError, match="coef is on cpu"):
        scale.redispatch(ks, [torch.ones(3)], torch.tensor(0.5))
    clip = ops.multi_tensor_clip_.default
    with pytest.raises(RuntimeError, match="multi_tensor_clip_: expected a non-empty list"):
        clip.redispatch(ks, [], 2.0, 1.0)
    with pytest.raises(RuntimeError, match="norm_type 1, 2 and inf, got 0.5"):
        clip.redispatch(ks, [torch.ones(3)], 0.5, 1.0)
    with pytest.raises(RuntimeError, match=r"multi_tensor_clip_: the CUDA kernel got no CUDA tensor"):
        clip.redispatch(ks, [torch.ones(3)], 2.0, 1.0)


def _compile_and_run(cmd, exe, tmp_path):
    build = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"{' '.join(map(str, cmd))}\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK"), run.stdout
    return run.stdout


@pytest.mark.parametrize("param_bytes, tensors, blocks", [(4096, 100, 2048), (32768, 1024, 6144)])
def test_apply_chunking_on_host(tmp_path, param_bytes, tensors, blocks):
    """multi_tensor_apply's launch tables and block_chunk (the code the kernels run), on the host, for
    both table layouts (see note: [kernel argument space]): every chunk launched once, in order,
    within the table sizes; empties anywhere; > 2^31 elements; the reversed launches of the scale;
    the group runs (each block's group, launches split early, the norm's slots); the adaptive clip's
    work split (every unit and segment once, the split units' slots)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "multi_tensor_apply_test"
    out = _compile_and_run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                            f"-DSEGCLIP_KERNEL_PARAM_BYTES={param_bytes}", "-I", "csrc/cuda",
                            "csrc/cuda/test/multi_tensor_apply_test.cpp", "-o", str(exe)], exe, tmp_path)
    assert f"{param_bytes}-byte layout: {tensors} tensors, {blocks} blocks per launch" in out, out


def test_thread_math_on_host(tmp_path):
    """thread_partial / scale_chunk (the code the kernels run) for every thread index of a block,
    on the host: each element read/written exactly once for every misalignment and length."""
    if TOOLKIT is None:
        pytest.skip("no CUDA toolkit (nvcc) here")
    exe = tmp_path / "thread_math_test"
    _compile_and_run([os.path.join(TOOLKIT, "bin", "nvcc"), "-std=c++17", "-O1", "-I", "csrc/cuda",
                      "csrc/cuda/test/thread_math_test.cu", "-o", str(exe)], exe, tmp_path)


# ----------------------------------------------------------------------------------------------
# With a GPU


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norm_layouts(norm_type, dtype):
    ts = structural_tensors(dtype)
    got = ops.multi_tensor_norm(ts, norm_type)
    assert got.dtype == out_dtype(ts) and got.shape == () and got.device == ts[1].device
    assert_rel_close(got, ref_norm(ts, norm_type), RTOL[dtype], f"{dtype} p={norm_type}")
    cpu = ops.multi_tensor_norm([t.cpu() for t in ts], norm_type)  # the CPU kernel agrees
    assert_rel_close(got.cpu(), cpu, RTOL[dtype], "CPU kernel vs CUDA kernel")


@gpu_test
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norm_several_launches(norm_type):
    ts = many_tensors(torch.float32)
    assert len(ts) > max(MAX_TENSORS, 110) and chunks_of(ts) > max(MAX_BLOCKS, 320)
    got, coef = ops.multi_tensor_norm_coef(ts, norm_type, 1.0)
    ref = ref_norm(ts, norm_type)
    assert_rel_close(got, ref, RTOL[torch.float32], f"p={norm_type}")
    assert torch.equal(coef.cpu(), ref_coef(got, 1.0))
    for _ in range(3):  # bitwise identical, call after call
        again, coef_again = ops.multi_tensor_norm_coef(ts, norm_type, 1.0)
        assert torch.equal(bits(again), bits(got)) and torch.equal(bits(coef_again), bits(coef))
        assert torch.equal(bits(ops.multi_tensor_norm(ts, norm_type)), bits(got))


@gpu_test
def test_norm_several_launches_half_and_double():
    for dtype in (torch.bfloat16, torch.float64):
        ts = many_tensors(dtype)
        got = ops.multi_tensor_norm(ts, 2.0)
        assert_rel_close(got, ref_norm(ts, 2.0), RTOL[dtype], str(dtype))


@gpu_test
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_mixed_dtypes(norm_type):
    parts = {d: structural_tensors(d)[1:6] for d in DTYPES}
    mixed = [t for i in range(5) for d in DTYPES for t in [parts[d][i]]]  # interleaved
    got = ops.multi_tensor_norm(mixed, norm_type)
    assert got.dtype == torch.float64
    assert_rel_close(got, ref_norm(mixed, norm_type), 1e-3, "all four dtypes")
    no_double = [t for t in mixed if t.dtype != torch.float64]
    got = ops.multi_tensor_norm(no_double, norm_type)
    assert got.dtype == torch.float32
    assert_rel_close(got, ref_norm(no_double, norm_type), 1e-3, "half, bfloat16, float")
    f32_f64 = [t for t in mixed if t.dtype in (torch.float32, torch.float64)]
    assert_rel_close(ops.multi_tensor_norm(f32_f64, norm_type), ref_norm(f32_f64, norm_type), 1e-6, "float+double")


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_coef(dtype):
    ts = structural_tensors(dtype)
    ref = ref_norm(ts, 2.0)
    for max_norm in (0.5 * ref, 10.0 * ref, 0.0, 1e-30):
        norm, coef = ops.multi_tensor_norm_coef(ts, 2.0, max_norm)
        assert norm.dtype == coef.dtype == out_dtype(ts) and coef.shape == ()
        assert_rel_close(norm, ref, RTOL[dtype])
        assert torch.equal(coef.cpu(), ref_coef(norm, max_norm)), (max_norm, coef, ref_coef(norm, max_norm))


@gpu_test
def test_all_empty():
    ts = [torch.empty(0, device="cuda"), torch.empty(3, 0, device="cuda")]
    for max_norm in (1.0, 1e-7):
        norm, coef = ops.multi_tensor_norm_coef(ts, 2.0, max_norm)
        assert float(norm) == 0.0
        assert torch.equal(coef.cpu(), ref_coef(norm, max_norm))
    assert float(ops.multi_tensor_norm(ts, INF)) == 0.0
    ops.multi_tensor_scale_(ts, torch.tensor(0.5, device="cuda"))
    ops.multi_tensor_scale_([], torch.tensor(0.5, device="cuda"))


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale(dtype):
    coefs = [torch.tensor(0.37, device="cuda"), torch.tensor(1 / 3, dtype=torch.float64, device="cuda"),
             torch.tensor(0.75, dtype=torch.float16, device="cuda"), torch.tensor(0.1, dtype=torch.bfloat16, device="cuda")]
    for coef in coefs:
        ts = structural_tensors(dtype)
        before = [t.clone() for t in ts]
        ops.multi_tensor_scale_(ts, coef)
        for i, (t, b) in enumerate(zip(ts, before)):
            exp = expected_scaled(b, coef)  # the non-dense view too: strided scale rounds the same way
            assert torch.equal(bits(t), bits(exp)), f"tensors[{i}] coef {coef}"
    if hasattr(torch, "float8_e4m3fn"):  # another float dtype: converted on the device
        ts = structural_tensors(dtype)
        before = [t.clone() for t in ts]
        coef8 = torch.tensor(0.5, device="cuda").to(torch.float8_e4m3fn)
        ops.multi_tensor_scale_(ts, coef8)
        for t, b in zip(ts, before):
            assert torch.equal(bits(t), bits(expected_scaled(b, torch.tensor(0.5, device="cuda"))))


@gpu_test
def test_scale_many_tensors():
    ts = many_tensors(torch.float32)
    before = [t.clone() for t in ts]
    coef = torch.tensor(0.3, device="cuda")
    ops.multi_tensor_scale_(ts, coef)
    for i, (t, b) in enumerate(zip(ts, before)):
        assert torch.equal(t, expected_scaled(b, coef)), f"tensors[{i}] of {len(ts)}"


@gpu_test
@pytest.mark.parametrize("coef_value", [1.0, 1.5, INF])
def test_scale_skipped_when_coef_at_least_one(coef_value):
    ts = structural_tensors(torch.float32) + structural_tensors(torch.bfloat16)
    ts[2][5] = float("nan")
    ts[3][-1] = -0.0
    ts[4][0] = float("inf")
    before = [bits(t).clone() for t in ts]
    for coef_dtype in (torch.float32, torch.float64, torch.float16):
        ops.multi_tensor_scale_(ts, torch.tensor(coef_value, dtype=coef_dtype, device="cuda"))
        for i, (t, b) in enumerate(zip(ts, before)):
            assert torch.equal(bits(t), b), f"tensors[{i}] changed with coef {coef_value} ({coef_dtype})"


def _gappy_views(dtype):
    """(base, view, strided) triples: views with gaps in memory; strided: scaled by the strided
    kernel (else out of place: more than 8 dimensions left after merging)."""
    def r(*shape):
        return (torch.randn(*shape, device="cuda") * 3).to(dtype)
    triples = []
    for base, make, strided in [
            (r(64, 131), lambda b: b[:, ::2], True),                       # 2 dims
            (r(64, 130), lambda b: b[:, ::2], True),                       # merges to one strided dim
            (r(10, 20, 30), lambda b: b[::2, :, 1:], True),                # 3 dims
            (r(300, 517), lambda b: b.t()[:, ::3], True),                  # transposed, gappy
            (r(6, 16, 9, 7).contiguous(memory_format=torch.channels_last), lambda b: b[:, :, ::2], True),
            (r(*[3] * 9), lambda b: b[(slice(None, None, 2),) * 9], False)]:  # 9 dims left
        triples.append((base, make(base), strided))
    return triples


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_dense_views_scaled_in_place(dtype):
    for base, view, strided in _gappy_views(dtype):
        assert not is_dense(view)
        base_before = base.clone()
        mask = torch.zeros_like(base, dtype=torch.bool)  # same strides as base
        mask.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        coef = torch.tensor(0.3, device="cuda")
        other = torch.randn(1000, device="cuda").to(dtype)
        ops.multi_tensor_scale_([other, view], coef)
        expected = expected_scaled(base_before, coef)
        where = f"view {tuple(view.shape)} strides {view.stride()}"
        assert torch.equal(bits(base[mask]), bits(expected[mask])), where  # both paths round once
        assert torch.equal(bits(base[~mask]), bits(base_before[~mask])), where  # the gaps are untouched


@gpu_test
def test_non_dense_views_not_written_when_nothing_to_clip():
    """coef >= 1: views with gaps keep their exact bits, NaN payloads included (a multiply by 1
    could hand back the GPU's canonical NaN)."""
    for base, view, strided in _gappy_views(torch.float32):
        if not strided:  # scaled out of place: written (same values), see note: [CUDA non-dense tensors]
            continue
        every7 = (torch.arange(base.numel(), device="cuda") % 7 == 0).reshape(base.shape)
        base.view(torch.int32).masked_fill_(every7, 0x7FC00123)  # NaNs with a payload, here and there
        before = bits(base).clone()
        ops.multi_tensor_scale_([view], torch.tensor(1.0, device="cuda"))
        ops.multi_tensor_scale_([view], torch.tensor(INF, device="cuda"))
        assert torch.equal(bits(base), before), f"view {tuple(view.shape)} strides {view.stride()} was written"


@gpu_test
def test_self_overlapping_view_is_scaled_once_per_element():
    """as_strided((3, 3), (1, 1)): ATen cannot tell that it overlaps, the strided kernel will not take
    it; scaled out of place, each of the 5 elements is scaled once (in-place mul_ would compound)."""
    base = torch.randn(5, device="cuda")
    before = base.clone()
    ops.multi_tensor_scale_([torch.randn(100, device="cuda"), base.as_strided((3, 3), (1, 1))],
                            torch.tensor(0.5, device="cuda"))
    assert torch.equal(base, before * 0.5)


@gpu_test
def test_memory_shared_by_entries_is_scaled_once_per_entry():
    """The same gradient twice, and two views that overlap: one fused launch would race on the shared
    memory; see note: [tensors that share memory]. Each entry scales it in turn, as torch does."""
    n = 3 * CHUNK + 5  # several blocks per entry
    buf = torch.randn(n + n // 2, device="cuda")
    alone = torch.randn(1000, device="cuda")
    coef = torch.tensor(0.5, device="cuda")
    for entries in ([buf[:n], alone, buf[:n]], [buf[:n], buf[n // 2:]]):
        before = buf.clone()
        expect = before.clone()
        for t in entries:
            if t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
                start = (t.data_ptr() - buf.data_ptr()) // 4
                expect[start:start + t.numel()] *= 0.5  # exact: a power of two
        versions = [t._version for t in entries]
        ops.multi_tensor_scale_(entries, coef)
        assert torch.equal(buf, expect)
        assert all(t._version > v for t, v in zip(entries, versions))  # bumped: autograd sees the write


@gpu_test
def test_overlapping_views_are_refused_before_anything_is_written():
    other = torch.randn(1000, device="cuda")
    coef = torch.tensor(0.25, device="cuda")
    expanded = torch.randn(5, 1, device="cuda").expand(5, 4)
    other_before = other.clone()
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has internally overlapping memory"):
        ops.multi_tensor_scale_([other, expanded], coef)
    assert torch.equal(other, other_before)  # refused before anything was written
    assert_rel_close(ops.multi_tensor_norm([expanded], 2.0), ref_norm([expanded], 2.0), 1e-6)


@gpu_test
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_nan_and_inf(norm_type):
    for bad, where in [(float("nan"), 0), (float("nan"), -1), (float("nan"), CHUNK + 3), (float("inf"), 7),
                       (float("-inf"), -1)]:
        ts = structural_tensors(torch.float32)
        ts[4][where] = bad  # a misaligned view of 2 * CHUNK + 4 elements: head, body, tail
        norm, coef = ops.multi_tensor_norm_coef(ts, norm_type, 1.0)
        if math.isnan(bad):
            assert math.isnan(float(norm)) and math.isnan(float(coef))
        else:
            assert float(norm) == INF and float(coef) == 0.0
        before = [t.clone() for t in ts]
        ops.multi_tensor_scale_(ts, coef)
        for t, b in zip(ts, before):  # as torch: x * NaN = NaN, x * 0 = +-0, inf * 0 = NaN
            torch.testing.assert_close(t, b * coef, rtol=0, atol=0, equal_nan=True, msg=f"{bad} at {where}")


@gpu_test
def test_no_host_synchronisation():
    ts = structural_tensors(torch.float32) + many_tensors(torch.float16)[:30] + [torch.randn(9, dtype=torch.float64, device="cuda")]
    empty = [torch.empty(0, device="cuda")]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in ts]
    for p, t in zip(params, ts):
        p.grad = t.clone()
    gappy = _gappy_views(torch.float32)
    import segclip  # the package; its import may synchronise, so before the debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in NORM_TYPES:
            ops.multi_tensor_norm(ts, p)
        norm, coef = ops.multi_tensor_norm_coef(ts, 2.0, 0.1)
        ops.multi_tensor_scale_(ts, coef)
        ops.multi_tensor_scale_(ts, coef.half())
        ops.multi_tensor_scale_([view for _, view, _ in gappy], coef)  # strided and out-of-place paths
        ops.multi_tensor_norm_coef(empty, 2.0, 1.0)
        ops.multi_tensor_scale_(empty, coef)
        ops.multi_tensor_clip_(ts, 2.0, 0.1)
        ops.multi_tensor_clip_(empty, 2.0, 1.0)
        segclip.fused_clip_(params, 0.1)  # the public API's default path, clipping and not
        segclip.fused_clip_(params, 1e9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu_test
def test_cuda_graph_capture_and_replay():
    static = structural_tensors(torch.float32) + many_tensors(torch.bfloat16)[:20]
    max_norm = 5.0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        n, c = ops.multi_tensor_norm_coef(static, 2.0, max_norm)
        ops.multi_tensor_scale_(static, c)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_norm, g_coef = ops.multi_tensor_norm_coef(static, 2.0, max_norm)
        ops.multi_tensor_scale_(static, g_coef)
    for scale in (10.0, 1e-5, 3.0):  # clipping, no clipping (norm about 0.1), clipping
        fresh = [(torch.randn(t.shape, device="cuda") * scale).to(t.dtype) for t in static]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        replayed = [s.clone() for s in static]
        # Eager on the same tensors (same strides and alignment, hence the same arithmetic): the
        # norm of a differently laid out copy may round differently.
        for s, f in zip(static, fresh):
            s.copy_(f)
        e_norm, e_coef = ops.multi_tensor_norm_coef(static, 2.0, max_norm)
        ops.multi_tensor_scale_(static, e_coef)
        torch.cuda.synchronize()
        assert torch.equal(g_norm, e_norm) and torch.equal(g_coef, e_coef), scale
        assert (float(e_coef) == 1.0) == (scale == 1e-5), f"coef {float(e_coef)} at scale {scale}"
        for i, (r, e) in enumerate(zip(replayed, static)):
            assert torch.equal(bits(r), bits(e)), f"tensors[{i}] differ after replay (scale {scale})"
        assert_rel_close(e_norm, ref_norm(fresh, 2.0), rtol_for(static), f"norm at scale {scale}")


@gpu_test
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_op_is_bitwise_the_two_op_path(norm_type):
    """multi_tensor_clip_ queues the same memset, norm launches and scale launches as
    multi_tensor_norm_coef + multi_tensor_scale_: the same norm, coefficient and bits, clipping or not;
    with several launches, gappy views and memory shared by two entries."""
    for scale in (10.0, 1e-4):
        ts = structural_tensors(torch.float32) + many_tensors(torch.bfloat16)[:40] + many_tensors(torch.float32)
        buf = torch.randn(3 * CHUNK + 5, device="cuda")
        ts += [buf[:2 * CHUNK], buf[CHUNK:]]
        for t in ts:
            t.mul_(scale)
        base = [t.clone() for t in ts]  # of the views: the same values, dense
        norm, coef = ops.multi_tensor_clip_(ts, norm_type, 1.0)
        after = [t.clone() for t in ts]
        buf.copy_(torch.cat([base[-2][:CHUNK], base[-1]]))  # restore the shared buffer
        for t, b in zip(ts[:-2], base[:-2]):
            t.copy_(b)
        norm2, coef2 = ops.multi_tensor_norm_coef(ts, norm_type, 1.0)
        ops.multi_tensor_scale_(ts, coef2)
        assert torch.equal(bits(norm), bits(norm2)) and torch.equal(bits(coef), bits(coef2))
        assert (float(coef) < 1.0) == (scale == 10.0)
        for i, (a, b) in enumerate(zip(after, ts)):
            assert torch.equal(bits(a), bits(b)), f"tensors[{i}] (scale {scale})"
        assert_rel_close(norm, ref_norm(base, norm_type), 1e-3)


@gpu_test
def test_clip_op_in_a_cuda_graph():
    static = structural_tensors(torch.float32) + many_tensors(torch.float16)[:20]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.multi_tensor_clip_(static, 2.0, 5.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_norm, g_coef = ops.multi_tensor_clip_(static, 2.0, 5.0)
    for scale in (10.0, 1e-5):
        fresh = [(torch.randn(t.shape, device="cuda") * scale).to(t.dtype) for t in static]
        for s_, f in zip(static, fresh):
            s_.copy_(f)
        graph.replay()
        replayed = [t.clone() for t in static]
        for s_, f in zip(static, fresh):
            s_.copy_(f)
        e_norm, e_coef = ops.multi_tensor_clip_(static, 2.0, 5.0)
        torch.cuda.synchronize()
        assert torch.equal(g_norm, e_norm) and torch.equal(g_coef, e_coef), scale
        for i, (r, e) in enumerate(zip(replayed, static)):
            assert torch.equal(bits(r), bits(e)), f"tensors[{i}] (scale {scale})"


def _compile_params(max_norm_scale):
    """CUDA parameters with gradients, two of them sharing one gradient and two viewing one buffer."""
    shapes = [(300,), (20, 7), (0,), (CHUNK + 3,), (64, 33)]
    params = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda") * max_norm_scale
    shared = torch.nn.Parameter(torch.zeros(300, device="cuda"))
    shared.grad = params[0].grad  # one storage, two list entries
    buf = torch.randn(2000, device="cuda") * max_norm_scale
    a, b = torch.nn.Parameter(torch.zeros(1200, device="cuda")), torch.nn.Parameter(torch.zeros(1200, device="cuda"))
    a.grad, b.grad = buf[:1200], buf[800:]  # overlapping views of one storage
    return params + [shared, a, b], buf


def _clone_params(params, buf):
    """The same structure (sharing and overlap kept) on fresh copies."""
    new_buf = buf.clone()
    out = []
    grads = {}
    for p in params:
        q = torch.nn.Parameter(torch.zeros_like(p))
        g = p.grad
        if g.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
            off = g.storage_offset() - buf.storage_offset()
            q.grad = new_buf[off:off + g.numel()]
        else:
            q.grad = grads.setdefault(id(g), g.clone())
        out.append(q)
    return out, new_buf


@gpu_test
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph_on_cuda_grads(mode):
    """fused_clip_ under torch.compile(fullgraph=True) (and CUDA graphs with reduce-overhead) on CUDA
    gradients, against eager on copies: clipping and not, one gradient listed twice, overlapping
    views of one buffer (scaled once per entry, as eager and torch do)."""
    import segclip

    torch._dynamo.reset()

    def step(params, max_norm):
        return segclip.fused_clip_(params, max_norm)

    compiled = torch.compile(step, fullgraph=True, mode=mode)
    for max_norm in (0.5, 1e9, 0.5, 1e9):  # twice each: reduce-overhead records, then replays
        params, buf = _compile_params(3.0)
        eager, _ = _clone_params(params, buf)
        got = compiled(params, max_norm)
        want = step(eager, max_norm)
        torch.cuda.synchronize()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert_rel_close(got, ref_norm([p.grad for p in eager], 2.0) if max_norm > 1e8 else float(want), 1e-5)
        for i, (p, e) in enumerate(zip(params, eager)):
            torch.testing.assert_close(p.grad, e.grad, rtol=1e-6, atol=0, msg=f"grad {i}, max_norm {max_norm}")


_PERSISTENT_SCRIPT = r"""
import math, warnings, torch, segclip
ops = torch.ops.segclip
torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
def ref(ts, p):
    x = torch.cat([t.detach().double().reshape(-1).cpu() for t in ts])
    return float(x.abs().max()) if math.isinf(p) else float(torch.linalg.vector_norm(x, p))
shapes = [(1 + (i * 7919) % 150_000,) for i in range(180)]  # a segmentation model's count, ~27 MB fp32
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for p in (2.0, 1.0, math.inf):
        for ratio in (0.3, 3.0):
            ts = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
            before = [t.clone() for t in ts]
            r = ref(ts, p)
            norm, coef = ops.multi_tensor_clip_(ts, p, r * ratio)
            torch.cuda.synchronize()
            tol = 1e-3 if dtype == torch.bfloat16 else 1e-6
            assert abs(float(norm) - r) <= tol * r, (dtype, p, float(norm), r)
            assert torch.equal(coef.cpu(), torch.clamp(r * ratio / (norm.cpu() + 1e-6), max=1.0)), (dtype, p)
            for t, b in zip(ts, before):
                if ratio > 1:
                    assert torch.equal(t, b), "written with nothing to clip"
                else:
                    torch.testing.assert_close(t, (b.to(torch.float64) * float(coef)).to(dtype), rtol=tol + 1e-2 * (dtype == torch.bfloat16), atol=0)
            again, _ = ops.multi_tensor_clip_([b.clone() for b in before], p, r * ratio)
            assert torch.equal(again, norm), "not deterministic"
# graph capture of the cooperative launch
static = [torch.randn(s, device="cuda") for s in shapes[:50]]
side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    ops.multi_tensor_clip_(static, 2.0, 1.0)
torch.cuda.current_stream().wait_stream(side)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    gn, gc = ops.multi_tensor_clip_(static, 2.0, 1.0)
fresh = [torch.randn(t.shape, device="cuda") for t in static]
for s_, f in zip(static, fresh): s_.copy_(f)
g.replay(); torch.cuda.synchronize()
assert abs(float(gn) - ref(fresh, 2.0)) <= 1e-6 * ref(fresh, 2.0)
# a list it cannot take: the default path, with a warning
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    x = torch.randn(64, 131, device="cuda")[:, ::2]
    ops.multi_tensor_clip_([x], 2.0, 1.0)
assert any("SEGCLIP_CUDA_PERSISTENT" in str(m.message) for m in w), [str(m.message) for m in w]
print("persistent ok")
"""


@gpu_test
def test_persistent_clip_when_selected():
    """SEGCLIP_CUDA_PERSISTENT=1 (read once per process, hence a subprocess): the single-launch clip
    against float64, the default path's coefficient rounding, nothing written when nothing is to
    clip, determinism, CUDA graph capture of the cooperative launch, and the warned default path
    for a list it cannot take. See note: [persistent clip]."""
    env = dict(os.environ, SEGCLIP_CUDA_PERSISTENT="1")
    out = subprocess.run([sys.executable, "-c", _PERSISTENT_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "persistent ok" in out.stdout, out.stdout + out.stderr


@gpu_test
def test_opcheck():
    utils = (("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if _fakes_registered() else ("test_schema", "test_autograd_registration"))
    samples = [
        [torch.randn(5, device="cuda"), torch.randn(3, 4, device="cuda").t(), torch.empty(0, device="cuda")],
        [torch.randn(CHUNK + 1, device="cuda", dtype=torch.float16), torch.randn(7, device="cuda", dtype=torch.float64)],
    ]
    for ts in samples:
        for p in NORM_TYPES:
            torch.library.opcheck(ops.multi_tensor_norm.default, (ts, p), test_utils=utils)
            torch.library.opcheck(ops.multi_tensor_norm_coef.default, (ts, p, 1.0), test_utils=utils)
        for c in (0.5, 2.0):
            torch.library.opcheck(ops.multi_tensor_scale_.default,
                                  ([t.clone() for t in ts], torch.tensor(c, device="cuda")), test_utils=utils)
        for max_norm in (1e-3, 1e9):
            torch.library.opcheck(ops.multi_tensor_clip_.default, ([t.clone() for t in ts], 2.0, max_norm),
                                  test_utils=utils)


@gpu_test
def test_errors_on_gpu():
    g = torch.randn(4, device="cuda")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cpu but tensors\[0\] is on cuda"):
        ops.multi_tensor_norm([g, torch.randn(3)], 2.0)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is on cpu but tensors\[1\] is on cuda"):
        ops.multi_tensor_norm([torch.randn(3), g], 2.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Int"):
        ops.multi_tensor_norm([g, torch.ones(3, dtype=torch.int32, device="cuda")], 2.0)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] has dtype ComplexFloat"):
        ops.multi_tensor_norm_coef([torch.randn(3, dtype=torch.complex64, device="cuda")], 2.0, 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has layout Sparse"):
        ops.multi_tensor_norm([g, g.to_sparse()], 2.0)
    with pytest.raises(RuntimeError, match="norm_type"):
        ops.multi_tensor_norm([g], 3.0)
    with pytest.raises(RuntimeError, match="coef is on cpu"):
        ops.multi_tensor_scale_([g], torch.tensor(0.5))
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cpu but coef is on cuda"):
        ops.multi_tensor_scale_([g, torch.randn(3)], torch.tensor(0.5, device="cuda"))


@gpu_test
def test_data_pointer_not_element_aligned_is_refused():
    """A float32 tensor starting one byte into its storage: no GPU load can read it, so every op
    refuses it by name before queuing anything, and the tensors are left as they were."""
    base = torch.randn(4001, device="cuda")
    try:
        odd = torch.empty(0, device="cuda").set_(base.untyped_storage()[1:], 0, (4000,), (1,))
    except (RuntimeError, TypeError) as e:  # slicing a CUDA storage is not public API
        pytest.skip(f"cannot build a byte-offset CUDA tensor here: {e}")
    assert odd.data_ptr() % 4 == 1
    g = torch.randn(70_000, device="cuda")
    before = g.clone()
    match = r"tensors\[1\]'s data pointer .* is not a multiple of its element size \(4 bytes\)"
    for call in (lambda: ops.multi_tensor_norm([g, odd], 2.0),
                 lambda: ops.multi_tensor_norm_coef([g, odd], 2.0, 1e-3),
                 lambda: ops.multi_tensor_scale_([g, odd], torch.tensor(0.5, device="cuda"))):
        with pytest.raises(RuntimeError, match=match):
            call()
    torch.cuda.synchronize()  # the context is still usable, and nothing was written
    assert torch.equal(g, before)


@gpu_test
def test_scale_reads_the_value_of_coefficients_whose_bytes_are_not_it():
    """The scale kernel reads coef's bytes. A negative view (bytes of -c, value c) and a zero tensor
    without storage reach the CUDA kernel directly only by redispatch (a normal call resolves them
    first); a coefficient one byte into its storage would fault a GPU load. All three are copied."""
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    scale = ops.multi_tensor_scale_.default
    b = torch.randn(10_000, device="cuda")
    t = b.clone()
    scale.redispatch(ks, [t], torch._neg_view(torch.tensor(-0.5, device="cuda")))
    assert torch.equal(t, expected_scaled(b, torch.tensor(0.5)))
    raw = torch.zeros(8, dtype=torch.uint8, device="cuda")
    raw[1:5] = torch.tensor([0.25]).view(torch.uint8).to("cuda")
    try:
        odd = torch.empty(0, device="cuda").set_(raw.untyped_storage()[1:], 0, (), ())
    except (RuntimeError, TypeError) as e:
        pytest.skip(f"cannot build a byte-offset CUDA tensor here: {e}")
    assert odd.data_ptr() % 4 == 1
    t = b.clone()
    scale.redispatch(ks, [t], odd)
    assert torch.equal(t, expected_scaled(b, torch.tensor(0.25)))
    scale.redispatch(ks, [t], torch._efficientzerotensor((), device="cuda"))
    torch.cuda.synchronize()
    assert bool((t == 0).all())


@gpu_test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    ts = [t.to("cuda:1") for t in structural_tensors(torch.float32, "cuda:0")]
    with torch.cuda.device(0):
        norm, coef = ops.multi_tensor_norm_coef(ts, 2.0, 1.0)
        assert norm.device == torch.device("cuda:1")
        assert_rel_close(norm, ref_norm(ts, 2.0), 1e-6)
        ops.multi_tensor_scale_(ts, coef)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cuda:1 but tensors\[0\] is on cuda:0"):
        ops.multi_tensor_norm([torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")], 2.0)


@gpu_test
def test_tensor_over_2_pow_31_elements():
    n = (1 << 31) + 3 * CHUNK + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n + (6 << 30):  # the tensor, plus float64 slices for the reference
        pytest.skip(f"needs about {(2 * n + (6 << 30)) / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB are")
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    x[(1 << 31) + 11] = 3.0  # the inf-norm's maximum lies past 2^31
    ref2, step = 0.0, 1 << 28
    for i in range(0, n, step):
        ref2 += float(x[i:i + step].double().pow(2).sum())
    assert_rel_close(ops.multi_tensor_norm([x], 2.0), math.sqrt(ref2), 1e-3, "2-norm")
    assert float(ops.multi_tensor_norm([x], INF)) == 3.0
    probes = [slice(0, 1000), slice((1 << 31) - 500, (1 << 31) + 500), slice(n - 1000, n)]
    before = [x[s].clone() for s in probes]
    ops.multi_tensor_scale_([x], torch.tensor(0.5, device="cuda"))
    for s, b in zip(probes, before):
        assert torch.equal(x[s], b * 0.5), s
    # The strided kernel: a view with gaps over the whole tensor, offsets past 2^31, a grid-stride loop.
    ops.multi_tensor_scale_([x[1::2]], torch.tensor(0.5, device="cuda"))
    for s, b in zip(probes, before):
        got, want = x[s], b * 0.5
        odd = torch.arange(s.start, s.stop, device="cuda") % 2 == 1
        want[odd] = want[odd] * 0.5
        assert torch.equal(got, want), f"strided scale at {s}"
    del x
    torch.cuda.empty_cache()


@gpu_test
def test_fused_clip_api_if_present():
    """segclip.fused_clip_ (the Python package, written separately) against torch on CUDA."""
    try:
        from segclip import fused_clip_
    except Exception as exc:  # not written yet / not importable here
        pytest.skip(f"segclip.fused_clip_ is not available: {exc}")
    for max_norm in (0.5, 1e6):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in (10, CHUNK + 3, 0, 300)]
        for p in params:
            p.grad = torch.randn_like(p) * 3
        ref = [p.detach().clone().requires_grad_() for p in params]
        for r, p in zip(ref, params):
            r.grad = p.grad.clone()
        total = fused_clip_(params, max_norm)
        ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=True)
        assert_rel_close(total, ref_total, 1e-6)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)


@needs_cpu_kernel
def test_gpu_sanitize_script_dry_run():
    """benchmarks/gpu_sanitize.py (run under compute-sanitizer by gpu_check.sh) on the CPU kernels:
    its checks pass on a correct implementation, so on the GPU only a real fault can fail it."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sanitize.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("all checks passed"), out.stdout + out.stderr
    assert out.stdout.count("\nok ") + out.stdout.startswith("ok ") >= 10


# ----------------------------------------------------------------------------------------------
# Per-group partials (multi_tensor_group_partials) and the adaptive clip (multi_tensor_adaptive_clip_)
# on CUDA: see note: [group partials on CUDA] (multi_tensor_kernels.cu) and note: [adaptive clip on
# CUDA] (adaptive_apply.cuh).

MAX_GROUP_RUNS = C_cuda.MAX_GROUP_RUNS_PER_LAUNCH if C_cuda else 10
MAX_PAIRS = C_cuda.MAX_PAIRS_PER_LAUNCH if C_cuda else 40
MAX_PAIR_BLOCKS = C_cuda.MAX_PAIR_BLOCKS_PER_LAUNCH if C_cuda else 2048
WARP_ROW_MAX = C_cuda.ADAPTIVE_WARP_ROW_MAX if C_cuda else 1024


def ref_group_partials(tensors, groups, num_groups, norm_type):
    """Per group, then over all: the sum of |x|^p (max |x| for inf), in float64 (on the tensors' device,
    one tensor at a time: the several-launch lists hold 400M elements), combined here in Python."""
    def partial(t):
        x = t.detach().to(torch.float64).reshape(-1)
        if x.numel() == 0:
            return 0.0
        return float(x.abs().max()) if norm_type == INF else float(x.abs().pow(norm_type).sum())

    def combine(values):
        if norm_type != INF:
            return sum(values)
        return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)
    per_tensor = [partial(t) for t in tensors]
    per = [combine([v for v, g in zip(per_tensor, groups) if g == k]) for k in range(num_groups)]
    return per + [combine(per_tensor)]


def assert_partials_close(got, want, rtol, what):
    assert got.dtype == torch.float64 and got.shape == (len(want),), (got.dtype, got.shape)
    for k, (a, e) in enumerate(zip(got.cpu().tolist(), want)):
        if e == 0.0:
            assert a == 0.0, f"{what}[{k}]: got {a!r}, expected 0"
        else:
            assert_rel_close(a, e, rtol, f"{what}[{k}]")


def assert_total_is_the_norms(out, tensors, norm_type):
    """The last entry is bitwise what multi_tensor_norm takes the root of (see note: [op contract])."""
    norm = ops.multi_tensor_norm(tensors, norm_type)
    total = float(out[-1])
    root = math.sqrt(total) if norm_type == 2.0 else total
    assert torch.equal(bits(torch.tensor(root, dtype=torch.float64).to(norm.dtype)), bits(norm.cpu())), \
        (root, float(norm))


@needs_lib
def test_group_and_adaptive_checks_without_gpu():
    """The new CUDA kernels refuse what the CPU kernels refuse, with the same words (shared headers:
    csrc/group_checks.h, csrc/adaptive_checks.h), before anything is queued."""
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    group = ops.multi_tensor_group_partials.default
    for args, words in [(([torch.ones(2)], [0, 0], 1, 2.0), "one group index per tensor"),
                        (([torch.ones(2)], [1], 1, 2.0), "groups[0] is 1"),
                        (([torch.ones(2)], [-1], 1, 2.0), "groups[0] is -1"),
                        (([torch.ones(2)], [0], -1, 2.0), "num_groups must be >= 0"),
                        (([torch.ones(2)], [0], 2**31, 2.0), "num_groups must be < 2^31 - 1"),
                        (([], [], 1, 2.0), "non-empty list"),
                        (([torch.ones(2)], [0], 1, 2.0), "the CUDA kernel got no CUDA tensor")]:
        with pytest.raises(RuntimeError, match=re.escape(words)):
            group.redispatch(ks, *args)
        if "CUDA" not in words:  # the CPU kernel: the same message
            with pytest.raises(RuntimeError, match=re.escape(words)):
                ops.multi_tensor_group_partials(*args)
    agc = ops.multi_tensor_adaptive_clip_.default
    w, g = torch.ones(4, 3), torch.full((4, 3), 5.0)
    for args, words in [(([w, w], [g], 0.01, 1e-3, 2.0), "one weight per grad"),
                        (([w], [g], -0.1, 1e-3, 2.0), "clip_factor must be a non-negative number"),
                        (([w], [g], 0.01, -1.0, 2.0), "eps must be a non-negative number"),
                        (([w], [g], 0.01, 1e-3, 3.0), "supports norm_type 1, 2 and inf, got 3"),
                        (([w], [g], 0.01, 1e-3, 2.0), "the CUDA kernel got no CUDA tensor (grads[0] is on cpu)")]:
        with pytest.raises(RuntimeError, match=re.escape(words)):
            agc.redispatch(ks, *args)
    assert torch.equal(g, torch.full((4, 3), 5.0))


@needs_lib
@pytest.mark.parametrize("op", ["multi_tensor_group_partials", "multi_tensor_adaptive_clip_"])
def test_new_kernels_selected_on_cuda(op):
    """Registered for the CUDA key, so segclip's selection (partials.has_group_kernel, adaptive.py's
    _kernel_for) sends CUDA gradients to them instead of the per-group / per-parameter fallbacks."""
    from segclip import partials, value
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segclip::{op}", "CUDA")
    if op == "multi_tensor_group_partials":
        partials._has_group_kernel.cache_clear()
        assert partials.has_group_kernel(torch.device("cuda"))
    else:
        import segclip._ext as ext
        if ext.CUDA_LOADED:
            assert value._kernel_for(op, torch.device("cuda"), "auto")


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_group_partials_layouts(norm_type, dtype):
    ts = structural_tensors(dtype)
    groups = [(i * 5) % 3 for i in range(len(ts))]  # interleaved; group 3 has no tensor
    out = ops.multi_tensor_group_partials(ts, groups, 4, norm_type)
    assert out.device == ts[1].device
    want = ref_group_partials(ts, groups, 4, norm_type)
    assert_partials_close(out, want, 2 * RTOL[dtype], f"{dtype} p={norm_type}")
    assert_total_is_the_norms(out, ts, norm_type)
    cpu = ops.multi_tensor_group_partials([t.cpu() for t in ts], groups, 4, norm_type)
    assert_partials_close(out, cpu.tolist(), 2 * RTOL[dtype], "CPU kernel vs CUDA kernel")
    wrong = ops.multi_tensor_group_partials(ts, [(g + 1) % 3 for g in groups], 4, norm_type)
    with pytest.raises(AssertionError):  # a tensor in another group is caught
        assert_partials_close(wrong, want, 2 * RTOL[dtype], "planted")


@gpu_test
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_group_partials_several_launches(norm_type):
    """More tensors and chunks than one launch holds, and more group runs than one launch carries
    (one group per tensor): launches split early, the slots and the total stay the norm's."""
    ts = many_tensors(torch.float32)
    assert len(ts) > MAX_TENSORS and chunks_of(ts) > MAX_BLOCKS and len(ts) > MAX_GROUP_RUNS
    for groups, n in [([0 if i < len(ts) // 2 else (1 if i < 3 * len(ts) // 4 else 2) for i in range(len(ts))], 3),
                      (list(range(len(ts))), len(ts)),
                      ([i % 7 for i in range(len(ts))], 9)]:
        out = ops.multi_tensor_group_partials(ts, groups, n, norm_type)
        assert_partials_close(out, ref_group_partials(ts, groups, n, norm_type), 2 * RTOL[torch.float32],
                              f"{n} groups")
        assert_total_is_the_norms(out, ts, norm_type)
        for _ in range(2):  # bitwise identical, call after call
            assert torch.equal(bits(ops.multi_tensor_group_partials(ts, groups, n, norm_type)), bits(out))


@gpu_test
def test_group_partials_edge_cases():
    empty = [torch.empty(0, device="cuda"), torch.empty(3, 0, device="cuda")]
    for p in NORM_TYPES:
        assert ops.multi_tensor_group_partials(empty, [0, 1], 3, p).tolist() == [0.0] * 4
    t = [torch.tensor([1.0, math.nan], device="cuda"), torch.tensor([math.inf, 2.0], device="cuda"),
         torch.tensor([3.0], device="cuda")]
    for p in NORM_TYPES:
        out = ops.multi_tensor_group_partials(t, [0, 1, 2], 3, p)
        assert math.isnan(out[0]) and math.isinf(out[1]) and math.isnan(out[-1])
        assert out[2].item() == (9.0 if p == 2 else 3.0)
    mixed = [structural_tensors(d)[2] for d in DTYPES]
    out = ops.multi_tensor_group_partials(mixed, [1, 0, 1, 0], 2, 2.0)
    assert_partials_close(out, ref_group_partials(mixed, [1, 0, 1, 0], 2, 2.0), 2e-3, "mixed dtypes")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cpu"):
        ops.multi_tensor_group_partials([t[0], torch.ones(2)], [0, 0], 1, 2.0)


@gpu_test
def test_group_partials_no_sync_and_cuda_graph():
    ts = structural_tensors(torch.float32) + [torch.randn(5, dtype=torch.float64, device="cuda")]
    groups = [i % 2 for i in range(len(ts))]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in NORM_TYPES:
            ops.multi_tensor_group_partials(ts, groups, 2, p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = [t.clone() for t in ts if is_dense(t)]
    sg = [i % 3 for i in range(len(static))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.multi_tensor_group_partials(static, sg, 3, 2.0)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.multi_tensor_group_partials(static, sg, 3, 2.0)
    for s in static:
        s.copy_(torch.randn_like(s))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(captured), bits(ops.multi_tensor_group_partials(static, sg, 3, 2.0)))


@gpu_test
def test_group_norms_api_on_cuda():
    """segclip.group_norms / clip_groups_ now take the one-pass kernel on CUDA: the same norms as
    on the CPU, the total the one fused_clip_ returns."""
    import segclip
    shapes = {"backbone": [(64, 3, 3, 3), (64,), (300, 200)], "classifier": [(21, 64), (21,)], "aux": [(5, 7)]}
    params = {k: [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in v] for k, v in shapes.items()}
    for ps in params.values():
        for p in ps:
            p.grad = torch.randn_like(p)
    got = segclip.group_norms(params)
    cpu = {k: [torch.nn.Parameter(p.detach().cpu()) for p in ps] for k, ps in params.items()}
    for k, ps in params.items():
        for p, q in zip(ps, cpu[k]):
            q.grad = p.grad.cpu()
    want = segclip.group_norms(cpu)
    torch.testing.assert_close(got.norms.cpu(), want.norms, rtol=1e-6, atol=0)
    total = segclip.total_norm([p.grad for ps in params.values() for p in ps])
    assert torch.equal(bits(got.total), bits(total))
    # clip_groups_ (multi_tensor_group_clip_, its coefficient by torch's ops on the device): the values
    # fused_clip_ gives, bitwise
    from test_groups import clip_groups_then_fused_clip
    clipped, fused_total, mine, originals = clip_groups_then_fused_clip(params, 0.1)
    flat = [p for ps in params.values() for p in ps]
    assert torch.equal(bits(clipped.total), bits(fused_total))
    assert all(torch.equal(a, p.grad) for a, p in zip(mine, flat)) and not torch.equal(mine[0], originals[0])


def agc_ref(weights, grads, clip_factor, eps, norm_type):
    """Unit-wise AGC in float64 (a dim-0 slice, the whole tensor for 0-d/1-d), with torch's ops on the
    tensors' device: the CPU tests' reference (tests/test_adaptive.py)."""
    return agc_reference(weights, grads, clip_factor, eps, norm_type)


def agc_rtol(dtype):
    return {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype, 2 * torch.finfo(dtype).eps)


def assert_agc_close(got, want, dtype, what=""):
    got = got.detach().to(want.device, torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    fin = ~torch.isnan(want)
    fi = torch.finfo(dtype)
    err = (got[fin] - want[fin]).abs() - agc_rtol(dtype) * want[fin].abs() - fi.tiny * fi.eps
    assert err.numel() == 0 or err.max().item() <= 0, \
        f"{what}: off by {(got[fin] - want[fin]).abs().max().item():.3g} (relative {agc_rtol(dtype):g} allowed)"


def agc_pairs(shapes, dtype, device="cuda"):
    """Weights and gradients whose unit norms range over 1e-4..10x the bound: some units clip."""
    ws, gs = [], []
    for s in shapes:
        w = torch.randn(s, dtype=torch.float64)
        rows = s[0] if len(s) > 1 else 1
        scale = 10 ** (torch.rand(rows, dtype=torch.float64) * 5 - 4) * 5  # per unit
        g = torch.randn(s, dtype=torch.float64) * (scale.reshape((rows,) + (1,) * (len(s) - 1)) if len(s) > 1
                                                   else scale.reshape(()))
        ws.append(w.to(device, dtype))
        gs.append(g.to(device, dtype))
    if ws and ws[0].ndim > 1 and ws[0].shape[0] > 2:
        ws[0][1].zero_()  # a unit with zero weights: bound eps * clip_factor
    return ws, gs


AGC_SHAPES = [
    (2048, 64, 1, 1),                 # a 1x1 convolution: thousands of tiny units (warp rows)
    (960, 1, 3, 3),                   # depthwise: 9-element units
    (64,), (), (5, 0), (0,), (1,),    # a bias, 0-d, empties
    (7, WARP_ROW_MAX), (7, WARP_ROW_MAX + 1),  # warp / block row boundary
    (3, CHUNK), (3, CHUNK + 1),       # block / split row boundary
    (3 * CHUNK + 7,),                 # one huge unit over 4 chunks
    (2, 2 * CHUNK + 3),               # two split units
    (300, 517),                       # rows not 16-byte aligned
    (33, 3, 7, 7),
]


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_adaptive_clip_against_float64(norm_type, dtype):
    ws, gs = agc_pairs(AGC_SHAPES, dtype)
    want = agc_ref(ws, gs, 0.01, 1e-3, norm_type)
    cpu = [g.cpu() for g in gs]
    clipped = sum(int(not torch.equal(g.double(), w)) for g, w in zip(gs, want))
    assert clipped > 5  # the case exercises clipping
    ops.multi_tensor_adaptive_clip_(ws, gs, 0.01, 1e-3, norm_type)
    for i, (g, w) in enumerate(zip(gs, want)):
        assert_agc_close(g, w, dtype, f"{dtype} p={norm_type} grads[{i}] {tuple(g.shape)}")
    ops.multi_tensor_adaptive_clip_([w.cpu() for w in ws], cpu, 0.01, 1e-3, norm_type)  # the CPU kernel agrees
    for g, c in zip(gs, cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=2 * agc_rtol(dtype), atol=torch.finfo(dtype).tiny)


@gpu_test
def test_adaptive_clip_planted_error_is_caught():
    ws, gs = agc_pairs(AGC_SHAPES[:3] + AGC_SHAPES[10:12], torch.float32)
    want = agc_ref(ws, gs, 0.01, 1e-3, 2.0)
    ops.multi_tensor_adaptive_clip_(ws, gs, 0.01 * (1 + 1e-5), 1e-3, 2.0)
    with pytest.raises(AssertionError, match="off by"):
        for g, w in zip(gs, want):
            assert_agc_close(g, w, torch.float32)


@gpu_test
def test_adaptive_clip_layouts_nan_and_sharing():
    """Non-contiguous gradients and weights (units are dim-0 slices of the contiguous layout: packed
    copies, written back where a unit clips), NaN in one unit, a gradient listed twice."""
    base_w, base_g = agc_pairs([(517, 300), (8, 4, 3, 3), (64, 262)], torch.float32)
    ws = [base_w[0].t(), base_w[1].contiguous(memory_format=torch.channels_last), base_w[2][:, ::2]]
    gs = [base_g[0].t(), base_g[1].contiguous(memory_format=torch.channels_last), base_g[2][:, ::2]]
    gs[0][4, 7] = math.nan
    want = agc_ref(ws, gs, 0.01, 1e-3, 2.0)
    untouched = base_g[2][:, 1::2].clone()
    ops.multi_tensor_adaptive_clip_(ws, gs, 0.01, 1e-3, 2.0)
    assert gs[0][4].isnan().all() and not gs[0][5].isnan().any()
    for i, (g, w) in enumerate(zip(gs, want)):
        assert_agc_close(g, w, torch.float32, f"layout {i}")
    assert torch.equal(base_g[2][:, 1::2], untouched)  # the gaps of the view are not written
    # one gradient for two parameters: clipped once per entry, in list order (as the CPU kernel)
    w1, w2 = torch.randn(6, 40, device="cuda"), torch.randn(6, 40, device="cuda") * 0.1
    g = torch.randn(6, 40, device="cuda")
    cpu_g = g.cpu()
    ops.multi_tensor_adaptive_clip_([w1, w2], [g, g], 0.01, 1e-3, 2.0)
    ops.multi_tensor_adaptive_clip_([w1.cpu(), w2.cpu()], [cpu_g, cpu_g], 0.01, 1e-3, 2.0)
    torch.testing.assert_close(g.cpu(), cpu_g, rtol=4e-6, atol=0)


@gpu_test
def test_adaptive_clip_several_launches():
    """More pairs than one table holds, a pair with more blocks than one table, split units over
    several launches of the split kernels."""
    shapes = [(1 + (i * 37) % 50, 1 + (i * 911) % 700) for i in range(MAX_PAIRS + 16)]
    shapes.insert(20, (MAX_PAIR_BLOCKS + 100, WARP_ROW_MAX + 3))  # block rows over two launches
    shapes += [(CHUNK + 1 + i,) for i in range(MAX_PAIRS + 5)]  # split pairs: two launches
    ws, gs = agc_pairs(shapes, torch.float32)
    want = agc_ref(ws, gs, 0.01, 1e-3, 2.0)
    ops.multi_tensor_adaptive_clip_(ws, gs, 0.01, 1e-3, 2.0)
    for i, (g, w) in enumerate(zip(gs, want)):
        assert_agc_close(g, w, torch.float32, f"grads[{i}] {tuple(g.shape)}")


@gpu_test
def test_adaptive_clip_no_sync_deterministic_and_cuda_graph():
    ws, gs = agc_pairs(AGC_SHAPES, torch.float32)
    gs.append(torch.randn(9, 70, device="cuda").t())  # a packed copy and its write-back
    ws.append(torch.randn(9, 70, device="cuda").t())
    before = [g.clone() for g in gs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.multi_tensor_adaptive_clip_(ws, gs, 0.01, 1e-3, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = [b.clone() for b in before]
    ops.multi_tensor_adaptive_clip_(ws, again, 0.01, 1e-3, 2.0)
    for g, a in zip(gs, again):
        assert torch.equal(bits(g), bits(a))
    static_w, static_g = agc_pairs(AGC_SHAPES, torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.multi_tensor_adaptive_clip_(static_w, [g.clone() for g in static_g], 0.01, 1e-3, 2.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.multi_tensor_adaptive_clip_(static_w, static_g, 0.01, 1e-3, 2.0)
    _, fresh = agc_pairs(AGC_SHAPES, torch.float32)
    for s, f in zip(static_g, fresh):
        s.copy_(f)
    want = agc_ref(static_w, fresh, 0.01, 1e-3, 2.0)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(static_g, want):
        assert_agc_close(g, w, torch.float32, "graph replay")


@gpu_test
def test_adaptive_clip_api_on_cuda():
    """segclip.adaptive_clip_ takes the fused kernel for CUDA parameters: within 2e-6 of float64."""
    import segclip
    ws, gs = agc_pairs(AGC_SHAPES, torch.float32)
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    want = agc_ref(ws, gs, 0.01, 1e-3, 2.0)
    segclip.adaptive_clip_(params, 0.01, 1e-3, 2.0)
    for p, w in zip(params, want):
        assert_agc_close(p.grad, w, torch.float32)


@gpu_test
def test_opcheck_group_and_adaptive():
    utils = (("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if _fakes_registered() else ("test_schema", "test_autograd_registration"))
    ts = [torch.randn(5, device="cuda"), torch.randn(3, 4, device="cuda").t(), torch.empty(0, device="cuda"),
          torch.randn(CHUNK + 1, device="cuda", dtype=torch.float16)]
    for p in NORM_TYPES:
        torch.library.opcheck(ops.multi_tensor_group_partials.default, (ts, [0, 1, 0, 2], 3, p), test_utils=utils)
        # the norms op on CUDA: its device branch (the roots by ATen ops, on the device)
        torch.library.opcheck(ops.multi_tensor_group_norms.default, (ts + [None], [0, 1, 0, 2, 1], 3, p),
                              test_utils=utils)
        torch.library.opcheck(ops.multi_tensor_group_clip_.default,
                              ([t.clone() for t in ts] + [None], [0, 1, 0, 2, 1], 3, p, 0.5), test_utils=utils)
    ws, gs = agc_pairs([(8, 3, 3, 3), (5,), (3, CHUNK + 3)], torch.float32)
    for p in NORM_TYPES:
        torch.library.opcheck(ops.multi_tensor_adaptive_clip_.default, (ws, [g.clone() for g in gs], 0.01, 1e-3, p),
                              test_utils=utils)
