"""segclip.clip_optimizer_(..., groups=...): each group's norm beside the total, from the same pass,
on every path (folded, one-pass, plain), against float64 references of the unscaled gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import segclip
from segclip import fold as fold_mod

from test_fold import batches, make_net, make_scaler, one_thread, finish_step  # noqa: F401 (fixture)

# (optimizer, scaler?, fold) -> the path clip_optimizer_ takes
PATHS = [
    ("AdamW-fused", False, "auto", "folded"),
    ("AdamW-fused", True, "auto", "folded"),
    ("SGD-foreach", True, "auto", "one-pass"),
    ("SGD-foreach", False, "auto", "plain"),
    ("AdamW-fused", True, False, "one-pass"),
]
OPTS = {
    "AdamW-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "SGD-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
}


def named(net):
    """Three groups of make_net's parameters: the first conv, the BatchNorms, the last linear."""
    convs, bns, head = [], [], []
    for name, p in net.named_parameters():
        (convs if name == "0.weight" else head if name.startswith("8.") else bns).append(p)
    return {"conv": convs, "bn": bns, "head": head}


def reference(groups: dict, scale: float, norm_type: float) -> dict:
    """Each group's norm (and the total) of the unscaled gradients in float64."""
    out, everything = {}, []
    for name, ps in groups.items():
        gs = [p.grad.detach().double().flatten() / scale for p in ps if p.grad is not None]
        flat = torch.cat(gs) if gs else torch.zeros(0, dtype=torch.float64)
        out[name] = torch.linalg.vector_norm(flat, norm_type).item()
        everything.append(flat)
    out["total"] = torch.linalg.vector_norm(torch.cat(everything), norm_type).item()
    return out


@pytest.mark.parametrize("opt_name,scaler_on,fold,path", PATHS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_group_norms_on_every_path_and_the_same_steps(opt_name, scaler_on, fold, path, norm_type):
    torch.manual_seed(3)
    net_a = make_net()
    net_b = copy.deepcopy(net_a)
    opt_a, opt_b = OPTS[opt_name](net_a.parameters()), OPTS[opt_name](net_b.parameters())
    sc_a, sc_b = (make_scaler(), make_scaler()) if scaler_on else (None, None)
    for step, (x, y) in enumerate(batches(6, 7)):
        max_norm = (0.05, 1e3)[step % 2]
        for net, opt, sc in ((net_a, opt_a, sc_a), (net_b, opt_b, sc_b)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            (sc.scale(loss) if sc is not None else loss).backward()
        if step == 4:  # an inf in the head's gradient: that group's norm and the total are inf
            for net in (net_a, net_b):
                net[8].weight.grad.view(-1)[0] = math.inf
        assert fold_mod.fold_path(opt_b, scaler=sc_b, fold=fold, norm_type=norm_type) == path
        groups = named(net_b)
        want = reference(groups, sc_b.get_scale() if sc_b is not None else 1.0, norm_type)
        total_a = segclip.clip_optimizer_(opt_a, max_norm, scaler=sc_a, fold=fold, norm_type=norm_type)
        got = segclip.clip_optimizer_(opt_b, max_norm, scaler=sc_b, fold=fold, norm_type=norm_type, groups=groups)
        assert isinstance(got, segclip.GroupNorms) and got.names == ("conv", "bn", "head")
        # the total is the value the call without groups returns, bit for bit (CPU), so the steps agree
        assert torch.equal(got.total, total_a), (step, got.total, total_a)
        assert got.norms.dtype == total_a.dtype and got.norms.shape == (3,)
        for name in ("conv", "bn", "head"):
            if math.isinf(want[name]):
                assert math.isinf(got[name].item()), (step, name)
            else:
                assert got[name].item() == pytest.approx(want[name], rel=2e-6, abs=1e-30), (step, name)
        if not math.isinf(want["total"]):
            assert got.total.item() == pytest.approx(want["total"], rel=2e-6), step
        for opt, sc in ((opt_a, sc_a), (opt_b, sc_b)):
            finish_step(opt, sc)
        if not scaler_on and step == 4:
            break  # without a scaler the inf made both nets NaN (as torch's recipe does): nothing more to see
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), name


def test_groups_differ_so_a_swap_would_be_caught():
    torch.manual_seed(0)
    net = make_net()
    x, y = batches(1, 1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    want = reference(named(net), 1.0, 2.0)
    values = [want["conv"], want["bn"], want["head"]]
    assert min(abs(a - b) / max(a, b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-3


def test_param_groups_and_parameters_in_no_group():
    torch.manual_seed(1)
    net = make_net()
    head = list(net[8].parameters())
    body = [p for p in net.parameters() if all(p is not h for h in head)]
    opt = torch.optim.AdamW([{"params": body, "name": "body"}, {"params": head}], lr=1e-3, fused=True)
    x, y = batches(1, 2)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    want = reference({"body": body, "1": head}, 1.0, 2.0)
    got = segclip.clip_optimizer_(opt, 1e3, groups=opt.param_groups)
    assert got.names == ("body", "1")  # a param group's "name", else its position
    assert got.to_dict() == pytest.approx({**{k: want[k] for k in ("body", "1")}, "total": want["total"]}, rel=2e-6)
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    want = reference({"head": head, "rest": body}, 1.0, 2.0)
    got = segclip.clip_optimizer_(opt, 1e3, groups={"head": head})  # the body is in no group
    assert got.names == ("head",)
    assert got["head"].item() == pytest.approx(want["head"], rel=2e-6)
    assert got.total.item() == pytest.approx(want["total"], rel=2e-6)  # the body still counts


def test_plain_path_with_a_group_named_like_the_hidden_one():
    torch.manual_seed(2)
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = batches(1, 3)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    head = list(net[8].parameters())
    want = reference({"_rest0": head, "x": [p for p in net.parameters() if all(p is not h for h in head)]}, 1.0, 2.0)
    got = segclip.clip_optimizer_(opt, 1e3, groups={"_rest0": head})
    assert got.names == ("_rest0",)
    assert got["_rest0"].item() == pytest.approx(want["_rest0"], rel=2e-6)
    assert got.total.item() == pytest.approx(want["total"], rel=2e-6)


def test_bad_groups_are_refused_before_anything_changes():
    torch.manual_seed(4)
    net, other = make_net(), make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    x, y = batches(1, 4)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    before = [p.grad.clone() for p in net.parameters()]
    first = next(net.parameters())
    cases = [
        ({"a": [first], "b": [first]}, ValueError, "two groups, 'a' and 'b'"),
        ({"a": list(other.parameters())}, ValueError, "not in the optimizer"),
        (3, TypeError, "groups must be"),
        ({1: [first]}, TypeError, "group names must be strings"),
        ([[first], [first]], ValueError, "two groups"),
    ]
    for groups, exc, match in cases:
        with pytest.raises(exc, match=match):
            segclip.clip_optimizer_(opt, 0.0, groups=groups)
        assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before)), groups
        assert fold_mod._PENDING not in opt.__dict__
    opt.step()  # nothing folded: the step runs with the unclipped gradients


def test_no_gradients_with_groups():
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    got = segclip.clip_optimizer_(opt, 1.0, groups=named(net))
    assert got.to_dict() == {"conv": 0.0, "bn": 0.0, "head": 0.0, "total": 0.0}
