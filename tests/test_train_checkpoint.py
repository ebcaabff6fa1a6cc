"""Checkpoints: atomic writes (also under SIGKILL), weights_only loading, RNG states, and a training
run killed mid-epoch that, resumed, ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from _train_util import REPO, TINY, env, segclip, tiny_voc
from segclip.train import checkpoint as ck


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ck.atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ck.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temporary is gone


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    stale = tmp_path / f".last.pt{ck.TMP_MARK}999999"
    stale.write_bytes(b"torn")
    ck.atomic_save({"model": {}}, tmp_path / "last.pt")
    assert not stale.exists()


WRITER = """
import sys, torch
from segclip.train.checkpoint import atomic_save
i = 0
while True:
    i += 1
    atomic_save({"model": {"x": torch.full((1_000_000,), float(i))}, "i": i}, sys.argv[1])
    print(i, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    rng = random.Random(0)
    last = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, env=env(tmp_path),
                             stdout=subprocess.PIPE, text=True)
        first = int(p.stdout.readline())   # it is saving in a loop now
        time.sleep(rng.uniform(0.0, 0.3))  # then dies at an arbitrary point of a save
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        state = torch.load(path, weights_only=True)
        assert state["i"] >= first and torch.equal(state["model"]["x"], torch.full((1_000_000,), float(state["i"])))
        last = state["i"]
        visible = [q.name for q in tmp_path.iterdir() if not q.name.startswith(".")]
        assert visible == ["ck.pt"]
    assert last >= 1


def test_rng_state_round_trip_is_plain_and_exact(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    state = ck.rng_state()
    ck.atomic_save({"model": {}, "rng": [state]}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9); np.random.seed(9); torch.manual_seed(9)
    ck.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_rejects_what_is_not_a_checkpoint_in_one_clear_line(tmp_path, capsys):
    from segclip.cli import main

    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "notes.pt").write_text("these are my notes\n" * 20)
    (tmp_path / "empty.pt").write_bytes(b"")
    import argparse
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    torch.save({"w": torch.ones(2), "b": torch.zeros(1)}, tmp_path / "weights.pt")       # a bare state dict
    expected = {
        "junk.pt": "not a file written by torch.save",
        "notes.pt": "not a file written by torch.save",
        "empty.pt": "the file is empty (0 bytes)",
        "pickled.pt": "it holds Python objects other than tensors and plain values",
        "weights.pt": f"holds only model weights (a state dict), not a segclip checkpoint; to start a "
                      f"training run from them, use segclip train --weights {tmp_path / 'weights.pt'}",
    }
    for name, message in expected.items():
        with pytest.raises(ValueError) as e:
            ck.load(tmp_path / name)
        assert message in str(e.value) and "weights_only" not in str(e.value), str(e.value)
        # Through the CLI: one line, no traceback, no advice to load unsafely.
        assert main(["eval", "--checkpoint", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "weights_only" not in err
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ck.load(tmp_path / "none.pt")


def test_a_failed_checkpoint_write_is_one_line_that_says_the_previous_one_is_intact(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "last.pt"
    ck.atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    real_save = torch.save

    def torch_writer_fails(obj, f, *a, **k):  # what torch raises when the disk fills during a save
        f.write(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    for fail, reason in ((torch_writer_fails, "the write failed ("), (disk_full, "No space left on device;")):
        monkeypatch.setattr(torch, "save", fail)
        with pytest.raises(ck.CheckpointWriteError) as e:
            ck.atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
        assert str(e.value).startswith(f"cannot write checkpoint {path}: {reason}")
        assert str(e.value).endswith("the previous last.pt is intact (the save writes a temporary file and renames it)")
        monkeypatch.setattr(torch, "save", real_save)
        assert ck.load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ck.CheckpointWriteError, match="nothing was written"):
        ck.atomic_save({"model": {}}, tmp_path / "new.pt")


RUN = [*TINY, "--epochs", "3", "--deterministic", "--seed", "5", "--no-plot", "--max-norm", "1.0"]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _start(cache, out, **extra):
    return subprocess.Popen([sys.executable, "-m", "segclip", "train", *RUN, "--out", str(out)], cwd=REPO,
                            env=env(cache, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(p, steps, n):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if steps.exists() and any(json.loads(line)["step"] == n for line in steps.read_text().splitlines()
                                  if line.strip()):
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    p.kill()
    pytest.fail(f"the training process never reached step {n}")


def test_resume_after_sigkill_sigint_or_sigterm_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    tiny_voc(cache, 16, 4, 32)  # generated once, before the runs start in parallel
    # 16 images / batch 4 = 4 steps per epoch; 3 epochs. SIGKILL and SIGINT at step 6 (epoch 2's
    # second step); SIGTERM at step 4, the last step of epoch 1, before its evaluation.
    full = _start(cache, tmp_path / "full")
    cases = {"kill": (signal.SIGKILL, 6), "int": (signal.SIGINT, 6), "term": (signal.SIGTERM, 4)}
    procs = {name: _start(cache, tmp_path / name, SEGCLIP_TEST_HANG_AT_STEP=str(step))
             for name, (_, step) in cases.items()}
    for name, (sig, step) in cases.items():
        _wait_for_step(procs[name], tmp_path / name / "steps.jsonl", step)
        os.kill(procs[name].pid, sig)
    for name, (sig, step) in cases.items():
        out, err = procs[name].communicate(timeout=120)
        last = tmp_path / name / "last.pt"
        left = torch.load(last, weights_only=True)
        assert not [q for q in (tmp_path / name).iterdir() if ck.TMP_MARK in q.name]
        if sig == signal.SIGKILL:  # what it left: epoch 1 complete in last.pt
            assert procs[name].returncode == -signal.SIGKILL
            assert left["epoch"] == 0 and left["train_state"]["step"] == 4 and left["position"] is None
        else:  # one line, the exit status of the signal, and last.pt at the step it stopped after
            assert procs[name].returncode == 128 + sig, err
            epoch = 1 + (step - 1) // 4
            # (torch's own "No CUDA runtime is found" import warning may come first: not segclip's line)
            assert [ln for ln in err.splitlines() if "cpp_extension.py" not in ln] == [
                f"segclip train: interrupted at epoch {epoch} step {step} (saved at this step); "
                f"resume with: segclip train --resume {last}"]
            assert "Traceback" not in out + err
            assert left["train_state"]["step"] == step and left["epoch"] == epoch - 2
            assert left["position"]["epoch"] == epoch - 1 and left["position"]["iter"] == step - 4 * (epoch - 1)
    assert full.wait(timeout=120) == 0, full.communicate()

    # Only --resume: every other argument comes from the checkpoint.
    resumes = {name: subprocess.Popen([sys.executable, "-m", "segclip", "train", "--resume",
                                       str(tmp_path / name / "last.pt")], cwd=REPO, env=env(cache),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in cases}
    a = _weights(tmp_path / "full" / "last.pt")
    log_a = [json.loads(line) for line in (tmp_path / "full" / "steps.jsonl").read_text().splitlines()]
    epochs_a = [json.loads(line) for line in (tmp_path / "full" / "epochs.jsonl").read_text().splitlines()]
    for name, p in resumes.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "resumed from" in out and "--epochs 3" in out
        b = _weights(tmp_path / name / "last.pt")
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
        # The log holds each step once, and the same losses as the uninterrupted run; the epochs
        # (counted from 1) once each, with the same training summary.
        log_b = [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log_b] == list(range(1, 13))
        assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
        assert [(r["epoch"], r["iter"]) for r in log_b] == [(1 + i // 4, i % 4) for i in range(12)]
        epochs_b = [json.loads(line) for line in (tmp_path / name / "epochs.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in epochs_b] == [1, 2, 3]
        for key in ("train_loss", "steps", "clipped", "grad_norm_median", "val_mean_iou", "best_mean_iou"):
            assert [e[key] for e in epochs_a] == [e[key] for e in epochs_b], (name, key)
        ckpt = torch.load(tmp_path / name / "last.pt", weights_only=True)
        assert ckpt["epoch"] == 2 and ckpt["scheduler"]["last_epoch"] == 12 and ckpt["position"] is None


def test_resume_with_more_epochs_extends_the_lr_schedule(tmp_path, capsys):
    from segclip.cli import main
    from segclip.train.optim import PolyWarmup

    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:  # in this process (TINY sets --threads 1): two interpreter start-ups less
        assert main(["train", *TINY, "--epochs", "1", "--no-plot", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(run)]) == 0
        capsys.readouterr()
        assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "LR schedule follows this run's arguments (total steps 4 -> 8" in capsys.readouterr().out
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 9))
    # Steps 5..8 use the LRs of an uninterrupted 2-epoch run (4 steps/epoch, 1 warmup epoch), not 0.
    expected = [0.05 * PolyWarmup(8, 4)(k) for k in range(4, 8)]
    assert [r["lr"] for r in steps[4:]] == pytest.approx(expected, rel=1e-6)
    assert min(expected) > 0.005


def test_changed_steps_per_epoch_moves_the_schedule_and_an_unchanged_one_is_loaded_as_saved():
    from segclip.train.optim import build_scheduler, load_schedule

    def make(total, warmup, lr=0.1):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)
        return opt, build_scheduler(opt, total, warmup)

    opt, sched = make(20, 10)  # 2 epochs of 10 steps
    for _ in range(10):
        opt.step(); sched.step()
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    # Unchanged: loaded exactly as saved.
    opt2, sched2 = make(20, 10)
    opt2.load_state_dict(saved_opt)
    assert load_schedule(sched2, opt2, saved, 10) is None
    assert sched2.state_dict() == saved and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # Half the batch size: 20 steps per epoch, so epoch 1 starts at step 20 of 40, warmup 20.
    opt3, sched3 = make(40, 20, lr=0.2)
    opt3.load_state_dict(saved_opt)
    note = load_schedule(sched3, opt3, saved, 20)
    assert "total steps 20 -> 40" in note and "warmup steps 10 -> 20" in note and "peak lr 0.1 -> 0.2" in note
    assert sched3.last_epoch == 20 and opt3.param_groups[0]["lr"] == pytest.approx(0.2)
    sched3.step()
    assert opt3.param_groups[0]["lr"] == pytest.approx(0.2 * (1 - 1 / 20) ** 0.9)


def test_run_folder_reuse_resume_elsewhere_finished_runs_and_changed_optimizer(tmp_path, capsys):
    from segclip.cli import main

    run, other = tmp_path / "run", tmp_path / "other"
    tiny = [*TINY, "--no-plot", "--cache-dir", str(tmp_path / "cache")]
    # A run killed in its first epoch left logs but no last.pt: the same command starts afresh there.
    run.mkdir()
    (run / "steps.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 0}) + "\n" for s in (1, 2, 3)))
    threads = torch.get_num_threads()
    try:
        assert main(["train", *tiny, "--epochs", "1", "--max-norm", "8", "--out", str(run)]) == 0
        out = capsys.readouterr().out
        assert "nothing to resume); starting afresh there, replacing its steps.jsonl" in out
        assert [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        # Nothing left to train: exit 0, the folder untouched.
        assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "1"]) == 0
        assert "nothing left to train (1 epoch done, --epochs 1)" in capsys.readouterr().out
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        # --out another folder holding a run is refused; the checkpoint's own folder is not.
        other.mkdir()
        (other / "steps.jsonl").write_text("{}\n")
        assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--out", str(other)]) == 2
        err = capsys.readouterr().err
        assert f"--out {other} already holds another run (steps.jsonl)" in err and f"continues the run in {run}" in err
        assert (other / "steps.jsonl").read_text() == "{}\n"
        # Another optimizer than the checkpoint's: one line, exit 2.
        assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--optimizer", "adamw"]) == 2
        err = capsys.readouterr().err
        assert "was trained with sgd" in err and len(err.strip().splitlines()) == 1
        # New --weight-decay and --momentum apply to the resumed optimizer; a typed --max-norm wins
        # over the checkpoint's 8 although it equals the default.
        assert main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--out", str(run),
                     "--weight-decay", "5e-4", "--momentum", "0.8", "--max-norm", "2.0"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "optimizer follows this run's arguments (weight decay 0.0001 -> 0.0005, momentum 0.9 -> 0.8)" \
        in capsys.readouterr().out
    groups = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [(5e-4, 0.8), (0.0, 0.8)]
    assert torch.load(run / "last.pt", weights_only=True)["args"]["max_norm"] == 2.0
    assert json.loads((run / "config.json").read_text())["args"]["max_norm"] == 2.0
