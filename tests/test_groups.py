"""Per-group norms (segclip.group_norms, segclip.clip_groups_) and their op,
segclip::multi_tensor_group_partials, against float64 references."""

from __future__ import annotations

import math
import re

import pytest
import torch

import segclip
from conftest import (ALL_DTYPES, CPU_BACKENDS, KERNEL_NORM_TYPES, NORM_RTOL, OTHER_NORM_TYPES, assert_norm_close,
                      make_params, needs_cpu_kernel, oracle_norm)

op = torch.ops.segclip.multi_tensor_group_partials if hasattr(torch.ops.segclip, "multi_tensor_group_partials") \
    else None
norms_op = getattr(torch.ops.segclip, "multi_tensor_group_norms", None)
clip_op = getattr(torch.ops.segclip, "multi_tensor_group_clip_", None)


def _oracle_partial(tensors, norm_type: float) -> float:
    """The sum of |x|^p (max |x| for inf) over all elements, float64."""
    xs = [t.detach().double().flatten() for t in tensors if t.numel()]
    if not xs:
        return 0.0
    x = torch.cat(xs).abs()
    return float(x.max()) if math.isinf(norm_type) else float(x.pow(norm_type).sum())


def _mixed_tensors():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(70_000, generator=g), torch.randn(3, 40, generator=g).t(),  # a view with gaps
            torch.randn(0), torch.randn(130_001, generator=g).to(torch.bfloat16),
            (torch.randn(9, generator=g) * 1e3).to(torch.float16), torch.randn(17, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)]


@needs_cpu_kernel
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES)
def test_op_against_float64(norm_type):
    tensors = _mixed_tensors()
    groups = [2, 0, 1, 2, 0, 0, 2]  # group 1 holds only an empty tensor; group 3 has none
    out = op(tensors, groups, 4, norm_type)
    assert out.dtype == torch.float64 and out.shape == (5,)
    for k in range(4):
        want = _oracle_partial([t for t, g in zip(tensors, groups) if g == k], norm_type)
        assert out[k].item() == pytest.approx(want, rel=1e-6, abs=0.0), k
    assert out[-1].item() == pytest.approx(_oracle_partial(tensors, norm_type), rel=1e-6)
    # The total is bitwise what multi_tensor_norm takes the root of, on every thread count.
    root = out[-1].sqrt() if norm_type == 2 else out[-1]
    assert root.to(torch.float64).item() == torch.ops.segclip.multi_tensor_norm(tensors, norm_type).item()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(op(tensors, groups, 4, norm_type), out)
    finally:
        torch.set_num_threads(threads)


@needs_cpu_kernel
def test_op_planted_group_error_is_caught():
    tensors = _mixed_tensors()
    right = op(tensors, [0, 1, 0, 1, 0, 1, 0], 2, 2.0)
    wrong = op(tensors, [1, 1, 0, 1, 0, 1, 0], 2, 2.0)  # one tensor in the other group
    assert right[0].item() != pytest.approx(wrong[0].item(), rel=1e-6)
    assert right[-1].item() == wrong[-1].item()


@needs_cpu_kernel
def test_op_nan_and_inf_propagate():
    t = [torch.tensor([1.0, math.nan]), torch.tensor([math.inf, 2.0]), torch.tensor([3.0])]
    for norm_type in KERNEL_NORM_TYPES:
        out = op(t, [0, 1, 2], 3, norm_type)
        assert math.isnan(out[0]) and math.isinf(out[1]) and math.isnan(out[-1])
        assert out[2].item() == (9.0 if norm_type == 2 else 3.0)


@needs_cpu_kernel
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES)
def test_opcheck(norm_type):
    for tensors, groups, n in ((_mixed_tensors(), [0, 1, 0, 1, 0, 1, 0], 2), ([torch.randn(5)], [0], 1),
                               ([torch.randn(0)], [0], 3)):
        torch.library.opcheck(op.default, (tensors, groups, n, norm_type))
        # the norms op too, with a None entry (its fake results come from the partials op's fake kernel)
        torch.library.opcheck(norms_op.default, (tensors + [None], groups + [0], n, norm_type))
        torch.library.opcheck(clip_op.default, ([t.clone() for t in tensors] + [None], groups + [0], n, norm_type, 0.5))


@needs_cpu_kernel
@pytest.mark.parametrize("args, words", [
    (([torch.ones(2)], [0, 0], 1, 2.0), "one group index per tensor"),
    (([torch.ones(2)], [1], 1, 2.0), "groups[0] is 1"),
    (([torch.ones(2)], [-1], 1, 2.0), "groups[0] is -1"),
    (([torch.ones(2)], [0], -1, 2.0), "num_groups must be >= 0"),
    (([], [], 1, 2.0), "non-empty list"),
    (([torch.ones(2)], [0], 1, 3.0), "norm_type 1, 2 and inf"),
    (([torch.ones(2, dtype=torch.int32)], [0], 1, 2.0), "tensors[0] has dtype Int"),
])
def test_op_bad_arguments(args, words):
    with pytest.raises(RuntimeError, match=re.escape(words)):
        op(*args)


@needs_cpu_kernel
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES)
@pytest.mark.parametrize("wide", [False, True])
def test_norms_op_against_float64(norm_type, wide):
    """multi_tensor_group_norms: Nones skipped (their group still counts), roots taken, the norm's dtype."""
    tensors = [t for t in _mixed_tensors() if wide or t.dtype != torch.float64]
    entries = tensors[:2] + [None] + tensors[2:] + [None]
    groups = [2, 0, 1, 2, 0, 1, 2, 0][:len(entries) - 1] + [3]  # group 3 holds nothing but a None
    norms, total = norms_op(entries, groups, 4, norm_type)
    dtype = torch.float64 if wide else torch.float32
    assert norms.dtype == total.dtype == dtype and norms.shape == (4,) and total.shape == ()
    present = [(t, g) for t, g in zip(entries, groups) if t is not None]
    for k in range(4):
        want = _oracle_partial([t for t, g in present if g == k], norm_type)
        want = math.sqrt(want) if norm_type == 2 else want
        assert norms[k].item() == pytest.approx(want, rel=1e-6, abs=0.0), k
    # The total is bitwise multi_tensor_norm's of the present tensors, and it owns its memory.
    assert torch.equal(total, torch.ops.segclip.multi_tensor_norm([t for t, _ in present], norm_type))
    assert total.untyped_storage().data_ptr() != norms.untyped_storage().data_ptr()
    # The same figures as the partials op's, rooted in float64 and rounded once.
    vec = op([t for t, _ in present], [g for _, g in present], 4, norm_type)
    root = vec.sqrt() if norm_type == 2 else vec
    assert torch.equal(norms, root[:-1].to(dtype)) and torch.equal(total, root[-1].to(dtype))


@needs_cpu_kernel
def test_norms_op_planted_group_error_is_caught():
    tensors = _mixed_tensors()
    right, _ = norms_op(tensors, [0, 1, 0, 1, 0, 1, 0], 2, 2.0)
    wrong, _ = norms_op(tensors[:1] + [None] + tensors[2:], [0, 1, 0, 1, 0, 1, 0], 2, 2.0)  # one tensor dropped
    assert right[1].item() != pytest.approx(wrong[1].item(), rel=1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("args, words", [
    (([None, None], [0, 0], 1, 2.0), "every entry is None"),
    (([torch.ones(2), None], [0], 1, 2.0), "groups has 1 entries for 2 tensors"),
    (([torch.ones(2), None], [0, 2], 2, 2.0), "groups[1] is 2"),  # checked for a None entry too
    (([torch.ones(2)], [0], 1, 3.0), "norm_type 1, 2 and inf"),
    (([torch.ones(2, dtype=torch.int32)], [0], 1, 2.0), "tensors[0] has dtype Int"),
])
def test_norms_op_bad_arguments(args, words):
    with pytest.raises(RuntimeError, match=re.escape(words)):
        norms_op(*args)


@needs_cpu_kernel
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES)
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("max_norm", [0.3, 1e30])
def test_clip_op_is_the_norms_then_multi_tensor_clip(norm_type, wide, max_norm):
    """multi_tensor_group_clip_: the norms op's figures, and the present tensors scaled bitwise as
    multi_tensor_clip_ scales them (the same coefficient); nothing changes when nothing needs clipping."""
    tensors = [t for t in _mixed_tensors() if wide or t.dtype != torch.float64]
    entries = tensors[:3] + [None] + tensors[3:]
    groups = [0, 1, 0, 2, 1, 0, 1, 0][:len(entries)]
    want_norms, want_total = norms_op(entries, groups, 3, norm_type)
    alone = [t.clone() for t in tensors]
    want_total2, coef = torch.ops.segclip.multi_tensor_clip_(alone, norm_type, max_norm)
    mine = [None if t is None else t.clone() for t in entries]
    norms, total = clip_op(mine, groups, 3, norm_type, max_norm)
    assert torch.equal(norms, want_norms) and torch.equal(total, want_total) and torch.equal(total, want_total2)
    present = [t for t in mine if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(present, alone))
    if max_norm > 1:
        assert all(torch.equal(a, b) for a, b in zip(present, tensors))  # coefficient 1: untouched
    else:
        assert coef.item() < 1 and not torch.equal(present[0], tensors[0])


@needs_cpu_kernel
def test_clip_op_refuses_before_writing():
    ok = torch.randn(70_000)
    before = ok.clone()
    expanded = torch.randn(1).expand(8)  # the scale refuses it (as mul_ does), after the norms are read
    with pytest.raises(RuntimeError, match="expanded|overlap|stride"):
        clip_op([ok, None, expanded], [0, 0, 1], 2, 2.0, 0.0)
    assert torch.equal(ok, before)
    with pytest.raises(RuntimeError, match="max_norm must be a non-negative number"):
        clip_op([ok], [0], 1, 2.0, -1.0)
    with pytest.raises(RuntimeError, match="every entry is None"):
        clip_op([None], [0], 1, 2.0, 1.0)
    assert torch.equal(ok, before)
    # segclip.clip_groups_ then takes the general path, which names the gradient
    p, q = torch.nn.Parameter(torch.zeros(70_000)), torch.nn.Parameter(torch.zeros(8))
    p.grad, q.grad = ok, expanded
    with pytest.raises(RuntimeError, match="expand"):
        segclip.clip_groups_({"a": [p], "b": [q]}, 0.0)
    assert torch.equal(ok, before)


@needs_cpu_kernel
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_ops_refuse_requires_grad_in_grad_mode_and_group_norms_does_not():
    """The partials op's Autograd kernel (see NOTE [autograd kernels] in csrc/segclip.cpp): a gradient
    kept by create_graph=True requires grad; group_norms runs under no_grad, as total_norm does."""
    w = torch.nn.Parameter(torch.randn(5))
    (w.sin().sum()).backward(create_graph=True)
    assert w.grad.requires_grad
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        op([w.grad], [0], 1, 2.0)
    with pytest.raises(RuntimeError, match="requires grad and grad mode is on"):
        norms_op([w.grad], [0], 1, 2.0)
    norms = segclip.group_norms({"w": [w]})
    assert not norms.total.requires_grad
    assert norms.total.item() == pytest.approx(oracle_norm([w.grad.detach()], 2.0), rel=1e-6)


def _model_groups(dtype=torch.float32):
    shapes = {"backbone": [(64, 3, 3, 3), (64,), (300, 200)], "classifier": [(21, 64), (21,)], "aux": [(5, 7)]}
    params = {k: make_params(v, dtype=dtype)[0] for k, v in shapes.items()}
    return params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", KERNEL_NORM_TYPES + OTHER_NORM_TYPES)
def test_group_norms_against_float64(backend, norm_type):
    params = _model_groups()
    params["aux"][0].grad = None  # a group without gradients
    norms = segclip.group_norms(params, norm_type, backend=backend)
    assert norms.names == ("backbone", "classifier", "aux")
    rtol = 1e-6 if norm_type not in (0.5, -1.0) else 1e-5
    for name, ps in params.items():
        grads = [p.grad for p in ps if p.grad is not None]
        want = oracle_norm(grads, norm_type) if grads else 0.0
        if not grads and norm_type < 0:
            want = math.inf  # an empty group: min over nothing, or the -1-th root of a sum of nothing
        assert_norm_close(norms[name], want, rtol)
    every = [p.grad for ps in params.values() for p in ps if p.grad is not None]
    assert_norm_close(norms.total, oracle_norm(every, norm_type), rtol)
    assert norms.norms.dtype == torch.float32 and norms.total.dtype == torch.float32
    # The same total as segclip.total_norm (bitwise with the kernel: the same pass, the same order).
    if backend == "cpu" and norm_type in KERNEL_NORM_TYPES:
        assert norms.total.item() == segclip.total_norm(every, norm_type, backend=backend).item()


@needs_cpu_kernel
def test_group_norms_takes_one_op_call_with_nones(monkeypatch):
    """The fast path (see note: [group fast path]) serves groups with None gradients, and gives the
    general path's figures."""
    params = _model_groups()
    params["backbone"][1].grad = None
    params["aux"][0].grad = None
    general = segclip.group_norms(params, backend="torch")
    monkeypatch.setattr(segclip.groups, "_collect", lambda named: pytest.fail("the general path ran"))
    fast = segclip.group_norms(params)
    assert fast.names == general.names and fast.norms[2].item() == 0.0
    torch.testing.assert_close(fast.norms, general.norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast.total, general.total, rtol=1e-6, atol=0)
    before = [p.grad.clone() for ps in params.values() for p in ps if p.grad is not None]
    segclip.clip_groups_(params, 0.0)  # scales by 0: every present gradient, the Nones skipped
    assert all(p.grad is None or not p.grad.any() for ps in params.values() for p in ps)
    assert any(b.any() for b in before)


def clip_groups_then_fused_clip(params: dict, max_norm: float):
    """``clip_groups_(params)``, then the same gradients restored and ``fused_clip_`` over all of them:
    ``(groups' result, fused_clip_'s norm, the gradients clip_groups_ left, the originals)``; the
    parameters end with fused_clip_'s gradients."""
    flat = [p for ps in params.values() for p in ps]
    originals = [p.grad.clone() for p in flat]
    norms = segclip.clip_groups_(params, max_norm)
    clipped = [p.grad.clone() for p in flat]
    for p, g in zip(flat, originals):
        p.grad = g.clone()
    return norms, segclip.fused_clip_(flat, max_norm), clipped, originals


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_clip_groups_matches_fused_clip(dtype):
    params = _model_groups(dtype)
    flat = [p for ps in params.values() for p in ps]
    norms, total, clipped, originals = clip_groups_then_fused_clip(params, 0.1)
    assert norms.total.item() == total.item()
    assert all(torch.equal(a, p.grad) for a, p in zip(clipped, flat))  # clipped by the same coefficient
    assert not torch.equal(clipped[0], originals[0])
    assert_norm_close(norms.total, oracle_norm(originals, 2.0), NORM_RTOL[dtype] if dtype != torch.float32 else 1e-6)
    assert norms.norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_group_forms_and_result():
    params = _model_groups()
    as_list = segclip.group_norms([params["backbone"], iter(params["classifier"])])
    assert as_list.names == ("0", "1")
    opt = torch.optim.SGD([{"params": params["backbone"], "name": "body"}, {"params": params["classifier"]}], lr=0.1)
    by_opt = segclip.group_norms(opt.param_groups)
    assert by_opt.names == ("body", "1")
    assert torch.equal(by_opt.norms, as_list.norms)
    one = segclip.group_norms({"w": params["aux"][0]})  # a single tensor as a group
    d = one.to_dict()
    assert d == {"w": pytest.approx(oracle_norm([params["aux"][0].grad], 2.0), rel=1e-6), "total": d["w"]}
    with pytest.raises(KeyError, match="no group named 'x'"):
        one["x"]
    empty = segclip.group_norms({"a": [], "b": [torch.nn.Parameter(torch.zeros(2))]})
    assert empty.norms.tolist() == [0.0, 0.0] and empty.total.item() == 0.0


def test_group_argument_errors():
    with pytest.raises(TypeError, match="groups must be a mapping"):
        segclip.group_norms(torch.zeros(3))
    with pytest.raises(TypeError, match="without 'params'"):
        segclip.group_norms([{"lr": 1}])
    with pytest.raises(ValueError, match="unique"):
        segclip.group_norms([{"params": [], "name": "a"}, {"params": [], "name": "a"}])
    with pytest.raises(TypeError, match="group names must be strings"):
        segclip.group_norms({1: []})
    p = torch.zeros(2, dtype=torch.int64)
    p.grad = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="group 'a': the gradient of parameters\\[0\\]"):
        segclip.group_norms({"a": [p]})
    with pytest.raises(ValueError, match="max_norm"):
        segclip.clip_groups_({"a": []}, -1.0)
    with pytest.raises(ValueError, match="backend"):
        segclip.group_norms({"a": []}, backend="nope")


def test_nonfinite():
    params = _model_groups()
    params["classifier"][1].grad[3] = math.nan
    norms = segclip.group_norms(params)
    assert math.isnan(norms["classifier"]) and math.isnan(norms.total) and math.isfinite(norms["backbone"])
    with pytest.raises(RuntimeError, match="non-finite"):
        segclip.clip_groups_(params, 1.0, error_if_nonfinite=True)


def test_bench_groups_suite_plans_and_names_the_heads():
    import subprocess
    import sys

    from segclip.bench.cases import make_case
    from segclip.bench.suites.groups import case_groups

    names, group_of = case_groups(make_case("deeplabv3_mobilenet_v3_large"))
    assert names == ("backbone", "classifier") and len(group_of) == make_case("deeplabv3_mobilenet_v3_large").n_tensors
    assert group_of[0] == 0 and group_of[-1] == 1
    names, group_of = case_groups(make_case("synthetic_smoke"))
    assert len(names) == 3 and sorted(set(group_of)) == [0, 1, 2]
    r = subprocess.run([sys.executable, "-m", "segclip", "bench", "--suite", "groups", "--models", "synthetic_smoke",
                        "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "segclip groups" in r.stdout and "global kernel" in r.stdout
