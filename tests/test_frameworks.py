"""segclip.patch_torch() inside the real Lightning, accelerate and timm, on the CPU.

For each: segclip is really called (counted at segclip.clip.fused_clip_, the real function running
inside the spy), the parameters after a few seeded steps match the unpatched run within fp32
tolerance while clipping is active on every step, and the framework's own norm reporting works.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import warnings

import pytest
import torch

import segclip
from conftest import ROOT, assert_norm_close, oracle_norm
from segclip import clip, patch



def _framework(name: str):
    """CI installs the frameworks (Makefile DEPS): there a missing one fails. Elsewhere (a GPU image
    that installs nothing, see benchmarks/gpu_check.sh) the tests skip."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


L = _framework("lightning")
accelerate = _framework("accelerate")
timm_utils = _framework("timm.utils")

STEPS = 4
CLIP = 0.05  # far below the gradients' norm (about 1): clipping is active on every step
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32: the coefficients differ in their last bits at most


@pytest.fixture
def spy(monkeypatch):
    """Every call of segclip.fused_clip_ (through the patch or directly): the norm it returned."""
    norms = []
    real = clip.fused_clip_

    def counting(*args, **kwargs):
        total = real(*args, **kwargs)
        norms.append(float(total))
        return total

    monkeypatch.setattr(clip, "fused_clip_", counting)  # what patch_torch() installs
    monkeypatch.setattr(segclip, "fused_clip_", counting)  # what the hooks call
    return norms


def _data(seed=0, n=32, batch=8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=lambda m, n=name: f"{n}: {m}", **(tol or PARAM_TOL))


# ------------------------------------------------------------------------------------------ Lightning
class LitMLP(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.logged_totals = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        # Lightning's own gradient-norm logging (lightning.pytorch.utilities.grad_norm), before clipping.
        norms = L.pytorch.utilities.grad_norm(self, norm_type=2)
        self.logged_totals.append(float(norms["grad_2.0_norm_total"]))
        self.log_dict(norms)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(module, precision, tmp_path, **trainer_args):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*map(torch.cat, zip(*_data()))),
                                         batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=STEPS,
                        default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_trainer_gradient_clip_val_runs_segclip(precision, spy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever Lightning might write lands in tmp_path
    clip_args = dict(gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
    theirs = LitMLP()
    _fit(theirs, precision, tmp_path / "torch", **clip_args)
    assert spy == []  # unpatched: torch's function
    ours = LitMLP()
    with segclip.patch_torch() as handle:
        trainer = _fit(ours, precision, tmp_path / "segclip", **clip_args)
    assert len(spy) == STEPS and handle.calls["clip_grad_norm_"] == STEPS
    assert min(ours.logged_totals) > 10 * CLIP  # clipping was active on every step
    # Lightning's logging sees the same pre-clip norm that segclip computed and clipped with.
    for logged, total in zip(ours.logged_totals, spy):
        assert_norm_close(logged, total, 1e-5)
    assert float(trainer.callback_metrics["grad_2.0_norm_total"]) == pytest.approx(spy[-1], rel=1e-5)
    _assert_same_params(ours, theirs)
    assert not any(tmp_path.iterdir())  # no logs, no checkpoints


# ------------------------------------------------------------------------------------------ accelerate
@pytest.fixture
def fresh_accelerate():
    """accelerate keeps its state in process-wide singletons: reset them around each test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerate_run(mixed_precision, patched, max_norm=CLIP):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    norms, oracle = [], []
    for x, y in _data():
        optimizer.zero_grad()
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        oracle.append(oracle_norm([p.grad for p in model.parameters()], 2.0))
        norms.append(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        optimizer.step()
    return model, norms, oracle


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_clip_grad_norm_runs_segclip(mixed_precision, spy, fresh_accelerate):
    theirs, _, _ = _accelerate_run(mixed_precision, patched=False)
    with segclip.patch_torch() as handle:
        ours, norms, oracle = _accelerate_run(mixed_precision, patched=True)
    assert len(spy) == len(_data()) and handle.calls["clip_grad_norm_"] == len(_data())
    assert min(oracle) > 10 * CLIP
    for returned, total, ref in zip(norms, spy, oracle):  # the norm accelerate returns for logging
        assert float(returned) == total
        assert_norm_close(returned, ref, 1e-6)
    _assert_same_params(ours, theirs)
    # The comparison can fail: a run clipped to a slightly different norm is caught.
    with segclip.patch_torch():
        other, _, _ = _accelerate_run(mixed_precision, patched=True, max_norm=CLIP * 1.01)
    with pytest.raises(AssertionError):
        _assert_same_params(other, theirs)


class _RecordingTracker(accelerate.tracking.GeneralTracker):
    name, requires_logging_directory, main_process_only = "recording", False, False

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


def test_accelerate_log_reports_the_norm_segclip_returned(spy, fresh_accelerate):
    tracker = _RecordingTracker()
    accelerator = accelerate.Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("segclip-test")
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    with segclip.patch_torch():
        for step, (x, y) in enumerate(_data()):
            optimizer.zero_grad()
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
            accelerator.log({"grad_norm": norm.item()}, step=step)
            optimizer.step()
    accelerator.end_training()
    assert [(s, v["grad_norm"]) for s, v in tracker.logged] == list(enumerate(spy))


# ------------------------------------------------------------------------------------------ timm
def _timm_run(use_scaler, max_norm=CLIP):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = timm_utils.NativeScaler(device="cpu") if use_scaler else None
    for x, y in _data():
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_scaler):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=max_norm, clip_mode="norm", parameters=model.parameters())
        else:
            loss.backward()
            timm_utils.dispatch_clip_grad(model.parameters(), max_norm, mode="norm")
            optimizer.step()
    return model


@pytest.mark.parametrize("use_scaler", [False, True], ids=["dispatch_clip_grad", "NativeScaler-bf16"])
def test_timm_clipping_runs_segclip(use_scaler, spy):
    theirs = _timm_run(use_scaler)
    assert spy == []
    with segclip.patch_torch() as handle:
        ours = _timm_run(use_scaler)
    # timm reports no norm of its own (dispatch_clip_grad and NativeScaler discard it): segclip's
    # returned norms show that clipping was active on every step.
    assert len(spy) == len(_data()) and handle.calls["clip_grad_norm_"] == len(_data())
    assert min(spy) > 10 * CLIP
    _assert_same_params(ours, theirs)
    with segclip.patch_torch():
        other = _timm_run(use_scaler, max_norm=CLIP * 1.01)
    with pytest.raises(AssertionError):
        _assert_same_params(other, theirs)


def test_unpatched_runs_do_not_match_an_unclipped_run():
    """The tolerance is far tighter than what clipping changes: without clipping the parameters differ."""
    clipped = _timm_run(False)
    unclipped = _timm_run(False, max_norm=1e9)
    with pytest.raises(AssertionError):
        _assert_same_params(clipped, copy.deepcopy(unclipped))


# ------------------------------------------------------------------------------------------ docs
DOC = ROOT / "docs" / "integrations.md"
SNIPPET_NAMES = ("lightning-patch", "lightning-hook", "accelerate-patch", "accelerate-subclass", "timm-patch")


def _snippets() -> dict[str, str]:
    """The code blocks of docs/integrations.md that follow a ``<!-- snippet: NAME -->`` line."""
    found = re.findall(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return dict(found)


def test_every_snippet_in_the_docs_is_tested():
    assert tuple(_snippets()) == SNIPPET_NAMES


@pytest.mark.parametrize("name", SNIPPET_NAMES)
def test_docs_snippet_runs_segclip(name, spy, tmp_path, monkeypatch, fresh_accelerate, capsys):
    monkeypatch.chdir(tmp_path)  # Lightning's logs and checkpoints land in tmp_path
    model = _mlp()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*map(torch.cat, zip(*_data()))),
                                         batch_size=8, num_workers=0)
    namespace = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.5), "loader": _data(),
                 "loss_fn": torch.nn.functional.mse_loss, "LitModel": LitMLP, "train_loader": loader}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
            exec(compile(_snippets()[name], f"{DOC}:{name}", "exec"), namespace)
    finally:
        left = list(patch._stack)
        for handle in left:
            handle.undo()
    steps = len(_data())
    assert len(spy) == steps, f"{name}: segclip ran {len(spy)} times for {steps} optimizer steps"
    if name == "lightning-patch":
        assert namespace["patch"].calls == {"clip_grad_norm_": steps}
        assert "Counter({'clip_grad_norm_': 4})" in capsys.readouterr().out  # what the snippet says it prints
    elif name == "lightning-hook":
        assert float(namespace["trainer"].callback_metrics["grad_norm"]) == spy[-1]
    elif name.startswith("accelerate"):
        assert float(namespace["grad_norm"]) == spy[-1]
        assert left == ([namespace["patch"]] if name == "accelerate-patch" else [])
