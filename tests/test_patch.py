"""segclip.patch_torch(): what it replaces, its undo handle, nesting, threads, and the stale-import warning."""

from __future__ import annotations

import sys
import threading
import types
import warnings

import pytest
import torch
import torch.nn.utils.clip_grad as torch_clip_grad

import segclip
from conftest import CPU_BACKENDS, assert_clipped_close, assert_norm_close, make_params, oracle_coef, oracle_norm
from segclip import clip, patch

NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_")
ORIGINAL = {(m.__name__, n): getattr(m, n) for m in (torch.nn.utils, torch_clip_grad) for n in NAMES if hasattr(m, n)}
HAS_VALUE = patch._replacement("clip_grad_value_", missing_ok=True) is not None
NORM_NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_")


def _current():
    return {key: getattr(sys.modules[key[0]], key[1]) for key in ORIGINAL}


@pytest.fixture
def spies(monkeypatch):
    """Counts calls into segclip.clip's functions (the real ones run) while a test patches torch."""
    counts = {"fused_clip_": 0, "total_norm": 0, "clip_with_norm_": 0}
    backends = []
    for name in counts:
        real = getattr(clip, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            backends.append(kwargs.get("backend", "auto"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(clip, name, spy)
    counts["backends"] = backends
    return counts


def test_replaces_the_functions_in_both_modules_and_undo_restores_the_same_objects(spies):
    handle = segclip.patch_torch()
    try:
        assert handle.active and set(NORM_NAMES) <= set(handle.functions)
        for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"):
            fn = getattr(torch.nn.utils, name)
            assert fn is not ORIGINAL[("torch.nn.utils", name)] and fn.__segclip_patch__ == name
        assert torch_clip_grad.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
        # torch's private helpers stay torch's (only its own clip_grad_norm_ calls them)
        assert torch_clip_grad._get_total_norm is ORIGINAL[("torch.nn.utils", "get_total_norm")]

        params, originals = make_params([(300,), (7, 9)], scale=2.0)
        total = torch.nn.utils.clip_grad_norm_(params, 0.5)
        assert_norm_close(total, oracle_norm(originals, 2.0), 1e-6)
        for p, g in zip(params, originals):
            assert_clipped_close(p.grad, g, oracle_coef(total.item(), 0.5), 1e-6)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 1.0)
        assert_norm_close(norm, oracle_norm([p.grad for p in params], 1.0), 1e-6)
        torch_clip_grad.clip_grad_norm_(params, 0.1)
        torch.nn.utils.clip_grads_with_norm_(params, 0.1, torch.tensor(1.0))
        with pytest.warns(FutureWarning):  # the deprecated alias calls the module's clip_grad_norm_
            torch.nn.utils.clip_grad_norm(params, 0.1)
        assert (spies["fused_clip_"], spies["total_norm"], spies["clip_with_norm_"]) == (3, 1, 1)
        assert handle.calls == {"clip_grad_norm_": 3, "get_total_norm": 1, "clip_grads_with_norm_": 1}
    finally:
        handle.undo()
    assert not handle.active
    assert all(_current()[k] is v for k, v in ORIGINAL.items())
    handle.undo()  # idempotent
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    assert spies["fused_clip_"] == 3  # torch's own function again


def test_context_manager_undoes_even_on_an_exception():
    with pytest.raises(KeyError):
        with segclip.patch_torch() as handle:
            assert torch.nn.utils.clip_grad_norm_.__segclip_patch__
            raise KeyError("boom")
    assert not handle.active and all(_current()[k] is v for k, v in ORIGINAL.items())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_option_reaches_segclip(spies, backend):
    params, originals = make_params([(64,)])
    with segclip.patch_torch(backend=backend) as handle:
        assert handle.backend == backend
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        torch.nn.utils.get_total_norm([params[0].grad])
        torch.nn.utils.clip_grads_with_norm_(params, 0.1, torch.tensor(2.0))
        torch.nn.utils.clip_grad_norm_(params, 0.1, backend="torch")  # an explicit backend wins
    assert spies["backends"] == [backend] * 3 + ["torch"]
    with segclip.patch_torch():  # auto: segclip's own default, no backend argument passed
        torch.nn.utils.clip_grad_norm_(params, 0.1)
    assert spies["backends"][-1] == "auto"


def test_bad_options_raise_value_error_before_patching():
    with pytest.raises(ValueError, match="backend must be one of"):
        segclip.patch_torch(backend="gpu")
    with pytest.raises(ValueError, match=r"functions: 'clip_grad_norm' is not one of"):
        segclip.patch_torch(functions=["clip_grad_norm"])
    assert all(_current()[k] is v for k, v in ORIGINAL.items())


def test_functions_subset_and_a_single_name(spies):
    with segclip.patch_torch(functions="clip_grad_norm_") as handle:
        assert handle.functions == ("clip_grad_norm_",)
        assert torch.nn.utils.get_total_norm is ORIGINAL[("torch.nn.utils", "get_total_norm")]
        params, _ = make_params([(10,)])
        torch.nn.utils.get_total_norm([params[0].grad])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert (spies["fused_clip_"], spies["total_norm"]) == (1, 0)


def test_patching_twice_never_wraps_segclip_in_segclip_and_undo_order_does_not_matter(spies):
    for order in ("lifo", "fifo"):
        first = segclip.patch_torch(backend="torch")
        second = segclip.patch_torch()
        fn = torch.nn.utils.clip_grad_norm_
        assert fn.__wrapped__ is clip.fused_clip_  # one layer: the wrapper around segclip's function
        params, _ = make_params([(10,)])
        before = spies["fused_clip_"]
        fn(params, 1.0)
        assert spies["fused_clip_"] == before + 1 and spies["backends"][-1] == "auto"  # the newest options
        assert second.calls["clip_grad_norm_"] == 1 and first.calls["clip_grad_norm_"] == 0
        (second if order == "lifo" else first).undo()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the remaining patch is in force
        assert spies["backends"][-1] == ("torch" if order == "lifo" else "auto")
        (first if order == "lifo" else second).undo()
        assert all(_current()[k] is v for k, v in ORIGINAL.items()), order


def test_a_narrower_patch_on_top_puts_the_other_names_back_until_it_is_undone():
    with segclip.patch_torch():
        with segclip.patch_torch(functions=["clip_grad_norm_"]):
            assert torch.nn.utils.get_total_norm is ORIGINAL[("torch.nn.utils", "get_total_norm")]
            assert torch.nn.utils.clip_grad_norm_.__segclip_patch__
        assert torch.nn.utils.get_total_norm.__segclip_patch__ == "get_total_norm"
    assert all(_current()[k] is v for k, v in ORIGINAL.items())


def test_undo_leaves_a_later_foreign_patch_in_place_with_a_warning():
    def theirs(*args, **kwargs):
        return torch.tensor(0.0)

    handle = segclip.patch_torch()
    torch.nn.utils.clip_grad_norm_ = theirs
    try:
        with pytest.warns(UserWarning, match=r"torch.nn.utils.clip_grad_norm_ was replaced by something else"):
            handle.undo()
        assert torch.nn.utils.clip_grad_norm_ is theirs  # their patch survives
        assert torch_clip_grad.clip_grad_norm_ is ORIGINAL[("torch.nn.utils.clip_grad", "clip_grad_norm_")]
    finally:
        torch.nn.utils.clip_grad_norm_ = ORIGINAL[("torch.nn.utils", "clip_grad_norm_")]


def test_threads_patching_and_clipping_at_once_leave_torch_as_it_was():
    params, _ = make_params([(100,)])
    errors = []
    start = threading.Barrier(6)

    def patcher():
        try:
            start.wait()
            for _ in range(200):
                with segclip.patch_torch(warn_stale=False):
                    pass
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def clipper():
        try:
            start.wait()
            for _ in range(200):
                torch.nn.utils.clip_grad_norm_(params, 1e9)  # torch's or segclip's: both must work
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=patcher) for _ in range(4)] + [threading.Thread(target=clipper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not patch._stack and all(_current()[k] is v for k, v in ORIGINAL.items())


def test_warns_about_modules_that_imported_torchs_function_before_the_patch(monkeypatch):
    user = types.ModuleType("user_training_code")
    user.clip = ORIGINAL[("torch.nn.utils", "clip_grad_norm_")]  # from torch.nn.utils import clip_grad_norm_ as clip
    user.get_total_norm = ORIGINAL[("torch.nn.utils", "get_total_norm")]
    # Clean: nothing already imported (torch, pytest, the frameworks) holds one.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segclip.patch_torch().undo()
    monkeypatch.setitem(sys.modules, "user_training_code", user)
    with pytest.warns(UserWarning, match=r"user_training_code\.clip \(torch's clip_grad_norm_\); "
                                         r"user_training_code\.get_total_norm \(torch's get_total_norm\)"):
        handle = segclip.patch_torch()
    handle.undo()
    with pytest.warns(UserWarning, match="user_training_code.clip") as record:  # only what is replaced
        segclip.patch_torch(functions=["clip_grad_norm_"]).undo()
    assert "get_total_norm" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        segclip.patch_torch(warn_stale=False).undo()
    assert user.clip is ORIGINAL[("torch.nn.utils", "clip_grad_norm_")]  # the limit: it keeps torch's


def test_clip_grad_value_is_replaced_when_segclip_has_one(monkeypatch):
    calls = []

    def clip_grad_value_(parameters, clip_value, foreach=None, *, backend="auto"):
        calls.append((clip_value, backend))

    # A stand-in module shows the wiring where segclip.value does not exist yet.
    monkeypatch.setitem(sys.modules, "segclip.value", types.SimpleNamespace(clip_grad_value_=clip_grad_value_))
    with segclip.patch_torch(backend="torch") as handle:
        assert "clip_grad_value_" in handle.functions
        torch.nn.utils.clip_grad_value_([], 0.5)
        torch_clip_grad.clip_grad_value_([], 0.25)
    assert calls == [(0.5, "torch"), (0.25, "torch")]
    monkeypatch.setitem(sys.modules, "segclip.value", types.SimpleNamespace())
    with segclip.patch_torch() as handle:
        assert "clip_grad_value_" not in handle.functions
        assert torch.nn.utils.clip_grad_value_ is ORIGINAL[("torch.nn.utils", "clip_grad_value_")]
    with pytest.raises(ValueError, match="segclip has no clip_grad_value_"):
        segclip.patch_torch(functions=["clip_grad_value_"])


@pytest.mark.skipif(not HAS_VALUE, reason="segclip.clip_grad_value_ is not in this checkout yet")
def test_real_clip_grad_value_through_the_patch():
    params, originals = make_params([(500,), (3, 4)], scale=3.0)
    with segclip.patch_torch() as handle:
        torch.nn.utils.clip_grad_value_(params, 1.5)
    assert handle.calls["clip_grad_value_"] == 1
    for p, g in zip(params, originals):
        assert torch.equal(p.grad, g.clamp(-1.5, 1.5))


def test_patch_is_reexported_and_repr_says_its_state():
    assert segclip.patch_torch is patch.patch_torch and segclip.TorchPatch is patch.TorchPatch
    handle = segclip.patch_torch(functions=["clip_grad_norm_"])
    assert repr(handle) == "<segclip.TorchPatch active backend='auto' functions=['clip_grad_norm_']>"
    handle.undo()
    assert "undone" in repr(handle)
