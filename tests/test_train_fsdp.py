"""``segclip train --fsdp`` (FSDP2 under torchrun): 2 CPU processes on gloo, launched with the README's
multi-machine torchrun line (read from README.md) on one machine. Every subprocess has a timeout.

The uninterrupted --fsdp run and its DDP twin are module fixtures, shared by the tests below."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from _train_util import REPO, TINY, env, segclip, tiny_voc

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")

# 16 train images / 2 ranks / batch 4 = 2 steps per epoch; 5 val images split 3 / 2 over the ranks, in
# batches of 2: rank 0 makes 2 forwards, rank 1 one (FSDP's forward is a collective: it must not hang).
RUN = [*TINY, "--synthetic-val", "5", "--eval-batch-size", "2", "--epochs", "2", "--deterministic",
       "--seed", "5", "--max-norm", "1.0", "--no-plot"]
TIMEOUT = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_launch() -> tuple[list[str], list[str]]:
    """The README's multi-machine line: (torchrun's flags, the ``segclip train`` arguments)."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "--rdzv-backend" in b and "--fsdp" in b]
    assert len(blocks) == 1, "README.md: expected one bash block with the torchrun --fsdp launch"
    words = shlex.split(blocks[0].replace("\\\n", " "))
    assert words[0] == "torchrun" and "-m" in words
    m = words.index("-m")
    assert words[m + 1:m + 4] == ["segclip", "train", "--fsdp"], words
    return words[1:m], words[m + 3:]


def launch(port: int, train_args: list[str], fsdp: bool = True) -> list[str]:
    """The README's command with --nnodes=1, --nproc-per-node=2 and a localhost endpoint (every
    other torchrun flag as written there), and our tiny training arguments."""
    flags, _ = readme_launch()
    names = {f.split("=")[0] for f in flags}
    assert {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"} <= names, flags
    assert "--rdzv-backend=c10d" in flags
    local = {"--nnodes": "1", "--nproc-per-node": "2", "--rdzv-endpoint": f"localhost:{port}"}
    flags = [f"{f.split('=')[0]}={local[f.split('=')[0]]}" if f.split("=")[0] in local else f for f in flags]
    # torchrun is `python -m torch.distributed.run` (its console script), run with this interpreter
    return [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "segclip", "train",
            *(["--fsdp"] if fsdp else []), *train_args]


def _start(cmd, cache, **extra) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(cache, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and its descendants: torchrun starts each worker in a session of its own, so
    killing torchrun (or its process group) would leave hung workers behind."""
    def descendants(p):
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            return []
        return kids + [d for k in kids for d in descendants(k)]
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _finish(p: subprocess.Popen) -> tuple[str, str]:
    """Its output; past TIMEOUT, torchrun and every worker are killed and the test fails."""
    try:
        return p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(p.pid)
        out, err = p.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s (a hang?):\n{out[-2000:]}\n{err[-2000:]}")


def _run(cmd, cache, **extra) -> subprocess.CompletedProcess:
    p = _start(cmd, cache, **extra)
    out, err = _finish(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _steps(folder):
    return [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted --fsdp run (--clip fused) and the same run under DDP with --clip torch."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "cache"
    voc = tiny_voc(cache, 16, 5, 32)
    out = {}
    for name, fsdp, clip in (("fsdp", True, "fused"), ("ddp", False, "torch")):
        r = _run(launch(_free_port(), [*RUN, "--clip", clip, "--out", str(root / name)], fsdp=fsdp), cache)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[name] = (root / name, r)
    return root, cache, voc, out


def test_readme_launch_under_fsdp_agrees_with_ddp_and_torch_norm(runs):
    root, _, _, out = runs
    (fsdp_dir, r), (ddp_dir, rd) = out["fsdp"], out["ddp"]
    assert "x2 (FSDP)" in r.stdout and "x2 (DDP)" in rd.stdout and r.stdout.count("final mIoU") == 1
    assert "using foreach" in r.stdout  # torch's fused SGD takes no DTensor
    a, b = _steps(fsdp_dir), _steps(ddp_dir)
    assert [s["step"] for s in a] == [1, 2, 3, 4]
    # clip_optimizer_ cannot fold DTensor gradients: it takes its plain path, and the record says so.
    assert {s["clip_path"] for s in a} == {"plain"} and {s["clip_path"] for s in b} == {"torch"}
    assert all(s["clipped"] for s in a)  # max_norm 1: every step clips, so the coefficient matters
    # The per-group norms (backbone, classifier) of the sharded gradients make up the global norm.
    for x in a:
        groups = x["group_norms"]
        assert set(groups) == {"backbone", "classifier"}
        assert abs(sum(v * v for v in groups.values()) ** 0.5 - x["grad_norm"]) <= 1e-5 * x["grad_norm"], x

    def rel(x, y):
        return abs(x - y) / abs(y)
    # Step 1: the same weights and batches; segclip's global norm of the sharded gradients (local
    # kernel + one all-reduce) against torch's clip_grad_norm_ of DDP's all-reduced ones. They differ
    # only by the order of the float32 sums (reduce-scatter vs all-reduce, and the two norm
    # kernels): measured 0 to 1e-7; 1e-5 leaves room for another CPU's vector width.
    assert rel(a[0]["loss"], b[0]["loss"]) <= 1e-6
    assert rel(a[0]["grad_norm"], b[0]["grad_norm"]) <= 1e-5
    # Steps 2-4: those last-bit differences, amplified by three SGD updates (measured up to 2.2e-6
    # for the norms, 2e-7 for the losses); 1e-4 is 50x that, and well below what a clip bound off by
    # 1e-3 does (planted: --max-norm 2.002 under --fsdp against 2 under DDP moved steps 3 and 4 by
    # 6e-4 to 1.1e-3).
    for x, y in zip(a[1:], b[1:]):
        assert rel(x["loss"], y["loss"]) <= 1e-4 and rel(x["grad_norm"], y["grad_norm"]) <= 1e-4, (x, y)


def test_fsdp_checkpoint_is_a_plain_one_and_its_uneven_eval_matches_one_process(runs):
    root, cache, voc, out = runs
    fsdp_dir = out["fsdp"][0]
    ck = torch.load(fsdp_dir / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["args"]["fsdp"] is True
    # Full tensors under the model's own names, and the optimizer state keyed as optimizer.state_dict()
    # keys it, so the model and optimizer of a run without FSDP load it strictly.
    from segclip.train.models import build_model
    from segclip.train.optim import build_optimizer
    model = build_model("lraspp_mobilenet_v3_large", 21)
    model.load_state_dict(ck["model"])  # strict: every key, every shape
    opt, _ = build_optimizer(model, "sgd", 0.05, 0.9, 1e-4, torch.device("cpu"), fused=False, log=lambda *a: None)
    opt.load_state_dict(ck["optimizer"])
    assert len(opt.state) == len(list(model.parameters()))

    # The evaluation of the uneven split counted every labelled val pixel once ...
    metrics = json.loads((fsdp_dir / "metrics.json").read_text())
    d = voc / "VOCdevkit" / "VOC2012"
    labelled = sum(int((np.array(Image.open(d / "SegmentationClass" / f"{n}.png")) != 255).sum())
                   for n in (d / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    assert metrics["pixels"] == labelled
    # ... and found what one process finds evaluating the saved weights without FSDP.
    single = segclip(["eval", "--checkpoint", str(fsdp_dir / "last.pt"), "--data", str(voc), "--out",
                      str(root / "single.json")], cache, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    alone = json.loads((root / "single.json").read_text())
    assert alone["confusion_matrix"] == metrics["confusion_matrix"]
    assert alone["mean_iou"] == metrics["mean_iou"]


def _wait_for_step(p, steps, n):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if steps.exists() and any(json.loads(line)["step"] == n for line in steps.read_text().splitlines()
                                  if line.strip()):
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    pytest.fail(f"the training processes never reached step {n}")


def test_sigint_to_torchrun_saves_and_the_fsdp_resume_is_exact_and_one_process_resumes_it(runs):
    root, cache, _, out = runs
    fsdp_dir = out["fsdp"][0]
    # SIGINT to torchrun (as a scheduler signals the launcher), which passes it to both ranks while
    # they wait after step 2 (the last of epoch 1): they vote at step 3 and stop after it, mid-epoch 2.
    run_dir = root / "int"
    p = _start(launch(_free_port(), [*RUN, "--out", str(run_dir)]), cache, SEGCLIP_TEST_HANG_AT_STEP="2")
    try:
        _wait_for_step(p, run_dir / "steps.jsonl", 2)
    except BaseException:
        _kill_tree(p.pid)
        raise
    p.send_signal(signal.SIGINT)
    _, err = _finish(p)
    ours = [ln for ln in err.splitlines() if ln.startswith("segclip train:")]
    assert ours == [f"segclip train: interrupted at epoch 2 step 3 (saved at this step); resume with: "
                    f"segclip train --resume {run_dir / 'last.pt'}"], err[-3000:]
    assert "[rank" not in err  # no rank's traceback (torchrun's own report of the signal is its own)
    left = torch.load(run_dir / "last.pt", weights_only=True)
    assert left["train_state"]["step"] == 3 and left["position"]["iter"] == 1

    # Only --resume (and the launch): --fsdp and the rest come from the checkpoint.
    r = _run(launch(_free_port(), ["--resume", str(run_dir / "last.pt")], fsdp=False), cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--fsdp True" in r.stdout and "x2 (FSDP)" in r.stdout
    a = torch.load(fsdp_dir / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert [s["loss"] for s in _steps(fsdp_dir)] == [s["loss"] for s in _steps(run_dir)]
    assert [s["step"] for s in _steps(run_dir)] == [1, 2, 3, 4]

    # The finished --fsdp run continues on one process without FSDP (its optimizer state included).
    alone = root / "alone"
    shutil.copytree(fsdp_dir, alone)
    r = segclip(["train", "--resume", str(alone / "last.pt"), "--epochs", "3", "--no-fsdp"], cache, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RNG states are reseeded" in r.stdout  # 2 processes -> 1: said, not hidden
    assert [s["step"] for s in _steps(alone)] == list(range(1, 9))  # + epoch 3's 4 steps on one process


def test_fsdp_on_one_process_is_a_mesh_of_one_and_matches_a_plain_run(tmp_path):
    # Without torchrun, --fsdp runs FSDP2 on a process group of one (the sharded code path, nothing
    # sharded), saying so. ZClip's bound follows the DTensor path's global norm.
    cache = tmp_path / "cache"
    tiny_voc(cache, 16, 4, 32)
    args = [*TINY, "--epochs", "1", "--deterministic", "--no-plot", "--optimizer", "adamw", "--lr", "1e-3",
            "--clip-mode", "zscore"]
    r = segclip(["train", *args, "--fsdp", "--out", str(tmp_path / "f")], cache, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP on a mesh of one" in r.stdout and "(FSDP)" in r.stdout and "adamw (fused)" in r.stdout
    p = segclip(["train", *args, "--out", str(tmp_path / "p")], cache, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _steps(tmp_path / "f"), _steps(tmp_path / "p")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):  # the same gradients (a mesh of one reduces nothing), norms by two kernels' orders
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * abs(y["grad_norm"]), (x, y)
    # --fsdp --clip torch: torch's clip_grad_norm_ on the DTensor gradients; the first step's norm (before
    # any clipping, from the same weights and batch) is the plain run's.
    t = segclip(["train", *args[:-2], "--fsdp", "--clip", "torch", "--out", str(tmp_path / "t")], cache, timeout=TIMEOUT)
    assert t.returncode == 0, t.stderr[-3000:]
    c = _steps(tmp_path / "t")
    assert {x["clip_path"] for x in c} == {"torch"}
    assert abs(c[0]["grad_norm"] - b[0]["grad_norm"]) <= 1e-5 * b[0]["grad_norm"], (c[0], b[0])


def test_agc_trains_under_fsdp(tmp_path, capsys):
    # In-process, on a mesh of one (the 2-rank AGC on DTensors is checked against one process in
    # tests/test_distributed.py): the --clip-mode agc step through adaptive_clip_'s DTensor path.
    from segclip.cli import main

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *TINY, "--fsdp", "--epochs", "1", "--clip-mode", "agc", "--no-plot",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    steps = _steps(out)
    assert len(steps) == 4 and all(s["grad_norm"] is not None and not s["skipped"] for s in steps)


def test_a_diverging_fsdp_run_writes_a_full_nonfinite_checkpoint(tmp_path, capsys):
    # In-process, on a mesh of one: the non-finite stop gathers the full state dicts too.
    from segclip.cli import main
    from segclip.train.models import build_model

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", *TINY, "--fsdp", "--epochs", "1", "--lr", "1e30", "--clip", "none",
                     "--max-nonfinite", "2", "--warmup-iters", "0", "--no-plot", "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(out)]) == 3
    finally:
        torch.set_num_threads(threads)
    assert not torch.distributed.is_initialized()  # the group of one is gone again
    err = capsys.readouterr().err
    assert err.startswith("segclip train: error: 2 consecutive steps had a non-finite") and len(err.strip().splitlines()) == 1
    ck = torch.load(out / "nonfinite.pt", weights_only=True)
    build_model("lraspp_mobilenet_v3_large", 21).load_state_dict(ck["model"])  # full tensors, plain names
    assert ck["train_state"]["consecutive_nonfinite"] == 2 and ck["stopped"]
