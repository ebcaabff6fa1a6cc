"""segclip.adaptive_clip_ (unit-wise AGC) against a float64 reference written here, and AutoClip / ZClip
against plain Python versions of the published algorithms; their state round trip; no host sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import segclip
from conftest import CPU_BACKENDS, needs_cpu_kernel

# ---------------------------------------------------------------------------------------------------
# AGC
# ---------------------------------------------------------------------------------------------------


def agc_reference(weights, grads, clip_factor, eps, norm_type):
    """Brock et al.'s unit-wise rule in float64: the norm of every unit (a dim-0 slice, or the whole
    tensor for 0-d/1-d), the bound clip_factor * max(||w||, eps), and the gradient scaled to it."""
    out = []
    for w, g in zip(weights, grads):
        w64, g64 = w.detach().double(), g.detach().double().clone()
        if g64.numel() == 0:
            out.append(g64)
            continue
        rows = 1 if g64.ndim <= 1 else g64.shape[0]
        wn = torch.linalg.vector_norm(w64.reshape(rows, -1), norm_type, dim=1)
        gn = torch.linalg.vector_norm(g64.reshape(rows, -1), norm_type, dim=1)
        bound = torch.where(torch.isnan(wn), wn, wn.clamp(min=eps)) * clip_factor
        ratio = bound / torch.where(torch.isnan(gn), gn, gn.clamp(min=1e-6))
        scale = torch.where(gn < bound, torch.ones_like(ratio), ratio)
        out.append((g64.reshape(rows, -1) * scale[:, None]).reshape(g64.shape))
    return out


def assert_close_to(got, want, rtol, atol=1e-30):
    got = got.detach().double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs"
    fin = ~torch.isnan(want)
    err = (got[fin] - want[fin]).abs() - rtol * want[fin].abs() - atol
    assert err.numel() == 0 or err.max().item() <= 0, \
        f"off by {(got[fin] - want[fin]).abs().max().item():.3g} (relative {rtol:g} allowed)"


def make_pairs(shapes, dtype=torch.float32, grad_scale=0.05, zero_rows=True):
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype))
        # per-unit gradient scales from 1e-4 to 10x the weights: some units clip, some do not
        scale = 10 ** (torch.rand(s[:1] if len(s) > 1 else (), dtype=torch.float64) * 5 - 4) * grad_scale * 100
        scale = scale.reshape(scale.shape + (1,) * (len(s) - 1)) if len(s) > 1 else scale
        p.grad = (torch.randn(s, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    if zero_rows and params[0].ndim > 1 and params[0].shape[0] > 2:
        with torch.no_grad():
            params[0][1].zero_()  # a unit with zero weights: bound eps * clip_factor
    return params


SHAPES = [(32, 16, 3, 3), (64, 1, 3, 3), (10, 1000), (70_000,), (), (5, 0), (0,), (3, 40_000), (7,)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_agc_matches_float64_reference(backend, norm_type):
    params = make_pairs(SHAPES)
    want = agc_reference(params, [p.grad for p in params], 0.01, 1e-3, norm_type)
    segclip.adaptive_clip_(params, 0.01, 1e-3, norm_type, backend=backend)
    rtol = 2e-6 if backend == "cpu" and norm_type in (1.0, 2.0, math.inf) else 2e-5  # torch's fp32 norms
    for p, w in zip(params, want):
        assert_close_to(p.grad, w, rtol)


def test_agc_comparison_catches_a_wrong_factor():
    params = make_pairs(SHAPES[:3])
    want = agc_reference(params, [p.grad for p in params], 0.01, 1e-3, 2.0)
    segclip.adaptive_clip_(params, 0.01 * (1 + 1e-5), 1e-3)
    with pytest.raises(AssertionError, match="off by"):
        for p, w in zip(params, want):
            assert_close_to(p.grad, w, 2e-6)


@needs_cpu_kernel
def test_agc_on_deeplabv3_mobilenet_parameters_within_2e6():
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 10 ** (torch.rand(()) * 4 - 4)
    want = agc_reference(params, [p.grad for p in params], 0.01, 1e-3, 2.0)
    segclip.adaptive_clip_(model.parameters(), 0.01, 1e-3, 2.0)
    clipped = sum(int(not torch.equal(p.grad.double(), w)) for p, w in zip(params, want))
    assert clipped > 10  # the case exercises clipping
    for p, w in zip(params, want):
        assert_close_to(p.grad, w, 2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_edge_cases(backend):
    # NaN in one unit's gradient: that unit becomes NaN, the others are untouched by it
    p = torch.nn.Parameter(torch.randn(4, 50))
    p.grad = torch.randn(4, 50) * 1e-6
    p.grad[2, 7] = math.nan
    before = p.grad.clone()
    segclip.adaptive_clip_([p], backend=backend)
    assert p.grad[2].isnan().all() and torch.equal(p.grad[[0, 1, 3]], before[[0, 1, 3]])
    # None grads and empty lists, a generator, one tensor, zero weights and gradients
    q = torch.nn.Parameter(torch.zeros(3, 3))
    q.grad = torch.zeros(3, 3)
    r = torch.nn.Parameter(torch.zeros(5))
    segclip.adaptive_clip_((x for x in (q, r)), backend=backend)
    assert torch.equal(q.grad, torch.zeros(3, 3)) and r.grad is None
    segclip.adaptive_clip_([], backend=backend)
    z = torch.nn.Parameter(torch.zeros(8))
    z.grad = torch.ones(8)
    segclip.adaptive_clip_(z, clip_factor=0.5, eps=1e-3, backend=backend)  # bound 5e-4 on a norm of sqrt(8)
    torch.testing.assert_close(z.grad, torch.full((8,), 5e-4 / math.sqrt(8)), rtol=1e-6, atol=0)
    # a channels_last gradient and weight: units are still dim-0 slices
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last))
    w.grad = (torch.randn(8, 4, 3, 3) * 0.5).contiguous(memory_format=torch.channels_last)
    want = agc_reference([w], [w.grad], 0.01, 1e-3, 2.0)[0]
    segclip.adaptive_clip_([w], backend=backend)
    assert_close_to(w.grad, want, 2e-6)


@pytest.mark.parametrize("bad, match", [({"clip_factor": -0.1}, "clip_factor"), ({"clip_factor": math.nan}, "clip_factor"),
                                        ({"eps": -1.0}, "eps"), ({"backend": "gpu"}, "backend")])
def test_agc_bad_arguments_change_nothing(bad, match):
    params = make_pairs(SHAPES[:2])
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=match):
        segclip.adaptive_clip_(params, **bad)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_agc_other_dtypes(dtype):
    params = make_pairs(SHAPES[:4], dtype=dtype)
    want = agc_reference(params, [p.grad for p in params], 0.01, 1e-3, 2.0)
    segclip.adaptive_clip_(params)
    fi = torch.finfo(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2 * fi.eps  # one rounding of the product
    for p, w in zip(params, want):  # atol: the spacing of float16's subnormals
        assert_close_to(p.grad, w, rtol, atol=fi.tiny * fi.eps)


@needs_cpu_kernel
def test_agc_op_refusals_and_opcheck():
    w, g = torch.ones(4, 3), torch.full((4, 3), 5.0)
    with pytest.raises(RuntimeError, match=r"weights\[0\] has shape \[4, 3\] but grads\[0\] has shape \[3\]"):
        torch.ops.segclip.multi_tensor_adaptive_clip_([w], [torch.ones(3)], 0.01, 1e-3, 2.0)
    with pytest.raises(RuntimeError, match="one weight per grad"):
        torch.ops.segclip.multi_tensor_adaptive_clip_([w, w], [g], 0.01, 1e-3, 2.0)
    with pytest.raises(RuntimeError, match=r"\[1\] has internally overlapping"):
        torch.ops.segclip.multi_tensor_adaptive_clip_([w, torch.ones(3, 2)], [g, torch.ones(3, 1).expand(3, 2)],
                                                      0.01, 1e-3, 2.0)
    with pytest.raises(RuntimeError, match="requires grad"):
        torch.ops.segclip.multi_tensor_adaptive_clip_([w], [g.clone().requires_grad_()], 0.01, 1e-3, 2.0)
    assert torch.equal(g, torch.full((4, 3), 5.0))
    # the weights may require grad (they are parameters)
    torch.ops.segclip.multi_tensor_adaptive_clip_([w.clone().requires_grad_()], [g], 0.01, 1e-3, 2.0)
    assert g.abs().max().item() < 5.0
    samples = [([torch.randn(8, 3, 3, 3), torch.randn(5)], [torch.randn(8, 3, 3, 3), torch.randn(5)]),
               ([torch.randn(3, 70_000, dtype=torch.float64)], [torch.randn(3, 70_000, dtype=torch.float64)])]
    for ws, gs in samples:
        torch.library.opcheck(torch.ops.segclip.multi_tensor_adaptive_clip_.default, (ws, gs, 0.01, 1e-3, 2.0))


# ---------------------------------------------------------------------------------------------------
# AutoClip and ZClip: plain Python versions of the published algorithms
# ---------------------------------------------------------------------------------------------------

def norm_of(grads) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


class AutoClipReference:
    """Seetharaman et al.'s AutoClip: append the norm, clip to the percentile of all norms so far."""

    def __init__(self, percentile, history=None):
        self.percentile, self.history, self.norms = percentile, history, []

    def __call__(self, grads):
        n = norm_of(grads)
        if math.isfinite(n):
            self.norms.append(n)
        window = self.norms[-self.history:] if self.history else self.norms
        bound = float(np.percentile(window, self.percentile)) if window else math.nan
        coef = 1.0 if math.isnan(bound) else min(1.0, bound / (n + 1e-6))
        return n, coef


class ZClipReference:
    """bluorion-com/ZClip's algorithm, z-score mode (both clip options) and percentile mode."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, eps=1e-6, mode="zscore",
                 clip_option="adaptive_scaling", max_grad_norm=None):
        self.__dict__.update(locals())
        self.buffer, self.mean, self.var = [], None, None

    def __call__(self, grads):
        n = norm_of(grads)
        if self.mean is None:
            self.buffer.append(n)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            limit = self.max_grad_norm
        else:
            std = self.var ** 0.5
            clipped = n
            if self.mode == "percentile":
                if n > self.mean + self.z_thresh * std:
                    clipped = self.mean + self.z_thresh * std
            else:
                z = (n - self.mean) / (std + self.eps)
                if z > self.z_thresh:
                    clipped = (self.mean + self.z_thresh * std / (z / self.z_thresh)
                               if self.clip_option == "adaptive_scaling" else self.mean)
            limit = clipped if self.max_grad_norm is None else min(clipped, self.max_grad_norm)
            self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
            self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        coef = limit / (n + 1e-6) if limit is not None and n > limit else 1.0
        return n, coef


def grad_stream(steps, seed):
    """Gradients whose norm drifts, with spikes of 5x to 50x now and then."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(300,), (20, 30), (5,)]
    for step in range(steps):
        scale = (1 + 0.3 * math.sin(step / 5)) * (float(torch.rand((), generator=gen)) * 0.5 + 0.75)
        if step % 9 == 8:
            scale *= 5 + 45 * float(torch.rand((), generator=gen))
        yield [torch.randn(s, generator=gen) * scale for s in shapes]


def run_both(clipper, reference, steps=60, seed=0):
    for grads in grad_stream(steps, seed):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        got = clipper(params)
        n, coef = reference(grads)
        assert abs(float(got) - n) <= 1e-6 * n
        for p, g in zip(params, grads):
            want = g.double() * coef
            torch.testing.assert_close(p.grad.double(), want, rtol=5e-6, atol=1e-12)


@pytest.mark.parametrize("percentile, history", [(10.0, None), (50.0, 7), (0.0, 3), (100.0, None), (37.5, 200)])
def test_autoclip_matches_the_published_algorithm(percentile, history):
    run_both(segclip.AutoClip(percentile, history), AutoClipReference(percentile, history), steps=70)


@pytest.mark.parametrize("kwargs", [{}, {"warmup_steps": 5}, {"warmup_steps": 5, "clip_option": "mean"},
                                    {"warmup_steps": 3, "mode": "percentile", "z_thresh": 1.0},
                                    {"warmup_steps": 4, "max_grad_norm": 20.0, "alpha": 0.9}])
def test_zclip_matches_the_published_algorithm(kwargs):
    run_both(segclip.ZClip(**kwargs), ZClipReference(**kwargs), steps=70)


def test_reference_comparison_catches_a_different_percentile():
    with pytest.raises(AssertionError):
        run_both(segclip.AutoClip(11.0), AutoClipReference(10.0), steps=30)
    with pytest.raises(AssertionError):
        run_both(segclip.ZClip(z_thresh=2.4, warmup_steps=5), ZClipReference(z_thresh=2.5, warmup_steps=5))


@pytest.mark.parametrize("make", [lambda: segclip.AutoClip(25.0, None), lambda: segclip.AutoClip(25.0, 8),
                                  lambda: segclip.ZClip(warmup_steps=6)])
def test_state_dict_resumes_exactly(make, tmp_path):
    stream = list(grad_stream(40, seed=3))
    a = make()
    for grads in stream[:20]:
        a(grads)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = make()
    b.load_state_dict(torch.load(tmp_path / "state.pt"))
    for grads in stream[20:]:
        ga = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        gb = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(ga, gb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        assert torch.equal(a(ga), b(gb))
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ga, gb))


def test_load_state_dict_refuses_other_settings():
    with pytest.raises(ValueError, match="history"):
        segclip.AutoClip(10.0, 5).load_state_dict(segclip.AutoClip(10.0, None).state_dict())
    with pytest.raises(ValueError, match="ZClip"):
        segclip.ZClip(alpha=0.9).load_state_dict(segclip.ZClip().state_dict())


def test_nan_norms_do_not_poison_the_statistics():
    auto, z = segclip.AutoClip(50.0), segclip.ZClip(warmup_steps=3)
    for clipper in (auto, z):
        for grads in grad_stream(6, seed=1):
            clipper([_param(g) for g in grads])
        state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in clipper.state_dict().items()}
        bad = _param(torch.tensor([math.nan, 1.0]))
        clipper([bad])
        after = clipper.state_dict()
        if clipper is z:
            assert torch.equal(after["mean"], state["mean"]) and torch.equal(after["var"], state["var"])
            assert bad.grad[1].item() == 1.0  # ZClip leaves a NaN step's gradients unscaled
        else:
            assert int(torch.isfinite(after["norms"]).sum()) == int(torch.isfinite(state["norms"]).sum())
        g = _param(torch.ones(4))
        n = clipper([g])
        assert math.isfinite(float(n)) and torch.isfinite(g.grad).all()


def _param(g):
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    return p


def test_clippers_pull_no_python_number_per_step(monkeypatch):
    """After warmup, a step converts no tensor to a Python number (no .item(), float(), bool(),
    tolist()): on CUDA each would be a host synchronisation. The patched methods raise."""
    clippers = [segclip.AutoClip(10.0), segclip.AutoClip(10.0, 5), segclip.ZClip(warmup_steps=2),
                segclip.ZClip(warmup_steps=2, mode="percentile", max_grad_norm=3.0)]
    stream = list(grad_stream(8, seed=2))
    for c in clippers:
        for grads in stream[:3]:
            c([_param(g.clone()) for g in grads])

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was converted to a Python value")

    for name in ("item", "__float__", "__bool__", "tolist", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for c in clippers:
        for grads in stream[3:]:
            c([_param(g.clone()) for g in grads])
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="converted"):  # the patch does catch one
        monkeypatch.setattr(torch.Tensor, "item", refuse)
        torch.ones(()).item()


def test_clipper_argument_errors():
    for bad in ({"percentile": 101.0}, {"percentile": -1.0}, {"history": 0}, {"history": 2.5}):
        with pytest.raises(ValueError):
            segclip.AutoClip(**bad)
    for bad in ({"alpha": 1.5}, {"warmup_steps": 0}, {"mode": "z"}, {"clip_option": "max"}, {"z_thresh": math.nan}):
        with pytest.raises(ValueError):
            segclip.ZClip(**bad)
    assert float(segclip.AutoClip()([])) == 0.0 and float(segclip.ZClip()([])) == 0.0
