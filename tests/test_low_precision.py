"""float16 / bfloat16 gradients: where segclip's clipped gradients differ from torch's, and by how much.

torch.nn.utils.clip_grad_norm_ rounds the per-tensor norms, the total norm and the clip coefficient
to the gradients' dtype (a bfloat16 norm has 8 significant bits); segclip keeps the norm and the
coefficient in float32 and rounds each product once. So segclip's gradients are within one rounding
of the exact (float64) product, torch's carry the coefficient's own error on top (measured: up to
about 2 units of roundoff, 0.8% for bfloat16, 0.1% for float16), and the two differ by up to 2 ulps
in a large fraction of the elements. A float16 total norm above 65504 overflows to inf in torch,
which then zeroes every gradient; segclip's float32 norm does not (README "What differs").
"""

from __future__ import annotations

import math

import pytest
import torch

import segclip
from conftest import CPU_BACKENDS, assert_clipped_close, oracle_norm

LOW = (torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _pair(dtype, trial_seed):
    """The same random gradients twice (torch's copy and segclip's), and their exact float64 values."""
    gen = torch.Generator().manual_seed(trial_seed)
    shapes = [(int(torch.randint(1, 3000, (), generator=gen)),) for _ in range(12)]
    scale = 10 ** float(torch.empty(()).uniform_(-2, 1, generator=gen))
    grads = [(torch.randn(s, dtype=torch.float64, generator=gen) * scale).to(dtype) for s in shapes]
    ours, theirs = [], []
    for g in grads:
        for params in (ours, theirs):
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype))
            p.grad = g.clone()
            params.append(p)
    return ours, theirs, grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_grads_differ_from_torch_by_torchs_coefficient_rounding(dtype, backend):
    u = UNIT_ROUNDOFF[dtype]
    eps = torch.finfo(dtype).eps
    base = int(torch.randint(0, 2**31, ()))
    torch_coef_errs, max_ulps, differing, torch_not_rounded_once = [], 0.0, 0, 0
    for trial in range(12):
        ours, theirs, grads = _pair(dtype, base + trial)
        exact = oracle_norm(grads, 2.0)
        max_norm = exact * (0.1 + 0.07 * trial)  # clipping active
        exact_coef = max_norm / (exact + 1e-6)
        total = segclip.fused_clip_(ours, max_norm, backend=backend)
        total_torch = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=True)
        assert total.dtype == torch.float32 and total_torch.dtype == dtype
        assert abs(float(total) / exact - 1) <= 2e-5  # float32, not rounded to the gradients' dtype
        coef_torch = float(torch.clamp(max_norm / (total_torch + 1e-6), max=1.0))
        torch_coef_errs.append(abs(coef_torch / exact_coef - 1) / u)
        for p, q, g in zip(ours, theirs, grads):
            # segclip: one rounding of the exact product (the coefficient's float32 error is ~1e-7).
            assert_clipped_close(p.grad, g, exact_coef, rtol=2e-5)
            # torch: the same plus its coefficient's error (bounded below).
            assert_clipped_close(q.grad, g, exact_coef, rtol=3 * u)
            # torch's gradients that are not the exact product rounded once to their dtype
            torch_not_rounded_once += int((q.grad != (g.double() * exact_coef).to(dtype)).sum())
            spacing = (g.double() * exact_coef).abs().clamp_min(torch.finfo(dtype).tiny) * eps
            max_ulps = max(max_ulps, float(((p.grad.double() - q.grad.double()).abs() / spacing).max()))
            differing += int((p.grad != q.grad).sum())
    # How much: torch's coefficient is off by up to about 2 units of roundoff (measured <= 1.9),
    # the gradients by at most 2 ulps (measured <= 1.9), in a large share of the elements.
    assert max(torch_coef_errs) <= 3.0, torch_coef_errs
    assert max_ulps <= 2.5, max_ulps
    # The difference is real (so the checks above can fail): torch's coefficient is rounded, and
    # some of its gradients are not the exact product rounded once. (Counting those beyond one
    # rounding *plus* a 1e-6 coefficient error instead held in only ~3 of 4 random draws: the
    # tolerance of assert_clipped_close is a whole ulp, and torch's extra error often fits in it.)
    assert max(torch_coef_errs) > 0.05, torch_coef_errs
    assert differing > 0 and torch_not_rounded_once > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float16_norm_above_65504_zeroes_torchs_gradients_not_segclips(backend):
    g = torch.full((10_000,), 1000.0, dtype=torch.float16)  # total norm 1e5 > float16's max
    p = torch.nn.Parameter(torch.zeros_like(g))
    q = torch.nn.Parameter(torch.zeros_like(g))
    p.grad, q.grad = g.clone(), g.clone()
    total = segclip.fused_clip_([p], 1.0, backend=backend)
    total_torch = torch.nn.utils.clip_grad_norm_([q], 1.0, foreach=True)
    assert math.isinf(float(total_torch)) and bool((q.grad == 0).all())  # torch: norm inf, coefficient 0
    # float32 norm (the torch backend's slices are normed by torch's float32 kernels: ~5e-6 here)
    assert float(total) == pytest.approx(1e5, rel=2e-5)
    assert_clipped_close(p.grad, g, 1.0 / (1e5 + 1e-6), rtol=2e-5)  # 0.01, one rounding
