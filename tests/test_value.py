"""segclip.clip_grad_value_ against torch.nn.utils.clip_grad_value_: the same bits, the same arguments,
and what it refuses (before writing anything); the op's opcheck and write behaviour."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import segclip
from conftest import CPU_BACKENDS, needs_cpu_kernel

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT_VIEW[t.dtype])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same bits, element by element; NaN must meet NaN, with any payload (torch's CPU bfloat16
    clamp rewrites the NaNs of a vector as 0xFFFF, segclip's kernel leaves them as they were)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN where torch has none, or the reverse"
    diff = (bits(got) != bits(want)) & ~nan
    if diff.any():
        i = int(diff.flatten().nonzero()[0])
        raise AssertionError(f"{int(diff.sum())} elements differ in their bits, e.g. {got.flatten()[i].item()!r} "
                             f"vs torch's {want.flatten()[i].item()!r}")


def random_grads(dtype, scale=1.0):
    """Shapes that cross the vector width, the chunk size and the parallel threshold, with NaN, +-inf
    and elements exactly at the bound planted; one non-contiguous (gappy) and one transposed view."""
    shapes = [(1,), (15,), (33,), (66_001,), (3, 5, 7), (140_000,), (0,), (64, 3, 3)]
    grads = [(torch.randn(s, dtype=torch.float64) * scale).to(dtype) for s in shapes]
    grads[1][3], grads[1][4], grads[1][5] = math.nan, math.inf, -math.inf
    grads[3][::1000] = math.nan
    grads.append((torch.randn(40, 30, dtype=torch.float64) * scale).to(dtype)[:, ::3])  # gaps
    grads.append((torch.randn(30, 40, dtype=torch.float64) * scale).to(dtype).t())  # flat, not contiguous
    return grads


def params_with(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        params.append(p)
    return params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [0.7, 1e-3, 0.0, math.inf])
def test_bitwise_torchs_result(backend, dtype, clip_value):
    grads = random_grads(dtype)
    ours = params_with([g.clone() for g in grads])
    theirs = params_with([g.clone() for g in grads])
    ours[0].grad[0] = clip_value if math.isfinite(clip_value) else 1.0  # exactly at the bound
    theirs[0].grad[0] = ours[0].grad[0]
    assert segclip.clip_grad_value_(ours, clip_value, backend=backend) is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for p, q in zip(ours, theirs):
        assert_bitwise(p.grad, q.grad)
    # NaN stays NaN, infinities become the bound
    if math.isfinite(clip_value):
        assert torch.isnan(ours[1].grad[3])
        assert ours[1].grad[4].item() == pytest.approx(clip_value, rel=1e-2, abs=1e-3)


def test_bitwise_check_catches_a_wrong_element():
    """The comparison above can fail: one element off by one ulp, or -0.0 for +0.0, is caught."""
    x = torch.randn(100)
    y = x.clone()
    y[7] = torch.nextafter(y[7], torch.tensor(math.inf))
    with pytest.raises(AssertionError, match="1 elements differ"):
        assert_bitwise(y, x)
    with pytest.raises(AssertionError):
        assert_bitwise(torch.tensor([-0.0]), torch.tensor([0.0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_signature_and_arguments_like_torchs(backend):
    ours = inspect.signature(segclip.clip_grad_value_).parameters
    theirs = inspect.signature(torch.nn.utils.clip_grad_value_).parameters
    assert list(ours)[:3] == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in theirs)
    # one tensor, a generator, None grads, foreach either way, the clip value as int/float/tensor/numpy
    for clip_value in (1, 0.5, torch.tensor(0.5), np.float32(0.5), np.array(0.5)):
        for foreach in (None, True, False):
            p = torch.nn.Parameter(torch.zeros(5))
            p.grad = torch.tensor([-3.0, -0.25, 0.0, 0.25, 3.0])
            q = torch.nn.Parameter(torch.zeros(2))  # no grad: skipped
            segclip.clip_grad_value_((x for x in (p, q)), clip_value, foreach=foreach, backend=backend)
            c = float(clip_value)
            assert p.grad.tolist() == [-c, -0.25 if c > 0.25 else -c, 0.0, min(0.25, c), c]
            assert q.grad is None
    t = torch.nn.Parameter(torch.zeros(3))
    t.grad = torch.tensor([5.0, -5.0, 0.5])
    segclip.clip_grad_value_(t, 1.0, backend=backend)
    assert t.grad.tolist() == [1.0, -1.0, 0.5]
    segclip.clip_grad_value_([], 1.0, backend=backend)  # nothing to do


@pytest.mark.parametrize("bad", [-1.0, -1e-30, math.nan, torch.tensor(-2.0), -math.inf])
def test_bad_clip_value_raises_value_error_before_any_write(bad):
    params = params_with(random_grads(torch.float32, scale=10.0))
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="clip_value must be a non-negative number"):
        segclip.clip_grad_value_(params, bad)
    for p, b in zip(params, before):
        assert_bitwise(p.grad, b)


@pytest.mark.parametrize("bad", ["one", None, [1.0], torch.ones(2)])
def test_clip_value_of_a_wrong_type_is_refused(bad):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, -3.0])
    with pytest.raises((TypeError, ValueError), match="clip_value"):
        segclip.clip_grad_value_([p], bad)
    assert p.grad.tolist() == [3.0, -3.0]


@pytest.mark.parametrize("value", ["1.0", True, np.float32(1.0)])
def test_clip_value_takes_what_torch_takes(value):
    """torch's clip_grad_value_ calls float(clip_value): "1.0" and True are 1.0 there, and here."""
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([3.0, -0.5]), torch.tensor([3.0, -0.5])
    segclip.clip_grad_value_([p], value)
    torch.nn.utils.clip_grad_value_([q], value)
    assert p.grad.tolist() == q.grad.tolist() == [1.0, -0.5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shared_memory_and_inference_tensors(backend):
    g = torch.randn(1000) * 3
    want = g.clamp(-1, 1)
    a, b = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(1000))
    a.grad = b.grad = g  # one gradient listed twice
    segclip.clip_grad_value_([a, b, a], 1.0, backend=backend)
    assert_bitwise(g, want)
    with torch.inference_mode():
        x = torch.full((4,), 5.0)
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = x
    with pytest.raises(RuntimeError, match="inference"):
        segclip.clip_grad_value_([p], 1.0, backend=backend)
    assert x.tolist() == [5.0] * 4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_version_counter_is_bumped(backend):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.1, 0.2, 0.3])
    v = p.grad._version
    segclip.clip_grad_value_([p], 10.0, backend=backend)  # nothing clipped: bumped all the same, as clamp_
    assert p.grad._version > v


@needs_cpu_kernel
def test_bound_beyond_the_dtype_range_clamps_nothing():
    """A bound above float16's range rounds to inf: nothing is clamped (torch's CPU clamp raises
    "cannot be converted to type at::Half without overflow" instead)."""
    g = torch.tensor([60000.0, -65504.0, math.inf, 1.0], dtype=torch.float16)
    want = g.clone()
    want[2] = math.inf
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = g
    segclip.clip_grad_value_([p], 1e6)
    assert_bitwise(g, want)


def test_complex_grads_raise_what_torch_raises():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    p.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_value_([p], 1.0)
    with pytest.raises(RuntimeError) as ours:
        segclip.clip_grad_value_([p], 1.0)
    assert str(ours.value).split("\n")[0] == str(theirs.value).split("\n")[0]


NO_WRITE_SCRIPT = """
import sys, mmap, numpy as np, torch, segclip
n = 300_000
arr = np.memmap(sys.argv[3], dtype=np.float32, mode="r", shape=(n,))
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "the given NumPy array is not writable"
    flat = torch.from_numpy(arr)
params = [torch.nn.Parameter(torch.zeros(k)) for k in (150_000, 100_000, 50_000)]
for p, g in zip(params, flat.split([150_000, 100_000, 50_000])):
    p.grad = g
segclip.clip_grad_value_(params, float(sys.argv[2]), backend=sys.argv[1])
print("ok")
"""


@needs_cpu_kernel
def test_kernel_writes_nothing_inside_the_bound(tmp_path):
    """Gradients in read-only pages: a bound that nothing exceeds must succeed; one element beyond it
    must fault (so the test can fail)."""
    script = tmp_path / "nowrite.py"
    script.write_text(NO_WRITE_SCRIPT)
    data = (np.random.default_rng().standard_normal(300_000) * 0.1).astype(np.float32)
    data[12345] = math.nan  # NaN is never written
    data.tofile(tmp_path / "g.bin")
    ok = subprocess.run([sys.executable, str(script), "cpu", "10.0", str(tmp_path / "g.bin")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok"), ok.stderr
    clipped = subprocess.run([sys.executable, str(script), "cpu", "0.05", str(tmp_path / "g.bin")],
                             capture_output=True, text=True)
    assert clipped.returncode != 0  # the write to read-only memory was attempted and faulted


@needs_cpu_kernel
def test_op_refuses_before_writing_and_opcheck():
    dense = torch.full((4,), 5.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has internally overlapping memory"):
        torch.ops.segclip.multi_tensor_clip_value_([dense, torch.ones(3, 1).expand(3, 2)], 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has dtype Int"):
        torch.ops.segclip.multi_tensor_clip_value_([dense, torch.ones(2, dtype=torch.int32)], 1.0)
    with pytest.raises(RuntimeError, match="non-negative"):
        torch.ops.segclip.multi_tensor_clip_value_([dense], -1.0)
    with pytest.raises(RuntimeError, match="requires grad"):
        torch.ops.segclip.multi_tensor_clip_value_([torch.ones(2, requires_grad=True)], 1.0)
    assert dense.tolist() == [5.0] * 4
    samples = [[torch.randn(17) * 3, torch.randn(3, 4).t() * 3, torch.randn(0)],
               [torch.randn(70_000, dtype=torch.bfloat16), torch.randn(5, dtype=torch.float64)],
               [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(9)[1:]]]
    for tensors, c in zip(samples, (0.5, 10.0, 0.1)):
        torch.library.opcheck(torch.ops.segclip.multi_tensor_clip_value_.default, (tensors, c))


def test_empty_generator_is_silent_as_in_torch():
    """No gradients: nothing to do, and no warning (the "empty generator" warning is
    clip_grad_norm_'s; torch 2.14's clip_grad_value_ raises a RuntimeError from its foreach grouping
    there instead, which a drop-in need not copy)."""
    import warnings

    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_value_((p for p in []), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segclip.clip_grad_value_((p for p in []), 1.0)
        segclip.adaptive_clip_((p for p in []))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [0.7, 1e-3, 0.0])
@pytest.mark.cuda
def test_cuda_bitwise_torchs_result_without_a_sync(dtype, clip_value):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("segclip::multi_tensor_clip_value_", "CUDA")
    grads = [g.cuda() for g in random_grads(dtype)]
    ours = params_with([g.clone() for g in grads])
    theirs = params_with([g.clone() for g in grads])
    torch.cuda.set_sync_debug_mode("error")
    try:
        segclip.clip_grad_value_(ours, clip_value)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for p, q in zip(ours, theirs):
        assert_bitwise(p.grad.cpu(), q.grad.cpu())
