"""Semantics of fused_clip_ as a drop-in for clip_grad_norm_: edge cases, layouts, determinism,
no writes when nothing is clipped, NaN/inf, and errors for bad input."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import segclip
from conftest import (CPU_BACKENDS, assert_clipped_close, assert_norm_close, make_params,
                      needs_cpu_kernel, oracle_coef, oracle_norm)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_inputs_return_zero(backend):
    for params in ([], iter([]), [torch.nn.Parameter(torch.ones(3))]):  # the last has grad None
        total = segclip.fused_clip_(params, 1.0, backend=backend)
        assert total.dtype == torch.float32 and total.item() == 0.0
    assert segclip.total_norm([], backend=backend).item() == 0.0
    assert segclip.total_norm([None, None], backend=backend).item() == 0.0


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        segclip.fused_clip_((p for p in []), 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_none_grads_are_skipped_and_a_generator_is_consumed_once(backend):
    params, originals = make_params([(10,), (20, 3)])
    params.insert(1, torch.nn.Parameter(torch.ones(4)))  # no grad
    total = segclip.fused_clip_((p for p in params), 0.1, backend=backend)
    assert_norm_close(total, oracle_norm(originals, 2.0), 1e-6)
    assert params[1].grad is None


@pytest.mark.parametrize("ours, theirs", [
    (segclip.fused_clip_, torch.nn.utils.clip_grad_norm_),
    (segclip.total_norm, torch.nn.utils.get_total_norm),
    (segclip.clip_with_norm_, torch.nn.utils.clip_grads_with_norm_),
])
def test_signatures_take_every_argument_torchs_do(ours, theirs):
    # A drop-in must accept every call written for torch, positional or keyword, `foreach` included.
    import inspect
    mine = list(inspect.signature(ours).parameters.values())
    for i, p in enumerate(inspect.signature(theirs).parameters.values()):
        assert (mine[i].name, mine[i].kind, mine[i].default) == (p.name, p.kind, p.default)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_argument_is_accepted_and_changes_nothing(backend, foreach):
    params, originals = make_params([(300,), (20, 7)])
    total = segclip.clip_grad_norm_(params, 0.1, 2.0, False, foreach, backend=backend)
    assert_norm_close(total, oracle_norm(originals, 2.0), 1e-6)
    for p, g in zip(params, originals):
        assert_clipped_close(p.grad, g, oracle_coef(total.item(), 0.1), 1e-6)
    clipped = [p.grad.clone() for p in params]
    norm = segclip.total_norm([p.grad for p in params], 2.0, False, foreach=foreach, backend=backend)
    assert_norm_close(norm, oracle_norm(clipped, 2.0), 1e-6)
    segclip.clip_with_norm_(params, 1e-3, norm, foreach=foreach, backend=backend)
    for p, g in zip(params, clipped):
        assert_clipped_close(p.grad, g, oracle_coef(norm.item(), 1e-3), 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_tensor_argument(backend):
    params, originals = make_params([(100,)])
    total = segclip.fused_clip_(params[0], 0.5, backend=backend)
    assert_norm_close(total, oracle_norm(originals, 2.0), 1e-6)
    assert_clipped_close(params[0].grad, originals[0], oracle_coef(total.item(), 0.5), 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_not_clipping_leaves_grads_bitwise_unchanged(backend):
    params, originals = make_params([(1000, 3), (7,), (65_537,)], torch.bfloat16)
    total = segclip.fused_clip_(params, 1e9, backend=backend)
    assert total.item() > 0
    for p, g in zip(params, originals):
        assert torch.equal(p.grad, g)


NO_WRITE_SCRIPT = textwrap.dedent("""
    import mmap, sys, warnings
    import numpy as np, torch, segclip
    backend, n = sys.argv[1], 200_000
    # Gradients in memory mapped read-only: any write to them kills the process (SIGSEGV).
    buf = mmap.mmap(-1, 4 * n)
    np.frombuffer(buf, dtype=np.float32)[:] = np.random.default_rng().standard_normal(n)
    ro = mmap.mmap(-1, 4 * n)
    ro.write(buf[:]); ro.seek(0)
    arr = np.frombuffer(ro, dtype=np.float32)
    import ctypes
    libc = ctypes.CDLL(None)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ro))
    assert libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(4 * n), 1) == 0  # PROT_READ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = torch.from_numpy(arr)
    params = [torch.nn.Parameter(torch.zeros(k)) for k in (100_000, 60_000, 40_000)]
    for p, g in zip(params, flat.split([100_000, 60_000, 40_000])):
        p.grad = g
    total = segclip.fused_clip_(params, float(sys.argv[2]), backend=backend)
    print("ok", float(total))
""")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scaling_pass_writes_nothing_when_not_clipping(backend, tmp_path):
    """Gradients in read-only pages: not clipping must succeed; clipping must fault (so the test
    can fail)."""
    script = tmp_path / "nowrite.py"
    script.write_text(NO_WRITE_SCRIPT)
    ok = subprocess.run([sys.executable, str(script), backend, "1e9"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok"), ok.stderr
    clipped = subprocess.run([sys.executable, str(script), backend, "1.0"], capture_output=True, text=True)
    assert clipped.returncode != 0  # the write to read-only memory was attempted and faulted


@needs_cpu_kernel
def test_norm_is_bitwise_deterministic_across_calls_and_thread_counts():
    params, _ = make_params([(1_000_003,), (70_000, 3), (5,), (0,), (65_536,)])
    grads = [p.grad for p in params]
    before = torch.get_num_threads()
    results = set()
    try:
        for threads in (1, 2, 3, 1, 2):
            torch.set_num_threads(threads)
            for _ in range(3):
                results.add(segclip.total_norm(grads, backend="cpu").item().hex())
    finally:
        torch.set_num_threads(before)
    assert len(results) == 1, results


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_misaligned_grads_are_clipped_in_place(backend):
    base = torch.randn(64, 32, 5, 5)
    grads = [
        torch.randn(300, 200).t(),                                           # transposed
        torch.randn(8, 16, 9, 9).contiguous(memory_format=torch.channels_last),
        torch.randn(10_001)[1:],                                              # misaligned by 4 bytes
        torch.randn(101, 3, dtype=torch.float64)[::2, 1:],                    # gaps: not dense
        base[:, ::2],                                                         # gaps, a view of base
        torch.randn(65_536 + 1, dtype=torch.float16)[1:],                     # misaligned half
    ]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        params.append(p)
    originals = [g.clone() for g in grads]
    ptrs = [g.data_ptr() for g in grads]
    ref = oracle_norm(originals, 2.0)
    total = segclip.fused_clip_(params, ref / 4, backend=backend)
    assert_norm_close(total, ref, 1e-3)  # includes a float16 tensor
    coef = oracle_coef(ref, ref / 4)
    for p, g, ptr in zip(params, originals, ptrs):
        assert p.grad.data_ptr() == ptr  # the same storage, scaled in place, not replaced by a copy
        assert_clipped_close(p.grad, g, coef, 1e-3 if g.dtype == torch.float16 else 1e-6)
    # the strided view really wrote through to its base tensor
    assert torch.equal(base[:, ::2], params[4].grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_grads_are_correct(backend):
    dense_p, dense_g = make_params([(50,)])
    sparse = torch.nn.Parameter(torch.zeros(10, 3))
    idx = torch.tensor([[0, 0, 4, 9]])  # row 0 twice: duplicates add up
    sparse.grad = torch.sparse_coo_tensor(idx, torch.randn(4, 3), (10, 3), check_invariants=True)
    expected_dense = sparse.grad.to_dense()
    ref = oracle_norm(dense_g + [expected_dense], 2.0)
    total = segclip.fused_clip_([sparse] + dense_p, ref / 2, backend=backend)
    assert_norm_close(total, ref, 1e-6)
    coef = oracle_coef(ref, ref / 2)
    assert_clipped_close(sparse.grad.to_dense(), expected_dense, coef, 1e-6)
    assert_clipped_close(dense_p[0].grad, dense_g[0], coef, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_complex_grads_match_torch(backend):
    p = torch.nn.Parameter(torch.zeros(40, dtype=torch.complex64))
    p.grad = torch.randn(40, dtype=torch.complex64)
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    ours = segclip.fused_clip_([p], 0.5, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_([q], 0.5)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_nan_and_inf_propagate_like_torch(backend, norm_type):
    for bad in (math.nan, math.inf):
        params, originals = make_params([(100,), (30,)])
        params[1].grad[7] = bad
        torch_params = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
        for tp, p in zip(torch_params, params):
            tp.grad = p.grad.clone()
        ours = segclip.fused_clip_(params, 1.0, norm_type, backend=backend)
        theirs = torch.nn.utils.clip_grad_norm_(torch_params, 1.0, norm_type)
        assert ours.isnan().item() == theirs.isnan().item() and ours.isinf().item() == theirs.isinf().item()
        for p, tp in zip(params, torch_params):
            torch.testing.assert_close(p.grad, tp.grad, equal_nan=True, rtol=1e-6, atol=0)
        with pytest.raises(RuntimeError, match="non-finite"):
            segclip.fused_clip_(params, 1.0, norm_type, error_if_nonfinite=True, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_error_if_nonfinite_raises_before_touching_grads(backend):
    params, originals = make_params([(10,)])
    params[0].grad[3] = math.inf
    snapshot = params[0].grad.clone()
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        segclip.fused_clip_(params, 1.0, error_if_nonfinite=True, backend=backend)
    assert torch.equal(params[0].grad, snapshot)
    with pytest.raises(RuntimeError, match="non-finite"):
        segclip.total_norm([params[0].grad], error_if_nonfinite=True, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_tensors_are_ignored_for_the_inf_norm(backend):
    """torch raises for the inf norm of a list holding an empty tensor; segclip takes the max over
    the elements that exist (documented difference)."""
    params, originals = make_params([(0,), (13,), (0, 4)])
    total = segclip.fused_clip_(params, 1e9, math.inf, backend=backend)
    assert total.item() == originals[1].abs().max().item()


@pytest.mark.parametrize("bad", [-1.0, math.nan, -1e-9])
def test_bad_max_norm_raises_value_error_naming_it(bad):
    params, _ = make_params([(3,)])
    with pytest.raises(ValueError, match="max_norm") as info:
        segclip.fused_clip_(params, bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="max_norm"):
        segclip.clip_with_norm_(params, bad, torch.tensor(1.0))


def test_max_norm_type_errors_and_tensor_max_norm():
    params, originals = make_params([(30,)])
    with pytest.raises(TypeError, match="max_norm must be a real number, got a NoneType"):
        segclip.fused_clip_(params, None)
    total = segclip.fused_clip_(params, torch.tensor(0.5))  # like torch, a one-element tensor works
    assert_clipped_close(params[0].grad, originals[0], oracle_coef(total.item(), 0.5), 1e-6)


@pytest.mark.parametrize("norm_type", ["fro", None, object()])
def test_bad_norm_type_raises_what_torch_raises(norm_type):
    params, _ = make_params([(3,)])
    with pytest.raises(Exception) as theirs:
        torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)
    with pytest.raises(type(theirs.value)):
        segclip.fused_clip_(params, 1.0, norm_type)


def test_string_inf_norm_type_is_accepted_like_torch():
    params, originals = make_params([(30,)])
    total = segclip.fused_clip_(params, 1e9, "inf")
    assert total.item() == originals[0].abs().max().item()


def test_integer_grad_and_non_tensor_parameter_are_named():
    p = torch.zeros(3, dtype=torch.int64)
    p.grad = torch.ones(3, dtype=torch.int64)
    good, _ = make_params([(3,)])
    with pytest.raises(TypeError, match=r"parameters\[1\].*int64"):
        segclip.fused_clip_([good[0], p], 1.0)
    with pytest.raises(TypeError, match=r"parameters\[0\] is a list"):
        segclip.fused_clip_([[1.0]], 1.0)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        segclip.total_norm([torch.ones(2), 3.0])


def test_unknown_backend_and_wrong_device_backend():
    params, _ = make_params([(3,)])
    with pytest.raises(ValueError, match="backend must be one of"):
        segclip.fused_clip_(params, 1.0, backend="gpu")
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        segclip.fused_clip_(params, 1.0, backend="cuda")


def test_explicit_backend_that_is_not_built_says_why(monkeypatch):
    from segclip import _ext

    monkeypatch.setattr(_ext, "CPU_LOADED", False)
    monkeypatch.setattr(_ext, "CPU_ERROR", "not compiled (test)")
    params, _ = make_params([(3,)])
    with pytest.raises(RuntimeError, match=r"backend='cpu' is unavailable: not compiled \(test\)"):
        segclip.fused_clip_(params, 1.0, backend="cpu")
    # auto falls back to PyTorch and still gives the right answer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = segclip.fused_clip_(params, 1e9)
    assert total.item() > 0


def test_clip_grad_norm_alias():
    assert segclip.clip_grad_norm_ is segclip.fused_clip_


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_mixed_devices_give_one_global_norm(backend):
    cpu_params, cpu_g = make_params([(1000,), (33, 3)])
    gpu_params, gpu_g = make_params([(5000,), (7, 7)], torch.bfloat16)
    for p in gpu_params:
        p.grad = p.grad.cuda()
    ref = oracle_norm(cpu_g + gpu_g, 2.0)
    total = segclip.fused_clip_(cpu_params + gpu_params, ref / 3, backend=backend)
    assert total.device.type == "cpu"  # the first gradient's device
    assert_norm_close(total, ref, 1e-3)
    coef = oracle_coef(ref, ref / 3)
    for p, g in zip(cpu_params + gpu_params, cpu_g + gpu_g):
        assert_clipped_close(p.grad.cpu(), g, coef, 1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_norm_type_zero_counts_tensors_like_torch(backend):
    """torch's norm of per-tensor norms: for p = 0 that is the number of tensors with a non-zero
    element, also when there is just one tensor."""
    for shapes in ([(2,)], [(3,), (4, 4)]):
        params, originals = make_params(shapes)
        assert segclip.fused_clip_(params, 1e9, 0.0, backend=backend).item() == len(shapes)
        assert torch.nn.utils.get_total_norm(originals, 0.0).item() == len(shapes)


# Memory shared by several list entries; see note: [tensors that share memory] (csrc/shared_memory.h).

def _aliasing_lists(n):
    """(name, params, the memory the grads live in): entries that share memory, as torch sees them."""
    g = torch.randn(n)
    twice = torch.nn.Parameter(torch.zeros(n))
    twice.grad = g.clone()
    a, b = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    a.grad = g.clone()
    b.grad = a.grad  # two parameters, one gradient tensor
    buf = torch.randn(n + n // 2)
    c, d = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    c.grad, d.grad = buf[:n], buf[n // 2:]  # overlapping views of one buffer
    e = torch.nn.Parameter(torch.zeros(7))
    e.grad = torch.randn(7)
    return [("same parameter twice", [twice, e, twice], twice.grad),
            ("one grad for two parameters", [a, b], a.grad),
            ("overlapping views", [c, e, d], buf)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_memory_shared_by_entries_is_scaled_once_per_entry_like_torch(backend):
    # Large enough for the CPU kernel's parallel pass (2 threads): before the fix, the two entries'
    # chunks raced, and some elements came out scaled once instead of twice.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(3):
            for name, params, memory in _aliasing_lists(1 << 19):
                grads = [p.grad.clone() for p in params]
                before = memory.clone()
                total = segclip.fused_clip_(params, 1.0, backend=backend)
                assert_norm_close(total, oracle_norm(grads, 2.0), 1e-6)
                # The oracle: each entry in list order scales its memory by the float32 coefficient,
                # each product exact in float64 and rounded once to float32.
                coef = torch.clamp((1 / (total + 1e-6)) * 1.0, max=1.0).double()
                expect = before.clone()
                for p in params:
                    if p.grad.untyped_storage().data_ptr() == memory.untyped_storage().data_ptr():
                        start = (p.grad.data_ptr() - memory.data_ptr()) // memory.element_size()
                        view = expect[start:start + p.grad.numel()]
                        view.copy_((view.double() * coef).float())
                assert torch.equal(memory, expect), name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scaling_bumps_the_version_counter_so_autograd_sees_it(backend):
    params, _ = make_params([(10,), (3, 3)])
    versions = [p.grad._version for p in params]
    segclip.fused_clip_(params, 1e-3, backend=backend)
    segclip.fused_clip_(params, 1e9, backend=backend)  # nothing written, bumped all the same (as mul_ by 1)
    segclip.clip_with_norm_(params, 1e-3, 1.0, backend=backend)
    assert [p.grad._version for p in params] == [v + 3 for v in versions]
    # A gradient kept by create_graph=True and clipped afterwards: backward through it must refuse,
    # as torch's clip_grad_norm_ makes it refuse, instead of silently using the scaled values.
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    (g,) = torch.autograd.grad((w ** 3).sum(), w, create_graph=True)
    penalty = (g * g).sum()
    w.grad = g
    segclip.fused_clip_([w], 1.0, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(penalty, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_tensors_are_refused_outside_inference_mode_before_any_write(backend):
    with torch.inference_mode():
        params, originals = make_params([(50,), (4, 4)])
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        segclip.fused_clip_(params, 1e-3, backend=backend)
    for p, g in zip(params, originals):
        assert torch.equal(p.grad, g)
    with torch.inference_mode():  # inside, they are clipped
        total = segclip.fused_clip_(params, 1e-3, backend=backend)
    for p, g in zip(params, originals):
        assert_clipped_close(p.grad, g, oracle_coef(total.item(), 1e-3), 1e-6)
    # Normal gradients clipped inside inference_mode get their versions bumped, as by mul_ there.
    params, _ = make_params([(50,), (4, 4)])
    versions = [p.grad._version for p in params]
    with torch.inference_mode():
        segclip.fused_clip_(params, 1e-3, backend=backend)
    assert [p.grad._version for p in params] == [v + 1 for v in versions]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_overlapping_and_expanded_grads_behave_alike_on_every_backend(backend):
    base = torch.randn(7)
    before = base.clone()
    p, q = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(3))
    p.grad = base.as_strided((4, 4), (1, 1))  # indices share elements: each element scaled once
    q.grad = torch.randn(3)
    total = segclip.fused_clip_([q, p], 1e-2, backend=backend)
    coef = torch.clamp((1 / (total + 1e-6)) * 1e-2, max=1.0).double()
    assert torch.equal(base, (before.double() * coef).float())
    # An expanded gradient is refused before anything is written, the dense one before it included.
    # Clipping or not (torch's mul_ by 1 refuses it too).
    r = torch.nn.Parameter(torch.zeros(3, 2))
    r.grad = torch.ones(3, 1).expand(3, 2)
    dense = q.grad.clone()
    for max_norm in (1e-3, 1e9):
        with pytest.raises(RuntimeError, match="internally overlapping memory"):
            segclip.fused_clip_([q, r], max_norm, backend=backend)
        assert torch.equal(q.grad, dense)


def test_clip_with_norm_takes_a_number_in_the_gradients_precision():
    p = torch.nn.Parameter(torch.zeros(100, dtype=torch.float64))
    p.grad = torch.randn(100, dtype=torch.float64)
    g = p.grad.clone()
    segclip.clip_with_norm_([p], 0.3, 1.7)
    assert torch.equal(p.grad, g * ((1 / (torch.tensor(1.7, dtype=torch.float64) + 1e-6)) * 0.3))


def test_max_norm_may_be_a_zero_dim_numpy_array():
    # Every other max_norm type is compared with torch in tests/test_dropin.py.
    np = pytest.importorskip("numpy")
    params, originals = make_params([(30,)])
    total = segclip.fused_clip_(params, np.array(0.5))
    assert_clipped_close(params[0].grad, originals[0], oracle_coef(total.item(), 0.5), 1e-6)
    with pytest.raises(TypeError, match="max_norm"):
        segclip.fused_clip_(params, np.array([0.5]))  # float() refuses it: so does torch


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_any_object_with_a_grad_is_a_parameter_as_in_torch(backend):
    # torch's clip_grad_norm_ only reads p.grad; the fast path did too, the general path refused.
    class Holder:
        def __init__(self, grad):
            self.grad = grad

    params, originals = make_params([(40,), (3, 5)])
    holders = [Holder(p.grad) for p in params] + [Holder(None)]
    total = segclip.fused_clip_(holders, 0.1, 2.0, backend=backend)
    assert_norm_close(total, oracle_norm(originals, 2.0), 1e-6)
    for p, g in zip(params, originals):
        assert_clipped_close(p.grad, g, oracle_coef(total.item(), 0.1), 1e-6)
    for bad in ([Holder(3.0)], [Holder(torch.ones(2)), Holder(3.0)]):
        with pytest.raises(TypeError, match=rf"the gradient of parameters\[{len(bad) - 1}\] is a float"):
            segclip.fused_clip_(bad, 0.1, backend=backend)


@needs_cpu_kernel
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_total_norm_fast_path_is_the_general_path(monkeypatch, norm_type):
    """total_norm's one-op fast path (see clip.py's note: [fast path]) gives the general path's value
    bit for bit, and what the op refuses still reaches the general path's checks."""
    from segclip import clip as clip_mod

    gen = torch.Generator().manual_seed(7)
    lists = [
        [torch.randn(300, generator=gen), None, torch.randn(4, 5, generator=gen).t(), torch.empty(0)],
        [torch.randn(70000, generator=gen).bfloat16(), torch.randn(9, generator=gen).double(), torch.randn(3, 3)],
        [torch.randn(2049, generator=gen)[1:].half(), torch.tensor(3.0)],
        [torch.randn(5, generator=gen), torch.tensor([math.inf, 1.0])],
    ]
    calls = []
    real = clip_mod._fast_norm
    monkeypatch.setattr(clip_mod, "_fast_norm", lambda *a: calls.append(1) or real(*a))
    fast = [segclip.total_norm(ts, norm_type) for ts in lists]
    assert len(calls) == len(lists)
    monkeypatch.setattr(clip_mod, "_fast_norm", lambda *a: None)
    general = [segclip.total_norm(ts, norm_type) for ts in lists]
    for f, g, ts in zip(fast, general, lists):
        assert f.dtype == g.dtype and torch.equal(f, g), (f, g)
        want = oracle_norm([t for t in ts if t is not None], norm_type)
        if math.isfinite(want):
            assert_norm_close(f, want, 1e-6)
    monkeypatch.setattr(clip_mod, "_fast_norm", real)
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        segclip.total_norm([torch.ones(3), torch.ones(2, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"tensors\[1\] is a str"):
        segclip.total_norm([torch.ones(3), "x"])
    with pytest.raises(RuntimeError, match="non-finite"):
        segclip.total_norm(lists[3], norm_type, error_if_nonfinite=True)
    assert segclip.total_norm([None, None]).item() == 0.0
