"""The custom ops themselves: registration, opcheck, argument errors from the C++ checks, and
torch.compile(fullgraph=True) through fused_clip_."""

from __future__ import annotations

import math

import pytest
import torch

import segclip
from conftest import CPU_BACKENDS, assert_norm_close, make_params, needs_cpu_kernel, oracle_norm

pytestmark = needs_cpu_kernel

OPS = ("multi_tensor_norm", "multi_tensor_norm_coef", "multi_tensor_scale_", "multi_tensor_clip_")


def test_ops_are_registered_for_cpu():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segclip::{name}", "CPU"), name


def _samples():
    yield [torch.randn(17), torch.randn(3, 4).t(), torch.randn(0)]
    yield [torch.randn(70_000, dtype=torch.bfloat16), torch.randn(5, dtype=torch.float64)]
    yield [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), torch.randn(9)[1:]]
    yield [torch.randn(65_537, dtype=torch.float16)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_opcheck_norm_ops(norm_type):
    for tensors in _samples():
        torch.library.opcheck(torch.ops.segclip.multi_tensor_norm.default, (tensors, norm_type))
        torch.library.opcheck(torch.ops.segclip.multi_tensor_norm_coef.default, (tensors, norm_type, 0.5))


@pytest.mark.parametrize("max_norm", [1e-3, 1e9])  # clipping, and nothing to clip
def test_opcheck_clip_op(max_norm):
    for tensors in _samples():
        torch.library.opcheck(torch.ops.segclip.multi_tensor_clip_.default, (tensors, 2.0, max_norm))


@pytest.mark.parametrize("coef", [0.25, 1.0, 2.0])
def test_opcheck_scale_op(coef):
    for tensors in _samples():
        torch.library.opcheck(torch.ops.segclip.multi_tensor_scale_.default, (tensors, torch.tensor(coef)))


def test_norm_coef_op_values():
    xs = [torch.randn(1000, dtype=torch.float64), torch.randn(33, dtype=torch.float64)]
    ref = oracle_norm(xs, 2.0)
    norm, coef = torch.ops.segclip.multi_tensor_norm_coef(xs, 2.0, ref / 2)
    assert norm.dtype == coef.dtype == torch.float64
    assert_norm_close(norm, ref, 1e-12)
    assert_norm_close(coef, (ref / 2) / (ref + 1e-6), 1e-12)
    _, coef = torch.ops.segclip.multi_tensor_norm_coef(xs, 2.0, ref * 2)
    assert coef.item() == 1.0
    _, coef = torch.ops.segclip.multi_tensor_norm_coef([torch.tensor([math.nan])], 2.0, 1.0)
    assert math.isnan(coef.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_coef_op_coefficient_is_bitwise_torchs(dtype):
    """For the norm it returns, the op's coefficient is bit for bit what clip_grad_norm_ computes from
    that norm: ``clamp(max_norm / (norm + 1e-6), max=1)``, where ``number / tensor`` is
    ``reciprocal() * number``. (A true division differs by one ulp about a quarter of the time.)"""
    mismatches = []
    for _ in range(400):
        t = torch.randn(int(torch.randint(1, 40, ())), dtype=dtype) * 10.0 ** float(torch.randint(-4, 5, ()))
        max_norm = float(torch.rand((), dtype=torch.float64)) * 2 * float(t.norm())
        norm, coef = torch.ops.segclip.multi_tensor_norm_coef([t], 2.0, max_norm)
        expected = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if not torch.equal(coef, expected):
            mismatches.append((norm.item(), max_norm, coef.item(), expected.item()))
    assert not mismatches, f"{len(mismatches)} of 400 differ from torch's coefficient, e.g. {mismatches[:3]}"


def test_cpu_ops_take_a_data_pointer_that_is_not_element_aligned():
    """A float32 tensor one byte into its storage (set_ on a byte slice): the CPU kernel reads and
    scales it correctly (the CUDA kernel refuses it: test_cuda.py)."""
    base = torch.empty(20_001)
    odd = torch.empty(0).set_(base.untyped_storage()[1:], 0, (20_000,), (1,))
    odd.copy_(torch.randn(20_000))
    assert odd.data_ptr() % 4 == 1
    copy = odd.clone()
    for norm_type in (2.0, 1.0, math.inf):
        assert_norm_close(torch.ops.segclip.multi_tensor_norm([torch.ones(3), odd], norm_type),
                          oracle_norm([torch.ones(3), copy], norm_type), 1e-6)
    torch.ops.segclip.multi_tensor_scale_([odd], torch.tensor(0.25))
    assert torch.equal(odd, copy * 0.25)


def test_scale_op_scales_a_self_overlapping_view_once_per_element():
    """as_strided((3, 3), (1, 1)) shares elements between indices; each is scaled once (an in-place
    mul_ gives [0.5, 0.25, 0.125, 0.25, 0.5] here). The CUDA kernel does the same (test_cuda.py)."""
    base = torch.randn(5)
    before = base.clone()
    torch.ops.segclip.multi_tensor_scale_([base.as_strided((3, 3), (1, 1))], torch.tensor(0.5))
    assert torch.equal(base, before * 0.5)


def test_scale_op_nan_coef_scales_and_coef_of_one_skips():
    x = torch.randn(100)
    y = x.clone()
    torch.ops.segclip.multi_tensor_scale_([y], torch.tensor(1.0))
    assert torch.equal(x, y)
    torch.ops.segclip.multi_tensor_scale_([y], torch.tensor(math.nan))
    assert y.isnan().all()


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.segclip.multi_tensor_norm([], 2.0), "non-empty"),
    (lambda: torch.ops.segclip.multi_tensor_norm([torch.ones(2), torch.ones(2, dtype=torch.int32)], 2.0),
     r"tensors\[1\] has dtype Int"),
    (lambda: torch.ops.segclip.multi_tensor_norm([torch.ones(2)], 3.0), "norm_type 1, 2 and inf, got 3"),
    (lambda: torch.ops.segclip.multi_tensor_norm([torch.ones(2, dtype=torch.complex64)], 2.0), "ComplexFloat"),
    (lambda: torch.ops.segclip.multi_tensor_norm([torch.ones(2).to_sparse()], 2.0), r"tensors\[0\] has layout Sparse"),
    (lambda: torch.ops.segclip.multi_tensor_norm_coef([torch.ones(2), torch.ones(2, 2).to_sparse_csr()], 2.0, 1.0),
     r"tensors\[1\] has layout SparseCsr"),
    (lambda: torch.ops.segclip.multi_tensor_scale_([torch.ones(2).to_sparse()], torch.tensor(0.5)),
     r"multi_tensor_scale_: tensors\[0\] has layout Sparse"),
    (lambda: torch.ops.segclip.multi_tensor_scale_([torch.ones(2)], torch.ones(2)), "0-dim"),
    (lambda: torch.ops.segclip.multi_tensor_scale_([torch.ones(2)], torch.tensor(1)), "floating point"),
])
def test_op_argument_errors_say_what_was_received(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_scale_op_refuses_overlapping_views_before_writing_anything():
    dense = torch.ones(4)
    expanded = torch.ones(3, 1).expand(3, 2)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has internally overlapping memory"):
        torch.ops.segclip.multi_tensor_scale_([dense, expanded], torch.tensor(0.5))
    assert torch.equal(dense, torch.ones(4))


def test_scale_op_refuses_inference_tensors_outside_inference_mode():
    # A list of nothing but inference tensors reaches no autograd key: the kernel itself refuses.
    with torch.inference_mode():
        xs, coef = [torch.ones(4), torch.ones(3)], torch.tensor(0.5)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is an inference tensor"):
        torch.ops.segclip.multi_tensor_scale_(xs, coef)
    assert all(torch.equal(x, torch.ones_like(x)) for x in xs)
    with torch.inference_mode():
        torch.ops.segclip.multi_tensor_scale_(xs, coef)
    assert all(torch.equal(x, torch.full_like(x, 0.5)) for x in xs)


def test_scale_op_rejects_meta_device_tensor():
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ops.segclip.multi_tensor_scale_([torch.ones(2), torch.ones(2, device="meta")], torch.tensor(0.5))


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    # backend="torch" too: its scale read the coefficient on the host (bool(coef >= 1)), which
    # fullgraph tracing refuses (a data-dependent branch).
    torch._dynamo.reset()

    def step(params, max_norm):
        return segclip.fused_clip_(params, max_norm, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    for max_norm in (0.5, 1e9):  # clipping and not clipping, same graph (max_norm is a constant)
        params, originals = make_params([(300,), (20, 7), (0,), (5, 5)])
        eager_params = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
        for ep, g in zip(eager_params, originals):
            ep.grad = g.clone()
        # One gradient shared by two parameters: scaled once per entry, traced as in eager (a
        # traced _foreach_mul_ computes every product from the old values and scales it once).
        params.append(torch.nn.Parameter(torch.zeros(300)))
        params[-1].grad = params[0].grad
        eager_params.append(torch.nn.Parameter(torch.zeros(300)))
        eager_params[-1].grad = eager_params[0].grad
        got = compiled(params, max_norm)
        want = step(eager_params, max_norm)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for p, ep in zip(params, eager_params):
            torch.testing.assert_close(p.grad, ep.grad, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# multi_tensor_clip_: the whole clip in one op call


def _clip_inputs():
    """Every layout the kernels distinguish, mixed dtypes, and memory shared by two entries."""
    shared = torch.randn(70_000)
    return [torch.randn(17), torch.randn(300, 517).t(), torch.randn(0), torch.randn(64, 131)[:, ::2],
            torch.randn(70_001, dtype=torch.bfloat16)[1:], torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
            torch.randn(513, dtype=torch.float16), torch.randn(()), shared[:50_000], shared[20_000:],
            torch.randn(*[3] * 9)[(slice(None, None, 2),) * 9]]


def _clone_list(ts):
    """Copies keeping each entry's layout and the memory entries share (both paths see alike lists)."""
    storages = {}
    out = []
    for t in ts:
        st = storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().clone())
        out.append(torch.empty(0, dtype=t.dtype).set_(st, t.storage_offset(), t.shape, t.stride()))
    return out


def _bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("ratio", [0.3, 3.0])  # clipping, and nothing to clip
def test_clip_op_is_bitwise_the_two_op_path_and_matches_float64(norm_type, ratio):
    ts = _clip_inputs()
    two = _clone_list(ts)
    original = [t.clone() for t in _clone_list(ts)]
    ref = oracle_norm(original, norm_type)
    norm, coef = torch.ops.segclip.multi_tensor_clip_(ts, norm_type, ref * ratio)
    norm2, coef2 = torch.ops.segclip.multi_tensor_norm_coef(two, norm_type, ref * ratio)
    torch.ops.segclip.multi_tensor_scale_(two, coef2)
    assert norm.dtype == coef.dtype == torch.float32 and norm.shape == coef.shape == ()
    assert torch.equal(norm, norm2) and torch.equal(coef, coef2)
    assert_norm_close(norm, ref, 1e-3)  # bfloat16 and float16 in the list
    assert (float(coef) == 1.0) == (ratio > 1)
    for i, (a, b) in enumerate(zip(ts, two)):
        assert torch.equal(_bits(a), _bits(b)), f"tensors[{i}]"
    # The comparison can fail: one entry scaled once more is seen.
    torch.ops.segclip.multi_tensor_scale_([two[0]], torch.tensor(0.5))
    assert not torch.equal(_bits(ts[0]), _bits(two[0]))


def test_clip_op_scales_by_the_float64_coefficient():
    xs = [torch.randn(1000, dtype=torch.float64), torch.randn(70_000, dtype=torch.float64)]
    before = [x.clone() for x in xs]
    ref = oracle_norm(before, 2.0)
    norm, coef = torch.ops.segclip.multi_tensor_clip_(xs, 2.0, ref / 4)
    assert norm.dtype == coef.dtype == torch.float64
    assert_norm_close(norm, ref, 1e-12)
    assert_norm_close(coef, (ref / 4) / (ref + 1e-6), 1e-12)
    for x, b in zip(xs, before):
        torch.testing.assert_close(x, b * ((ref / 4) / (ref + 1e-6)), rtol=1e-12, atol=0)


def test_clip_op_refuses_before_writing_anything():
    dense = torch.randn(100)
    before = dense.clone()
    with pytest.raises(RuntimeError, match=r"multi_tensor_clip_: tensors\[1\] has internally overlapping memory"):
        torch.ops.segclip.multi_tensor_clip_([dense, torch.ones(3, 1).expand(3, 2)], 2.0, 1e-3)
    with pytest.raises(RuntimeError, match=r"multi_tensor_clip_: tensors\[1\] has dtype Int"):
        torch.ops.segclip.multi_tensor_clip_([dense, torch.ones(3, dtype=torch.int32)], 2.0, 1e-3)
    with pytest.raises(RuntimeError, match="norm_type 1, 2 and inf, got 3"):
        torch.ops.segclip.multi_tensor_clip_([dense], 3.0, 1e-3)
    with pytest.raises(RuntimeError, match="non-empty"):
        torch.ops.segclip.multi_tensor_clip_([], 2.0, 1e-3)
    with pytest.raises(RuntimeError, match=r"multi_tensor_clip_: tensors\[0\] has layout Sparse"):
        torch.ops.segclip.multi_tensor_clip_([torch.ones(2).to_sparse()], 2.0, 1e-3)
    with torch.inference_mode():
        inf_t = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is an inference tensor"):
        torch.ops.segclip.multi_tensor_clip_([dense, inf_t], 2.0, 1e-3)
    assert torch.equal(dense, before) and torch.equal(inf_t, torch.ones(4))


def test_clip_op_bumps_versions_clipping_or_not():
    xs = [torch.randn(10), torch.randn(64, 131)[:, ::2]]
    for max_norm in (1e-3, 1e9):
        versions = [x._version for x in xs]
        torch.ops.segclip.multi_tensor_clip_(xs, 2.0, max_norm)
        assert [x._version for x in xs] == [v + 1 for v in versions]


# ----------------------------------------------------------------------------------------------
# Autograd kernels (see note: [autograd kernels] in csrc/segclip.cpp)


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_its_own_autograd_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"segclip::{name}", "Autograd"), name


_CALLS = {
    "multi_tensor_norm": lambda ts: torch.ops.segclip.multi_tensor_norm(ts, 2.0),
    "multi_tensor_norm_coef": lambda ts: torch.ops.segclip.multi_tensor_norm_coef(ts, 2.0, 1.0),
    "multi_tensor_scale_": lambda ts: torch.ops.segclip.multi_tensor_scale_(ts, torch.tensor(0.5)),
    "multi_tensor_clip_": lambda ts: torch.ops.segclip.multi_tensor_clip_(ts, 2.0, 1e-3),
}


@pytest.mark.parametrize("name", OPS)
def test_ops_refuse_tensors_that_require_grad_in_grad_mode(name):
    """Our Autograd kernel answers, not torch's boxed fallback: with the fallback set to "nothing"
    (no autograd at all), only our kernel can raise (by default the fallback would attach a grad_fn
    that only warns at backward)."""
    leaf = torch.randn(5, requires_grad=True)
    prev = torch._C._get_autograd_fallback_mode()
    torch._C._set_autograd_fallback_mode("nothing")
    try:
        with pytest.raises(RuntimeError, match=rf"segclip::{name}: tensors\[1\] requires grad and grad mode is on"):
            _CALLS[name]([torch.randn(3), leaf])
        with torch.no_grad():  # redispatched below autograd: the kernel runs
            out = _CALLS[name]([torch.randn(3), leaf.detach().clone().requires_grad_()])
    finally:
        torch._C._set_autograd_fallback_mode(prev)
    for o in (out if isinstance(out, tuple) else (out,) if out is not None else ()):
        assert not o.requires_grad and o.grad_fn is None


def _lopsided_list(seed: int) -> list[torch.Tensor]:
    """600 small tensors, then a few of several chunks each (one of them not a whole number of chunks):
    cut into equal counts of chunks, the second thread would get nearly all the elements (see NOTE
    [balanced split] in csrc/cpu/balanced_parallel.h)."""
    g = torch.Generator().manual_seed(seed)
    small = [torch.randn(int(n), generator=g) for n in torch.randint(1, 300, (600,), generator=g)]
    big = [torch.randn(n, generator=g) * s for n, s in ((3 * 65536 + 17, 1.0), (5 * 65536, 0.1), (65536 - 3, 10.0))]
    return small + big + [torch.randn(7, generator=g)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_chunk_runs_once_whatever_the_split(threads):
    """The CPU kernels run each chunk (row block for AGC) exactly once, on any thread count, and give
    bitwise the same results: norms against float64, the scale, the value clip and AGC against
    single-thread runs and torch's own ops on each tensor."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ts = _lopsided_list(threads)
        ops = torch.ops.segclip
        norms = {p: ops.multi_tensor_norm(ts, p) for p in (2.0, 1.0, math.inf)}
        for p, norm in norms.items():
            assert_norm_close(norm, oracle_norm(ts, p), 1e-6)
        scaled = [t.clone() for t in ts]
        ops.multi_tensor_scale_(scaled, torch.tensor(0.5))
        assert all(torch.equal(a, b * 0.5) for a, b in zip(scaled, ts))  # a chunk scaled twice would be 0.25
        clamped = [t.clone() for t in ts]
        ops.multi_tensor_clip_value_(clamped, 0.7)
        assert all(torch.equal(a, b.clamp(-0.7, 0.7)) for a, b in zip(clamped, ts))
        weights = [torch.ones_like(t) for t in ts]
        agc = [t.clone() for t in ts]
        ops.multi_tensor_adaptive_clip_(weights, agc, 0.01, 1e-3, 2.0)
        torch.set_num_threads(1)
        agc_one = [t.clone() for t in ts]
        ops.multi_tensor_adaptive_clip_(weights, agc_one, 0.01, 1e-3, 2.0)
        assert all(torch.equal(a, b) for a, b in zip(agc, agc_one))
        assert sum(not torch.equal(a, b) for a, b in zip(agc, ts)) > 500  # most units were clipped
        assert all(torch.equal(ops.multi_tensor_norm(ts, p), norm) for p, norm in norms.items())  # bitwise, 1 thread
    finally:
        torch.set_num_threads(before)
