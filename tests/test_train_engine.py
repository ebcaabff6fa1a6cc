"""The training step: clip modes, unscaled gradients under a GradScaler, bf16 autocast on CPU,
non-finite steps skipped and counted, the LR schedule, the fused-optimizer fallback."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from _train_util import TINY, segclip
from segclip.train.engine import NonFiniteStop, StepConfig, TrainState, train_one_epoch
from segclip.train.optim import PolyWarmup, build_optimizer, build_scheduler


class TinySeg(torch.nn.Module):
    """A two-layer segmentation net with the torchvision output convention."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return {"out": self.head(torch.relu(self.body(x)))}


def _batches(n=3, nan_from=None):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.randn(2, 3, 8, 8, generator=g) * 10
        if nan_from is not None and i >= nan_from:
            x[0, 0, 0, 0] = float("nan")
        y = torch.randint(0, 3, (2, 8, 8), generator=g)
        y[:, 0] = 255
        out.append((x, y))
    return out


def _train(clip, batches, max_norm=0.5, scaler=None, amp=False, max_nonfinite=20, model=None, fused=None):
    torch.manual_seed(0)
    model = model or TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    sched = build_scheduler(opt, total_iters=len(batches), warmup_iters=0)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    cfg = StepConfig(device=torch.device("cpu"), clip=clip, max_norm=max_norm, amp=amp,
                     max_nonfinite=max_nonfinite)
    records, state = [], TrainState()
    summary = train_one_epoch(model, batches, opt, sched, scaler, cfg, 0, state, on_step=records.append)
    return model, records, summary, state


def _norm_of_first_step(batches):
    torch.manual_seed(0)
    model = TinySeg()
    x, y = batches[0]
    loss = torch.nn.functional.cross_entropy(model(x)["out"], y, ignore_index=255)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double().norm().item()


def test_fused_and_torch_clipping_agree_and_none_does_not_clip():
    batches = _batches()
    m_fused, r_fused, s_fused, _ = _train("fused", batches)
    m_torch, r_torch, _, _ = _train("torch", batches)
    m_none, r_none, _, _ = _train("none", batches)
    expected = _norm_of_first_step(batches)
    for r in (r_fused, r_torch, r_none):
        assert r[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert r_fused[0]["clipped"] and r_torch[0]["clipped"] and not r_none[0]["clipped"]
    for a, b in zip(m_fused.parameters(), m_torch.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(m_fused.parameters(), m_none.parameters()))
    assert s_fused.clipped == sum(r["clipped"] for r in r_fused)
    for key in ("t_data", "t_forward", "t_backward", "t_clip", "t_step", "lr", "epoch", "step", "loss"):
        assert key in r_fused[0]


def test_clipping_sees_unscaled_gradients():
    batches = _batches(1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    _, records, _, _ = _train("fused", batches, scaler=scaler)
    assert records[0]["grad_norm"] == pytest.approx(_norm_of_first_step(batches), rel=1e-5)


def test_bf16_autocast_on_cpu_trains():
    _, records, summary, _ = _train("fused", _batches(2), amp=True)
    assert summary.skipped == 0 and all(math.isfinite(r["loss"]) for r in records)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run():
    batches = _batches(6, nan_from=2)
    torch.manual_seed(0)
    model = TinySeg()
    with pytest.raises(NonFiniteStop, match="3 consecutive steps"):
        _train("fused", batches, max_nonfinite=3, model=model)
    before = copy.deepcopy(model.state_dict())
    # Skipped steps leave the weights alone: NaN batches do not poison the model.
    assert all(torch.isfinite(v).all() for v in before.values())
    _, records, summary, state = _train("fused", _batches(4, nan_from=2), max_nonfinite=5)
    assert [r["skipped"] for r in records] == [False, False, True, True]
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None
    assert summary.skipped == 2 and state.skipped_total == 2 and state.consecutive_nonfinite == 2


def test_poly_schedule_with_linear_warmup_by_hand():
    f = PolyWarmup(total=10, warmup=2, power=1.0, warmup_factor=0.1)
    # warmup: 0.1 -> 1 linearly over 2 steps; then 1 - (it - 2) / 8
    assert [f(i) for i in range(11)] == pytest.approx([0.1, 0.55, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                       0.25, 0.125, 0.0])
    g = PolyWarmup(total=4, warmup=0, power=0.9)
    assert g(2) == pytest.approx(0.5 ** 0.9)


def test_scheduler_steps_per_iteration_and_saves_plain_state():
    model = TinySeg()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, total_iters=10, warmup_iters=0, power=1.0)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7)
    state = sched.state_dict()
    assert state["last_epoch"] == 3 and state["lr_lambdas"][0]["total"] == 10


def test_fused_optimizer_and_its_fallback(monkeypatch):
    notes = []
    opt, impl = build_optimizer(TinySeg(), "sgd", 0.1, 0.9, 1e-4, torch.device("cpu"), log=notes.append)
    assert impl == "fused" and opt.defaults["fused"] and not notes
    # biases get no weight decay
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    monkeypatch.setattr("segclip.train.optim.fused_supported", lambda device: False)
    opt, impl = build_optimizer(TinySeg(), "adamw", 1e-3, 0.9, 1e-2, torch.device("cpu"), log=notes.append)
    assert impl == "foreach" and isinstance(opt, torch.optim.AdamW)
    assert notes and "no fused adamw kernel for cpu" in notes[0]


def test_a_diverging_run_stops_with_a_message_and_a_checkpoint(tmp_path, capsys):
    from segclip.cli import main

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:  # in-process (TINY sets --threads 1)
        assert main(["train", *TINY, "--epochs", "2", "--lr", "1e30", "--clip", "none", "--max-nonfinite", "2",
                     "--warmup-iters", "0", "--no-plot", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(out)]) == 3
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    # One message, epochs counted from 1 (step 1 is still finite), the right file named: no epoch
    # completed, so no last.pt.
    assert err.startswith("segclip train: error: 2 consecutive steps had a non-finite loss or gradient norm")
    assert "at epoch 1, step 3" in err and len(err.strip().splitlines()) == 1
    assert f"The weights at this point are in {out / 'nonfinite.pt'}" in err
    assert "no epoch was completed, so there is no last.pt to resume from" in err
    assert not (out / "last.pt").exists()
    ck = torch.load(out / "nonfinite.pt", weights_only=True)
    assert ck["train_state"]["consecutive_nonfinite"] == 2 and ck["stopped"]
    assert main(["train", "--resume", str(out / "nonfinite.pt")]) == 2
    assert "resume from last.pt" in capsys.readouterr().err


def test_foreground_pixels_are_counted():
    batches = _batches()
    _, _, summary, _ = _train("fused", batches)
    assert summary.foreground_pixels == sum(int(((y > 0) & (y != 255)).sum()) for _, y in batches)
    binary = [(x, torch.where(y > 0, 255, 0)) for x, y in batches]  # 0/255 masks: no class >= 1
    _, _, summary, _ = _train("fused", binary)
    assert summary.foreground_pixels == 0


def test_binary_0_255_masks_give_a_warning(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from _train_util import tiny_voc

    voc = tiny_voc(tmp_path / "cache", num_train=4, num_val=2)
    for p in (voc / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png"):
        with Image.open(p) as m:
            arr, palette = np.array(m), m.getpalette()
        binary = Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), "P")
        binary.putpalette(palette)
        binary.save(p)
    from segclip.cli import main

    threads = torch.get_num_threads()
    try:  # in this process (TINY sets --threads 1)
        assert main(["train", "--data", str(voc), *TINY, "--num-classes", "2", "--batch-size", "2", "--epochs", "1",
                     "--crop-size", "32", "--eval-size", "32", "--no-plot", "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "warning: epoch 1's training masks hold no pixel of any class 1..1" in out and "binary 0/255" in out


def test_compile_channels_last_and_amp_train_with_the_fused_clip(tmp_path, capsys, monkeypatch):
    # aot_eager: dynamo's graph capture and AOT autograd, as inductor gets them, without inductor's
    # C++ code generation (minutes on 2 cores); the trainer's wiring is what is tested here.
    from segclip.cli import main

    monkeypatch.setenv("SEGCLIP_COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *TINY, "--epochs", "1", "--compile", "--channels-last", "--amp", "--clip", "fused",
                     "--no-plot", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    text = capsys.readouterr().out
    assert "torch.compile: the first step took" in text
    import json
    epoch = json.loads((out / "epochs.jsonl").read_text().splitlines()[0])
    assert epoch["compile_seconds"] > 0 and epoch["images_per_second"] > 0
    ck = torch.load(out / "last.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])  # loads into a plain model
    assert ck["args"]["compile"] and ck["args"]["channels_last"]


def test_group_norms_are_logged_from_the_clip_pass():
    batches = _batches(1)
    torch.manual_seed(0)
    model = TinySeg()
    x, y = batches[0]
    torch.nn.functional.cross_entropy(model(x)["out"], y, ignore_index=255).backward()
    want = {name: torch.cat([p.grad.flatten() for p in getattr(model, name).parameters()]).double().norm().item()
            for name in ("body", "head")}
    assert want["body"] != pytest.approx(want["head"], rel=1e-3)  # a swapped pair would be caught
    for clip, fused, path in (("fused", True, "folded"), ("fused", None, "plain"), ("none", None, "none")):
        _, records, _, _ = _train(clip, batches, fused=fused)
        assert records[0]["clip_path"] == path
        assert list(records[0]["group_norms"]) == ["body", "head"]
        for name, value in want.items():
            assert records[0]["group_norms"][name] == pytest.approx(value, rel=1e-5), (clip, fused, name)
        assert records[0]["grad_norm"] == pytest.approx(math.hypot(*want.values()), rel=1e-5)
    _, records, _, _ = _train("torch", batches)
    assert "group_norms" not in records[0]  # torch's path would need an extra pass for them
