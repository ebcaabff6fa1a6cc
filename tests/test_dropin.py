"""The last differences from torch's functions (issue 13): max_norm types, warnings, empty tensors.

Each case is run through torch's function and segclip's, so a test fails when either side changes.
"""

from __future__ import annotations

import decimal
import fractions
import math
import warnings

import pytest
import torch

import segclip
from conftest import CPU_BACKENDS, assert_clipped_close, assert_norm_close, make_params, oracle_coef, oracle_norm


class _Floaty:
    def __float__(self):
        return 0.25


def _max_norm_cases():
    np = pytest.importorskip("numpy")
    return ["1.0", " 0.5 ", "inf", b"0.3", True, False, 2, np.float32(0.7), np.array(0.2), np.array(True),
            fractions.Fraction(1, 3), decimal.Decimal("0.4"), _Floaty(), torch.tensor(0.6),
            None, "x", 1 + 0j, [1.0], np.array([0.5]), object()]


def _outcome(fn, max_norm, shapes_grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in shapes_grads]
    for p, g in zip(params, shapes_grads):
        p.grad = g.clone()
    try:
        total = fn(params, max_norm)
    except Exception as exc:  # noqa: BLE001  (the type is what is compared)
        return type(exc), None, None
    return None, total, [p.grad for p in params]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_norm_accepts_what_torch_accepts(backend):
    grads = [torch.randn(50) * 3, torch.randn(4, 7)]
    ref_total = oracle_norm(grads, 2.0)
    for max_norm in _max_norm_cases():
        torch_exc, _, torch_grads = _outcome(torch.nn.utils.clip_grad_norm_, max_norm, grads)
        ours_exc, total, ours_grads = _outcome(
            lambda ps, m: segclip.fused_clip_(ps, m, backend=backend), max_norm, grads)
        assert ours_exc is torch_exc, f"max_norm={max_norm!r}: torch gives {torch_exc}, segclip {ours_exc}"
        if torch_exc is None:
            assert_norm_close(total, ref_total, 1e-6)
            coef = oracle_coef(ref_total, float(max_norm))
            for got, theirs, orig in zip(ours_grads, torch_grads, grads):
                assert_clipped_close(got, orig, coef, 1e-6)
                torch.testing.assert_close(got, theirs, rtol=1e-5, atol=0)


def test_max_norm_errors_name_the_argument_with_its_type():
    params, _ = make_params([(3,)])
    with pytest.raises(ValueError, match=r"max_norm must be a real number, got a str: 'x'"):
        segclip.fused_clip_(params, "x")  # torch: ValueError from float()
    with pytest.raises(TypeError, match=r"max_norm must be a real number, got a complex"):
        segclip.clip_with_norm_(params, 1 + 0j, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"max_norm must be a real number, got an object"):
        segclip.fused_clip_(params, object())


@pytest.mark.parametrize("bad", ["nan", "-1", -0.5, True * -1])
def test_negative_or_nan_max_norm_is_still_refused_whatever_its_type(bad):
    params, originals = make_params([(3,)])
    with pytest.raises(ValueError, match="non-negative"):
        segclip.fused_clip_(params, bad)
    with pytest.raises(ValueError, match="non-negative"):
        segclip.clip_with_norm_(params, bad, torch.tensor(1.0))
    assert torch.equal(params[0].grad, originals[0])


def test_error_messages_use_the_right_article():
    good, _ = make_params([(3,)])
    with pytest.raises(TypeError, match=r"parameters\[1\] is an int, expected a Tensor"):
        segclip.fused_clip_([good[0], 3], 1.0)
    with pytest.raises(TypeError, match=r"tensors\[0\] is an int, expected a Tensor"):
        segclip.total_norm([3])
    with pytest.raises(TypeError, match=r"tensors\[0\] is a str, expected a Tensor"):
        segclip.total_norm(["g"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_generators_warn_only_where_torch_does(backend):
    def empty():
        yield from ()

    # torch's get_total_norm and clip_grads_with_norm_ are silent: under -W error they must not raise.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.nn.utils.get_total_norm(empty()).item() == 0.0
        torch.nn.utils.clip_grads_with_norm_(empty(), 1.0, torch.tensor(1.0))
        assert segclip.total_norm(empty(), backend=backend).item() == 0.0
        assert segclip.clip_with_norm_(empty(), 1.0, torch.tensor(1.0), backend=backend) is None
    # clip_grad_norm_ warns, with the same message as torch's.
    with pytest.warns(UserWarning) as theirs:
        torch.nn.utils.clip_grad_norm_(empty(), 1.0)
    with pytest.warns(UserWarning) as ours:
        segclip.fused_clip_(empty(), 1.0, backend=backend)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


# NOTE: the norm types for which torch refuses an empty tensor, measured on torch 2.14.1:
# inf, -inf and every negative p ("cannot compute the ... norm on an empty tensor"); 0 and every
# positive finite p give 0 for it. segclip skips empty tensors for all of them (README).
NORM_TYPES = (2.0, 1.0, 0.0, 0.5, 3.0, math.inf, -math.inf, -1.0, -0.5, -2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_empty_tensors_differ_from_torch_exactly_where_documented(backend, norm_type):
    torch_raises = math.isinf(norm_type) or norm_type < 0
    full = torch.randn(11) + 0.1
    for tensors in ([torch.empty(0), full], [full, torch.empty(0, 3)], [torch.empty(0)]):
        try:
            theirs = torch.nn.utils.get_total_norm(tensors, norm_type).item()
            raised = False
        except RuntimeError as exc:
            assert "empty tensor" in str(exc)
            raised = True
        assert raised == torch_raises, f"torch {'raised' if raised else 'did not raise'} for p={norm_type}"
        ours = segclip.total_norm(tensors, norm_type, backend=backend).item()
        assert_norm_close(ours, oracle_norm(tensors, norm_type), 1e-6)  # the oracle skips empty tensors
        if not raised:
            assert_norm_close(ours, theirs, 1e-6)
