"""segclip.clip_optimizer_ against torch's recipe: scaler.unscale_ + clip_grad_norm_ + step/update.

Two copies of a small conv net with BatchNorm train in lockstep on the same random batches, one with
torch's recipe and one with clip_optimizer_; the returned norms, the parameters, the BatchNorm
buffers, the optimizer state, the loss scale and the growth tracker must agree to float32 tolerance
over 24 steps, with an inf and a NaN gradient planted at chosen steps.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import segclip
from segclip import fold as fold_mod

STEPS = 24
INJECT = {5: math.inf, 11: math.nan, 12: -math.inf}  # step -> the value planted in one gradient
MAX_NORMS = (0.05, 1e3)  # alternating: clipping active, then nothing to clip
RTOL, ATOL = 2e-5, 1e-6  # float32 tolerance after 24 steps of Adam (1-ulp coefficient differences grow)
# Where that tolerance is too tight for a case on some machine (see note: [torch's own noise]), the
# bound is torch's recipe against itself with max_norm a few ulps off, times NOISE_MARGIN.
NUDGES = (-3, -2, -1, 2, 3)  # max_norm * (1 + k * 2**-23): k float32 ulps
NOISE_MARGIN = 2.0
ULPS = 4  # the least bound: 4 ulps of the tensor's largest magnitude (where torch's noise is 0)

OPTIMIZERS = {
    "AdamW-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "Adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "SGD-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True),
    "SGD-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
    "AdamW-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
}
FUSED = {"AdamW-fused", "Adam-fused", "SGD-fused"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The nets are tiny: one thread is faster, and it does not stall when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_net() -> nn.Module:
    return nn.Sequential(
        # No conv bias before a BatchNorm: its gradient is rounding noise, which Adam would blow up
        # to full-size steps of random sign, and no two correct recipes would agree on it.
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def make_scaler(init_scale=2.0 ** 10):
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=4)


def backward(net, x, y, scaler, step, inject):
    loss = nn.functional.cross_entropy(net(x), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if step in inject:
        next(net.parameters()).grad.view(-1)[step] = inject[step]


def finish_step(opt, scaler):
    """The user's usual step: ``scaler.step(opt); scaler.update()``, or ``opt.step()`` without a scaler."""
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def torch_recipe(net, opt, scaler, max_norm, norm_type=2.0):
    if scaler is not None:
        scaler.unscale_(opt)
    total = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm, norm_type)
    finish_step(opt, scaler)
    return total


def segclip_recipe(net, opt, scaler, max_norm, norm_type=2.0, **kw):
    total = segclip.clip_optimizer_(opt, max_norm, scaler=scaler, norm_type=norm_type, **kw)
    finish_step(opt, scaler)
    return total


def state_pairs(net_a, opt_a, net_b, opt_b):
    """``(name, a, b)`` for every parameter, buffer and optimizer state tensor of the two copies."""
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        yield name, a, b
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            yield f"optimizer state {k}.{key}", sa[k][key], sb[k][key]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, NaN-free positions only (0 for empty tensors)."""
    return float((b - a).abs().nan_to_num(0.0).max()) if a.numel() else 0.0


def assert_same_state(net_a, opt_a, net_b, opt_b, scaler_a=None, scaler_b=None, what="", bounds=None):
    """The two copies agree to RTOL/ATOL, or, for a name in ``bounds``, to that max |difference|."""
    for name, a, b in state_pairs(net_a, opt_a, net_b, opt_b):
        if bounds is not None and name in bounds and a.is_floating_point():
            diff = max_abs_diff(a, b)
            assert diff <= bounds[name] and torch.equal(a.isnan(), b.isnan()), (
                f"{what} {name}: max |difference| {diff:.3g} > {bounds[name]:.3g}, {NOISE_MARGIN}x torch's "
                f"recipe against itself with max_norm {NUDGES} ulps off")
        else:
            torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, equal_nan=True, msg=lambda m: f"{what} {name}: {m}")
    if scaler_a is not None:
        assert scaler_b.get_scale() == scaler_a.get_scale(), what
        assert scaler_b._get_growth_tracker() == scaler_a._get_growth_tracker(), what


def train_pair(opt_name, scaler_on, fold, inject=INJECT, norm_type=2.0, init_scale=2.0 ** 10, steps=STEPS,
               seed=0, recipe=None, **kw):
    """Trains the two copies side by side (the second by ``recipe``, segclip's by default); returns
    both and the per-step norms."""
    recipe = recipe or segclip_recipe
    torch.manual_seed(seed)
    net_a = make_net()
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = OPTIMIZERS[opt_name](net_a.parameters()), OPTIMIZERS[opt_name](net_b.parameters())
    sc_a = make_scaler(init_scale) if scaler_on else None
    sc_b = make_scaler(init_scale) if scaler_on else None
    norms = []
    for step, (x, y) in enumerate(batches(steps, seed + 1)):
        max_norm = MAX_NORMS[step % 2]
        for net, opt, sc in ((net_a, opt_a, sc_a), (net_b, opt_b, sc_b)):
            opt.zero_grad()
            backward(net, x, y, sc, step, inject)
        n_a = torch_recipe(net_a, opt_a, sc_a, max_norm, norm_type)
        n_b = recipe(net_b, opt_b, sc_b, max_norm, norm_type, fold=fold, **kw)
        norms.append((n_a, n_b))
        assert not hasattr(opt_b, "grad_scale") and not hasattr(opt_b, "found_inf"), f"step {step}: leaked"
    return net_a, opt_a, sc_a, net_b, opt_b, sc_b, norms


def nudged_torch_recipe(k: int):
    """torch's recipe with max_norm ``k`` float32 ulps off where it clips: as correct as torch's."""
    def recipe(net, opt, scaler, max_norm, norm_type=2.0, **_):
        return torch_recipe(net, opt, scaler, max_norm * (1 + k * 2.0 ** -23), norm_type)
    return recipe


def torch_noise(**pair) -> dict[str, float]:
    """The largest max |difference| per state tensor between torch's recipe and itself nudged by NUDGES."""
    floor: dict[str, float] = {}
    for k in NUDGES:
        net_a, opt_a, _, net_b, opt_b, _, _ = train_pair(**pair, fold=False, recipe=nudged_torch_recipe(k))
        for name, a, b in state_pairs(net_a, opt_a, net_b, opt_b):
            if a.is_floating_point() and a.numel():
                floor[name] = max(floor.get(name, 0.0), max_abs_diff(a, b))
    return floor


# NOTE: [torch's own noise]
# segclip's recipes round differently from torch's (a folded coefficient divides instead of two
# multiplies; a scale that is no power of two rounds in its own place), so the copies differ by about
# an ulp after the first step. Adam can grow that: torch's recipe against itself with max_norm 1-3
# ulps off differs by up to 3.4e-6 after 12 steps of norm_type=1 with scale 1000 (Intel Xeon, 2026-12-01),
# where ATOL is 1e-6. So a case that misses RTOL/ATOL is held, tensor by tensor, to NOISE_MARGIN
# times what torch's recipe does against itself in that very case, measured in the same run (at least
# ULPS ulps of the tensor's magnitude). That bound is tighter than ATOL where the values are small: a
# coefficient 1e-4 off moves Adam's exp_avg by 1.4e-6 where torch's own noise is 5.6e-9, and is caught
# (test_a_wrong_coefficient_is_caught).
def check_pair(result, what, **pair):
    """The norms to 1e-5 and the state to RTOL/ATOL; given ``pair`` (the arguments of the
    ``train_pair`` call), a state that misses RTOL/ATOL is held to torch's own noise instead."""
    net_a, opt_a, sc_a, net_b, opt_b, sc_b, norms = result
    for step, (n_a, n_b) in enumerate(norms):
        torch.testing.assert_close(n_b, n_a.to(n_b.dtype), rtol=1e-5, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what} norm at step {step}: {m}")
    try:
        assert_same_state(net_a, opt_a, net_b, opt_b, sc_a, sc_b, what)
    except AssertionError:
        if not pair:
            raise
        floors = {name: ULPS * torch.finfo(a.dtype).eps * float(a.abs().nan_to_num(0.0, 0.0, 0.0).max())
                  for name, a, _ in state_pairs(net_a, opt_a, net_b, opt_b) if a.is_floating_point() and a.numel()}
        bounds = {name: max(floors[name], NOISE_MARGIN * noise) for name, noise in torch_noise(**pair).items()}
        assert_same_state(net_a, opt_a, net_b, opt_b, sc_a, sc_b, what, bounds=bounds)


FOLDS = ("auto", True, False)
CASES = [(o, s, f) for o in OPTIMIZERS for s in (True, False) for f in FOLDS if not (f is True and o not in FUSED)]


@pytest.mark.parametrize("opt_name,scaler_on,fold", CASES)
def test_matches_torch_recipe(opt_name, scaler_on, fold):
    # Without a scaler a planted inf makes torch's parameters NaN for good (coefficient 0, inf * 0):
    # plant nothing there (test_nonfinite_without_scaler_is_torchs covers it).
    pair = dict(opt_name=opt_name, scaler_on=scaler_on, inject=INJECT if scaler_on else {})
    result = train_pair(**pair, fold=fold)
    check_pair(result, f"{opt_name} scaler={scaler_on} fold={fold}", **pair)
    if scaler_on:
        assert result[2].get_scale() != 2.0 ** 10  # the planted infs backed the scale off, growth moved it


def test_paths_are_the_ones_documented():
    net = make_net()
    for name in OPTIMIZERS:
        opt = OPTIMIZERS[name](net.parameters())
        backward(net, *batches(1, 0)[0], None, 0, {})
        for scaler in (None, make_scaler()):
            if scaler is not None:
                scaler.scale(torch.ones(()))
            want = fold_mod.FOLDED if name in FUSED else (fold_mod.ONE_PASS if scaler is not None else fold_mod.PLAIN)
            assert segclip.fold.fold_path(opt, scaler=scaler) == want, name
            assert segclip.fold.fold_path(opt, scaler=scaler, fold=False) == (
                fold_mod.ONE_PASS if scaler is not None else fold_mod.PLAIN)


@pytest.mark.parametrize("norm_type", [1.0, math.inf, 3.0])
def test_other_norm_types_and_a_scale_that_is_no_power_of_two(norm_type):
    for fold in (True, False):
        pair = dict(opt_name="AdamW-fused", scaler_on=True, norm_type=norm_type, init_scale=1000.0, steps=12)
        check_pair(train_pair(**pair, fold=fold), f"norm_type={norm_type} fold={fold}", **pair)


def test_skip_nonfinite_skips_like_a_synchronised_check():
    torch.manual_seed(3)
    net_a = make_net()
    net_b = copy.deepcopy(net_a)
    opt_a = OPTIMIZERS["AdamW-fused"](net_a.parameters())
    opt_b = OPTIMIZERS["AdamW-fused"](net_b.parameters())
    for step, (x, y) in enumerate(batches(16, 4)):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad()
            backward(net, x, y, None, step, INJECT)
        n_a = torch.nn.utils.clip_grad_norm_(net_a.parameters(), 0.05)
        if torch.isfinite(n_a):  # the reference pays the host synchronisation
            opt_a.step()
        n_b = segclip.clip_optimizer_(opt_b, 0.05, skip_nonfinite=True)
        opt_b.step()
        torch.testing.assert_close(n_b, n_a, rtol=1e-5, atol=0, equal_nan=True)
    assert_same_state(net_a, opt_a, net_b, opt_b, what="skip_nonfinite")
    assert all(torch.isfinite(p).all() for p in net_b.parameters())


def test_nonfinite_without_scaler_is_torchs():
    """No scaler: inf gradient -> coefficient 0 -> inf * 0 = NaN, others 0, and the step runs."""
    for fold in FOLDS:
        pair = dict(opt_name="AdamW-fused", scaler_on=False, inject={3: math.inf}, steps=5)
        result = train_pair(**pair, fold=fold)
        check_pair(result, f"fold={fold}", **pair)
        assert any(torch.isnan(p).any() for p in result[3].parameters())  # as torch's: NaN


def _one_backward(opt_name="AdamW-fused", scaler=None, seed=0):
    torch.manual_seed(seed)
    net = make_net()
    opt = OPTIMIZERS[opt_name](net.parameters())
    backward(net, *batches(1, seed)[0], scaler, 0, {})
    return net, opt


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def test_folded_grads_untouched_until_the_step_then_clipped_and_unscaled():
    sc_a, sc_b = make_scaler(), make_scaler()
    net_a, opt_a = _one_backward(scaler=sc_a)
    net_b, opt_b = _one_backward(scaler=sc_b)
    before = _grads(net_b)
    segclip.clip_optimizer_(opt_b, 0.05, scaler=sc_b)
    assert all(torch.equal(g, p.grad) for g, p in zip(before, net_b.parameters()))  # still scaled, unclipped
    torch_recipe(net_a, opt_a, sc_a, 0.05)
    sc_b.step(opt_b)
    sc_b.update()
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-9)


def test_second_unscale_and_second_clip_raise_as_in_torch():
    for opt_name in ("AdamW-fused", "SGD-foreach"):
        sc = make_scaler()
        net, opt = _one_backward(opt_name, sc)
        segclip.clip_optimizer_(opt, 1.0, scaler=sc)
        with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
            sc.unscale_(opt)
        with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
            segclip.clip_optimizer_(opt, 1.0, scaler=sc)
        sc.step(opt)
        with pytest.raises(RuntimeError, match="after step"):
            segclip.clip_optimizer_(opt, 1.0, scaler=sc)
        sc.update()
    net, opt = _one_backward()
    segclip.clip_optimizer_(opt, 1.0)
    with pytest.raises(RuntimeError, match="already called on this optimizer"):
        segclip.clip_optimizer_(opt, 1.0)


def test_folded_coefficient_never_leaks_into_the_next_step():
    """After a folded step, a plain step (no clipping) matches torch's plain step bit for bit; a fold
    abandoned without a step (new gradients, or scaler.update()) is dropped, not applied later."""
    net_a, opt_a = _one_backward()
    net_b, opt_b = _one_backward()
    opt_b.grad_scale = torch.tensor(2.0)  # a user's own grad_scale comes back after the step
    opt_a.grad_scale = torch.tensor(2.0)
    torch.nn.utils.clip_grad_norm_(net_a.parameters(), 0.01)
    opt_a.step()
    segclip.clip_optimizer_(opt_b, 0.01)
    opt_b.step()
    assert float(opt_b.grad_scale) == 2.0
    del opt_a.grad_scale, opt_b.grad_scale
    for step, (x, y) in enumerate(batches(3, 9)):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad()
            backward(net, x, y, None, step, {})
        if step == 1:  # clip, then abandon the step: new gradients make the pending fold stale
            segclip.clip_optimizer_(opt_b, 1e-4)
            for net, opt in ((net_a, opt_a), (net_b, opt_b)):
                opt.zero_grad()
                backward(net, x, y, None, step, {})
        opt_a.step()
        opt_b.step()
        assert_same_state(net_a, opt_a, net_b, opt_b, what=f"plain step {step}")
    # The same with a scaler: update() without a step starts a new iteration; its plain step is torch's.
    sc_a, sc_b = make_scaler(), make_scaler()
    net_a, opt_a = _one_backward(scaler=sc_a)
    net_b, opt_b = _one_backward(scaler=sc_b)
    sc_a.unscale_(opt_a)
    torch.nn.utils.clip_grad_norm_(net_a.parameters(), 1e-4)
    segclip.clip_optimizer_(opt_b, 1e-4, scaler=sc_b)
    assert not hasattr(opt_b, "grad_scale")  # nothing visible until the step
    for net, opt, sc in ((net_a, opt_a, sc_a), (net_b, opt_b, sc_b)):
        sc.update()
        opt.zero_grad(set_to_none=False)  # the same gradient tensors, zeroed in place
        backward(net, *batches(1, 5)[0], sc, 0, {})
        sc.step(opt)
        sc.update()
    assert_same_state(net_a, opt_a, net_b, opt_b, sc_a, sc_b, what="scaler, abandoned fold")


def test_gradients_changed_in_place_after_a_folded_clip_make_the_step_raise():
    net, opt = _one_backward()
    segclip.clip_optimizer_(opt, 1e-3)
    next(net.parameters()).grad.mul_(2)
    with pytest.raises(RuntimeError, match="gradients changed between"):
        opt.step()
    opt.step()  # the fold was dropped with the error: the next step is a plain one


def test_disabled_scaler_is_no_scaler():
    sc_a = torch.amp.GradScaler("cpu", enabled=False)
    sc_b = torch.amp.GradScaler("cpu", enabled=False)
    net_a, opt_a = _one_backward(scaler=sc_a)
    net_b, opt_b = _one_backward(scaler=sc_b)
    torch_recipe(net_a, opt_a, sc_a, 0.05)
    assert segclip.fold.fold_path(opt_b, scaler=sc_b) == "folded"
    segclip.clip_optimizer_(opt_b, 0.05, scaler=sc_b, fold=True)
    sc_b.step(opt_b)
    sc_b.update()
    assert not hasattr(opt_b, "grad_scale")
    assert_same_state(net_a, opt_a, net_b, opt_b, what="disabled scaler")


def _refused(opt, net, match, exc=ValueError, **kw):
    before = _grads(net)
    with pytest.raises(exc, match=match):
        segclip.clip_optimizer_(opt, 1e-3, **kw)
    assert all(torch.equal(g, p.grad) for g, p in zip(before, net.parameters()))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_bad_input_is_refused_before_anything_changes():
    net, opt = _one_backward("AdamW-foreach")
    _refused(opt, net, "fold=True, but AdamW was not created with fused=True", fold=True)
    _refused(opt, net, "skip_nonfinite=True needs the folded path", skip_nonfinite=True)
    net, opt = _one_backward()
    _refused(opt, net, "fold must be", fold="yes")
    with pytest.raises(ValueError, match="max_norm"):
        segclip.clip_optimizer_(opt, -1.0)
    with pytest.raises(TypeError, match="scaler must be"):
        segclip.clip_optimizer_(opt, 1.0, scaler=object())
    with pytest.raises(TypeError, match="optimizer must be"):
        segclip.clip_optimizer_(net, 1.0)
    _refused(opt, net, "fold=True, but norm_type=0", fold=True, norm_type=0.0)
    sc = make_scaler()  # no scaler.scale(loss) this iteration: torch's unscale_ raises the same
    _refused(opt, net, "Attempted unscale_ but _scale is None", AssertionError, scaler=sc)
    net.apply(lambda m: m.half() if isinstance(m, nn.Linear) else None)
    sc.scale(torch.ones(()))
    net[-1].weight.grad = torch.ones_like(net[-1].weight)
    _refused(opt, net, "Attempting to unscale FP16 gradients", scaler=sc)


def test_error_if_nonfinite_raises_with_nothing_changed():
    for fold in FOLDS:
        for scaler_on in (True, False):
            sc = make_scaler() if scaler_on else None
            net, opt = _one_backward("AdamW-fused", sc)
            next(net.parameters()).grad.view(-1)[0] = math.inf
            _refused(opt, net, "non-finite", RuntimeError, fold=fold, scaler=sc, error_if_nonfinite=True)
            if sc is not None:
                sc.unscale_(opt)  # the iteration can go on with torch's own recipe


def test_subclass_that_overrides_step_does_not_fold():
    class Mine(torch.optim.AdamW):
        def step(self, closure=None):
            return super().step(closure)

    net = make_net()
    opt = Mine(net.parameters(), fused=True)
    backward(net, *batches(1, 0)[0], None, 0, {})
    with pytest.raises(ValueError, match="overrides step"):
        segclip.clip_optimizer_(opt, 1.0, fold=True)
    assert segclip.fold.fold_path(opt) == "plain"


def test_several_devices_and_sparse_gradients():
    """Several devices: fold=True refuses, auto takes the plain path (torch's recipe with
    fused_clip_). Meta tensors stand in for a second device here (no GPU)."""
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, device="meta", requires_grad=True)
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    opt = torch.optim.AdamW([a, b], fused=True)
    with pytest.raises(ValueError, match="several devices"):
        segclip.clip_optimizer_(opt, 1e-3, fold=True)
    assert torch.equal(a.grad, torch.ones(3))
    assert segclip.fold.fold_path(opt) == "plain"

    # Sparse gradients (an Embedding(sparse=True) under plain SGD, which takes them): torch's recipe.
    def run(use_segclip):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.5)
        sc = make_scaler()
        for step in range(3):
            opt.zero_grad()
            sc.scale(emb(torch.tensor([1, 2, 2, 7])).sum()).backward()
            if use_segclip:
                assert segclip.fold.fold_path(opt, scaler=sc) == "plain"
                segclip.clip_optimizer_(opt, 0.5, scaler=sc)
            else:
                sc.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(emb.parameters(), 0.5)
            sc.step(opt)
            sc.update()
        return emb.weight.detach()

    torch.testing.assert_close(run(True), run(False))
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    opt = torch.optim.SGD(emb.parameters(), lr=0.5, fused=True)
    with pytest.raises(ValueError, match="sparse"):
        segclip.clip_optimizer_(opt, 1e-3, fold=True)


def test_tensor_subclass_gradients_take_the_plain_path():
    class Local(torch.Tensor):  # stands in for DTensor, whose local norm is not the global one
        pass

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3).as_subclass(Local)
    opt = torch.optim.AdamW([p], fused=True)
    assert segclip.fold.fold_path(opt) == "plain"
    with pytest.raises(ValueError, match="not a plain Tensor"):
        segclip.clip_optimizer_(opt, 1.0, fold=True)


def test_no_gradients():
    net = make_net()
    opt = OPTIMIZERS["AdamW-fused"](net.parameters())
    assert float(segclip.clip_optimizer_(opt, 1.0)) == 0.0
    assert not hasattr(opt, "grad_scale")


def test_missing_contract_falls_back_with_one_warning(monkeypatch):
    """Simulates a torch without GradScaler's OptState: one warning, the plain path, same results."""
    monkeypatch.setattr(fold_mod, "_contract_reason", [])
    monkeypatch.setattr(fold_mod, "_warned", set())
    monkeypatch.delattr(torch.amp.grad_scaler, "OptState")
    assert "OptState" in fold_mod.contract_problem()
    with pytest.raises(RuntimeError, match="folding is unavailable.*OptState"):
        net, opt = _one_backward()
        segclip.clip_optimizer_(opt, 1.0, fold=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_pair("AdamW-fused", False, "auto", inject={}, steps=6)
    assert [str(w.message).count("OptState") for w in caught] == [1]
    check_pair(result, "fallback")
    monkeypatch.undo()
    monkeypatch.setattr(fold_mod, "_contract_reason", [])
    monkeypatch.setattr(fold_mod, "TESTED_TORCH", ((1, 0),))
    assert "is not a version where segclip tested it" in fold_mod.contract_problem()
    with pytest.warns(UserWarning, match="plain path"):
        check_pair(train_pair("AdamW-fused", True, "auto", steps=8), "untested torch with a scaler")
    # the opt-in that lets this file test the contract on another torch (gpu_check.sh sets it)
    for value, want in (("0", "plain"), ("1", "folded")):
        monkeypatch.setattr(fold_mod, "_contract_reason", [])
        monkeypatch.setenv(fold_mod.UNTESTED_TORCH_ENV, value)
        net, opt = _one_backward()
        assert fold_mod.fold_path(opt) == want, value


def test_a_wrong_coefficient_is_caught(monkeypatch):
    """The comparison can fail: a coefficient 1e-4 off on the folded path is seen."""
    real = fold_mod.norm_math.clip_coefficient
    monkeypatch.setattr(fold_mod.norm_math, "clip_coefficient", lambda t, m: real(t, m) * (1 - 1e-4))
    with pytest.raises(AssertionError):
        pair = dict(opt_name="AdamW-fused", scaler_on=True, steps=6)
        check_pair(train_pair(**pair, fold=True), "planted", **pair)  # beyond torch's own noise too
    monkeypatch.setattr(fold_mod, "_inv_scale", lambda sc, dev: sc._scale.double().reciprocal().float() * 2)
    monkeypatch.setattr(fold_mod.norm_math, "clip_coefficient", real)
    with pytest.raises(AssertionError):
        pair = dict(opt_name="SGD-foreach", scaler_on=True, steps=6)
        check_pair(train_pair(**pair, fold="auto"), "planted inverse scale", **pair)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_folded_path_has_no_host_sync():
    torch.manual_seed(0)
    net = make_net().cuda()
    opt = torch.optim.AdamW(net.parameters(), fused=True)
    sc = torch.amp.GradScaler("cuda")
    x, y = (t.cuda() for t in batches(1, 0)[0])
    sc.scale(nn.functional.cross_entropy(net(x), y)).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        segclip.clip_optimizer_(opt, 0.05, scaler=sc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert hasattr(opt, "grad_scale")


def test_one_pass_rounds_like_unscale_then_clip():
    """Power-of-two scale: grad * (coef * inv_scale) is torch's (grad * inv_scale) * coef, bit for bit
    (coef taken from the returned norm, so that only the rounding of the write is compared)."""
    sc = make_scaler(2.0 ** 13)
    net, opt = _one_backward("SGD-foreach", sc, seed=7)
    scaled = _grads(net)
    total = segclip.clip_optimizer_(opt, 0.01, scaler=sc)
    coef = torch.clamp(0.01 / (total + 1e-6), max=1.0)
    assert float(coef) < 1
    for g, p in zip(scaled, net.parameters()):
        assert torch.equal(p.grad, (g * 2.0 ** -13) * coef)


@pytest.mark.parametrize("opt_name,scaler_on,path", [("AdamW-fused", False, "folded"), ("AdamW-fused", True, "folded"),
                                                     ("SGD-foreach", True, "one-pass"), ("SGD-foreach", False, "plain")])
def test_trainer_clip_fused_uses_clip_optimizer_and_records_the_path(opt_name, scaler_on, path):
    """segclip train --clip fused: the trainer's step with clip_optimizer_ equals --clip torch
    (unscale_ + clip_grad_norm_), and the step records and the epoch summary name the path."""
    from segclip.train.engine import StepConfig, TrainState, train_one_epoch
    from segclip.train.optim import build_scheduler

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return {"out": self.head(torch.relu(self.body(x)))}

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 8, 8, generator=g) * 10, torch.randint(0, 3, (2, 8, 8), generator=g)) for _ in range(4)]
    out = {}
    for clip in ("fused", "torch"):
        torch.manual_seed(0)
        model = Seg()
        opt = OPTIMIZERS[opt_name](model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaler_on)
        cfg = StepConfig(device=torch.device("cpu"), clip=clip, max_norm=0.5)
        records = []
        summary = train_one_epoch(model, data, opt, build_scheduler(opt, 4, 0), scaler, cfg, 0, TrainState(),
                                  on_step=records.append)
        out[clip] = (model, records, summary)
    (m_f, r_f, s_f), (m_t, r_t, s_t) = out["fused"], out["torch"]
    assert [r["clip_path"] for r in r_f] == [path] * 4 and s_f.to_dict()["clip_path"] == path
    assert r_t[0]["clip_path"] == "torch"
    assert all(r["clipped"] for r in r_f)
    for a, b in zip(r_f, r_t):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for a, b in zip(m_f.parameters(), m_t.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_step_bench_suite_times_what_it_says():
    """segclip bench --suite step: every callable runs, leaves the scaler ready for the next one,
    and the clipping variants compute the same update as torch's recipe."""
    from segclip.bench.suites import get
    from segclip.bench.suites.step import step_fns

    suite = get("step")
    impls = ("torch", "fused_clip", "unfolded", "folded", "step", "bound", "scaled_bound")
    assert set(suite.impls("cpu")) == set(impls)
    for amp in (False, True):
        results = {}
        for impl in impls:
            torch.manual_seed(0)
            params = [nn.Parameter(torch.randn(s)) for s in ((5, 3), (7,), (2, 2, 3))]
            for p in params:
                p.grad = torch.randn_like(p) * (2.0 ** 16 if amp else 1.0)
            opt = torch.optim.AdamW(params, lr=0.1, fused=True)
            scaler = make_scaler(2.0 ** 16) if amp else None
            if scaler is not None:
                scaler.scale(torch.ones(()))
            fns = step_fns(params, opt, scaler, max_norm=0.5)
            fns[impl]()
            fns[impl]()  # twice: each call is a whole iteration
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf"), impl
            results[impl] = [p.detach().clone() for p in params] + [p.grad.clone() for p in params]
        for impl in ("fused_clip", "unfolded", "folded"):
            for a, b in zip(results["torch"], results[impl]):
                torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=lambda m: f"{impl} amp={amp}: {m}")
        # the floors step as the step alone does (the grad_scale of 1 changes nothing), and leave no attribute
        for impl in ("bound", "scaled_bound"):
            assert all(torch.equal(a, b) for a, b in zip(results["step"], results[impl])), impl
        # Adam's update hardly depends on the gradients' scale: the clipped gradients themselves show it
        assert any(not torch.allclose(a, b) for a, b in zip(results["torch"][3:], results["step"][3:]))
