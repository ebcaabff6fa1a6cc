"""The trainer's --clip-mode: each mode clips as the library function does, and AutoClip's history
rides in the checkpoint so that a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

import segclip
from _train_util import TINY
from segclip.train import checkpoint as ck
from segclip.train.engine import StepConfig, clip_gradients


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen)), torch.nn.Parameter(torch.randn(8, generator=gen))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3
    return params


@pytest.mark.parametrize("mode, clip, expected", [
    ("value", "fused", lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5)),
    ("value", "torch", lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5)),
    ("agc", "fused", lambda ps: segclip.adaptive_clip_(ps, 0.02, backend="torch")),
])
def test_clip_gradients_in_each_mode_is_the_library_call(mode, clip, expected):
    ours, theirs = _params(1), _params(1)
    norm_before = segclip.total_norm([p.grad for p in ours])
    cfg = StepConfig(device=torch.device("cpu"), clip=clip, clip_mode=mode, clip_value=0.5, clip_factor=0.02)
    norm, group_norms = clip_gradients(ours, cfg)
    assert group_norms is None  # no groups asked for
    expected(theirs)
    assert torch.equal(norm, norm_before)  # the norm before clipping, for the log
    if mode in ("value", "agc"):  # with groups: each group's norm of the same, unclipped gradients
        again = _params(1)
        norm, group_norms = clip_gradients(again, cfg, {"a": again[:1], "b": again[1:]})
        torch.testing.assert_close(norm, norm_before, rtol=1e-6, atol=0)
        for k, ps in enumerate((_params(1)[:1], _params(1)[1:])):
            want = torch.cat([p.grad.double().flatten() for p in ps]).norm()
            torch.testing.assert_close(group_norms[k].double(), want, rtol=2e-6, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=0)
    assert not all(torch.equal(p.grad, q.grad) for p, q in zip(ours, _params(1)))  # something was clipped


def test_clipper_modes_use_the_stateful_clipper():
    for clipper in (segclip.AutoClip(30.0), segclip.ZClip(warmup_steps=2)):
        cfg = StepConfig(device=torch.device("cpu"), clip_mode="auto", clipper=clipper)
        for seed in range(4):
            clip_gradients(_params(seed), cfg)
        assert clipper.state_dict()["seen" if isinstance(clipper, segclip.AutoClip) else "steps"] == 4


def test_autoclip_state_resumes_exactly(tmp_path, capsys, monkeypatch):
    """A run interrupted in its second epoch and resumed from last.pt (epoch 0) ends with the weights
    and the norm history of an uninterrupted run: the bound of every step after the resume is the
    percentile of the same history."""
    from segclip.cli import main
    from segclip.train import trainer

    common = [*TINY, "--no-plot", "--cache-dir", str(tmp_path / "cache"), "--clip-mode", "auto",
              "--clip-percentile", "40", "--epochs", "2"]
    threads = torch.get_num_threads()
    step = trainer.RunLog.step

    class Stop(Exception):
        pass

    def interrupt_at_step_6(self, record):
        step(self, record)
        if record["step"] == 6:
            raise Stop  # the run dies in its second epoch; last.pt holds epoch 0

    try:  # in this process (TINY sets --threads 1)
        assert main(["train", *common, "--out", str(tmp_path / "whole")]) == 0
        monkeypatch.setattr(trainer.RunLog, "step", interrupt_at_step_6)
        with pytest.raises(Stop):
            main(["train", *common, "--out", str(tmp_path / "split")])
        monkeypatch.undo()
        assert ck.load(tmp_path / "split" / "last.pt")["epoch"] == 0
        assert main(["train", "--resume", str(tmp_path / "split" / "last.pt")]) == 0
    finally:
        torch.set_num_threads(threads)
    whole, split = ck.load(tmp_path / "whole" / "last.pt"), ck.load(tmp_path / "split" / "last.pt")
    a, b = whole["train_state"]["clipper"], split["train_state"]["clipper"]
    assert a["seen"] == b["seen"] == 8
    assert torch.isfinite(a["norms"][:8]).all() and torch.equal(a["norms"][:8], b["norms"][:8])
    for k, v in whole["model"].items():
        assert torch.equal(v, split["model"][k]), k
    assert "mode=auto" in capsys.readouterr().out
