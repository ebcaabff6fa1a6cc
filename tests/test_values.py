"""Values: total norms and clipped gradients against float64 oracles, on fresh random inputs, for
every backend that can run here, every dtype and every kind of norm_type."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import segclip
from conftest import (ALL_DTYPES, CPU_BACKENDS, KERNEL_NORM_TYPES, NORM_RTOL, OTHER_NORM_TYPES,
                      assert_clipped_close, assert_norm_close, make_params, oracle_coef, oracle_norm)

SHAPES = [(64, 3, 3, 3), (64,), (1000, 37), (5,), (0,), (7, 0, 3), (70_001,), (2, 3, 4, 5), (1,)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES + OTHER_NORM_TYPES)
def test_norm_and_clipped_grads_match_float64(backend, dtype, norm_type):
    if norm_type < 0:  # negative orders: a zero element sends the norm to 0; keep values non-zero
        params, originals = make_params([(300,), (17, 5), (4,)], dtype)
    else:
        params, originals = make_params(SHAPES, dtype)
    ref = oracle_norm(originals, norm_type)
    max_norm = ref / 3 if ref > 0 else 0.5
    total = segclip.fused_clip_(params, max_norm, norm_type=norm_type, backend=backend)
    assert total.dim() == 0
    assert total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_norm_close(total, ref, NORM_RTOL[dtype])
    coef = oracle_coef(ref, max_norm)
    for p, g in zip(params, originals):
        assert_clipped_close(p.grad, g, coef, NORM_RTOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES + (0.0, 3.0))
def test_matches_torch_clip_grad_norm(backend, norm_type):
    # No empty tensors here: torch raises for the inf norm of a list that holds one.
    params, originals = make_params([s for s in SHAPES if math.prod(s) > 0], torch.float32, scale=0.01)
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for tp, g in zip(torch_params, originals):
        tp.grad = g.clone()
    max_norm = 0.05
    ours = segclip.fused_clip_(params, max_norm, norm_type, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, norm_type)
    # torch's fp32 norm carries its own rounding error (seen up to ~1e-6): compare at 1e-5.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    for p, tp in zip(params, torch_params):
        torch.testing.assert_close(p.grad, tp.grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_total_norm_and_clip_with_norm_compose_like_fused(backend):
    params, originals = make_params(SHAPES, torch.float32)
    total = segclip.total_norm([p.grad for p in params], backend=backend)
    assert_norm_close(total, oracle_norm(originals, 2.0), 1e-6)
    segclip.clip_with_norm_(params, 1.0, total, backend=backend)
    coef = oracle_coef(oracle_norm(originals, 2.0), 1.0)
    for p, g in zip(params, originals):
        assert_clipped_close(p.grad, g, coef, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_give_one_global_norm(backend):
    params = []
    for dtype, shape in [(torch.float32, (300, 7)), (torch.float16, (999,)), (torch.bfloat16, (64, 5)),
                         (torch.float64, (70_000,)), (torch.float32, (0,))]:
        p, _ = make_params([shape], dtype)
        params += p
    originals = [p.grad.clone() for p in params]
    ref = oracle_norm(originals, 2.0)
    total = segclip.fused_clip_(params, ref / 2, backend=backend)
    assert total.dtype == torch.float64  # any float64 gradient makes the norm float64
    # the low-precision members bound the accuracy of the global norm
    assert_norm_close(total, ref, 1e-3)
    coef = oracle_coef(ref, ref / 2)
    for p, g in zip(params, originals):
        assert_clipped_close(p.grad, g, coef, NORM_RTOL[g.dtype] if g.dtype != torch.float64 else 1e-6)


def test_fp16_and_bf16_norm_is_float32_and_more_accurate_than_torch():
    params, originals = make_params([(4096, 64), (333,)], torch.bfloat16)
    ours = segclip.total_norm([p.grad for p in params])
    theirs = torch.nn.utils.get_total_norm([p.grad for p in params])
    ref = oracle_norm(originals, 2.0)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    assert abs(ours.item() - ref) <= abs(theirs.item() - ref) + 1e-12


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=12),
    dtype=st.sampled_from(ALL_DTYPES),
    norm_type=st.sampled_from(KERNEL_NORM_TYPES + (0.0, 3.0)),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    ratio=st.floats(min_value=0.01, max_value=3.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
# Once found by hypothesis: one bf16 element one ulp away from the float64 product rounded to bf16,
# a legitimate rounding that the earlier norm-wise check (against the rounded product) rejected.
@example(sizes=[45], dtype=torch.bfloat16, norm_type=1.0, scale=1.0, ratio=0.1875, seed=1)
def test_property_random_lists(sizes, dtype, norm_type, scale, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    params, originals = make_params([(n,) for n in sizes], dtype, scale=scale, generator=gen)
    ref = oracle_norm(originals, norm_type)
    max_norm = ref * ratio
    for backend in CPU_BACKENDS:
        for p, g in zip(params, originals):
            p.grad.copy_(g)
        total = segclip.fused_clip_(params, max_norm, norm_type, backend=backend)
        assert_norm_close(total, ref, NORM_RTOL[dtype])
        coef = oracle_coef(ref, max_norm)
        for p, g in zip(params, originals):
            if coef >= 1:
                assert torch.equal(p.grad, g)
            else:
                assert_clipped_close(p.grad, g, coef, NORM_RTOL[dtype])


def test_the_oracle_comparison_can_fail():
    """The checks above would catch a wrong answer: a norm off by 10 ulps of fp32 and a gradient
    scaled by a slightly wrong coefficient are both rejected."""
    params, originals = make_params([(1000,)], torch.float32)
    ref = oracle_norm(originals, 2.0)
    with pytest.raises(AssertionError):
        assert_norm_close(torch.tensor(ref * (1 + 1.2e-6)), ref, 1e-6)
    with pytest.raises(AssertionError):
        assert_clipped_close(originals[0] * 0.5001, originals[0], 0.5, 1e-6)
    bf = originals[0].bfloat16()
    with pytest.raises(AssertionError):  # two bf16 ulps (1.6%) beyond a 1e-3 coefficient error
        assert_clipped_close((bf.double() * 0.5 * (1 + 2**-6)).bfloat16(), bf, 0.5, 1e-3)
    with pytest.raises(AssertionError):  # a finite value where the product is NaN
        assert_clipped_close(torch.zeros(3), torch.tensor([1.0, math.nan, 2.0]), 0.5, 1e-6)
    with pytest.raises(AssertionError):
        assert_norm_close(torch.tensor(math.nan), ref, 1e-6)
