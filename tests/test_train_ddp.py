"""Distributed training: torchrun with 2 CPU processes (gloo) on a tiny configuration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from _train_util import REPO, TINY, env, segclip, tiny_voc


def test_torchrun_two_cpu_processes(tmp_path):
    cache = tmp_path / "cache"
    voc = tiny_voc(cache, num_train=16, num_val=6, size=32)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "segclip", "train", *TINY, "--data", str(voc), "--epochs", "2", "--sync-bn",
           "--crop-size", "32", "--eval-size", "32", "--out", str(out)]
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert elapsed < 90
    assert "x2 (DDP)" in r.stdout and r.stdout.count("final mIoU") == 1  # rank 0 alone reports

    # 16 images / 2 ranks / batch 4 = 2 steps per epoch; only rank 0 wrote the log.
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["epoch"] == 1
    assert not any(k.startswith("module.") for k in ck["model"])

    # The all-reduced confusion matrix counts every labelled val pixel exactly once ...
    metrics = json.loads((out / "metrics.json").read_text())
    d = voc / "VOCdevkit" / "VOC2012"
    labelled = sum(int((np.array(Image.open(d / "SegmentationClass" / f"{n}.png")) != 255).sum())
                   for n in (d / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    assert metrics["pixels"] == labelled
    # ... and equals what one process finds evaluating the saved model.
    single = segclip(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(voc), "--eval-size", "32",
                      "--out", "~/single.json"], cache, HOME=str(tmp_path))  # ~ expanded
    assert single.returncode == 0, single.stderr
    alone = json.loads((tmp_path / "single.json").read_text())
    assert alone["confusion_matrix"] == metrics["confusion_matrix"]
    assert alone["mean_iou"] == metrics["mean_iou"]


def test_a_bad_data_file_under_torchrun_gives_one_line_from_segclip(tmp_path):
    # The rank whose shard holds the bad image prints the error; the other one's collective then
    # fails and it exits quietly with the same status (no gloo traceback). torchrun adds its own
    # summary of the failed processes, which is not segclip's to change.
    cache = tmp_path / "cache"
    voc = tiny_voc(cache, num_train=16, num_val=4, size=32)
    d = voc / "VOCdevkit" / "VOC2012"
    name = (d / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[3]
    (d / "JPEGImages" / f"{name}.jpg").write_bytes(b"\x00" * 10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "segclip", "train", *TINY, "--data", str(voc), "--epochs", "1", "--crop-size", "32",
           "--eval-size", "32", "--no-plot", "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("segclip train:")]
    assert len(ours) == 1 and f"cannot read {d / 'JPEGImages' / f'{name}.jpg'}" in ours[0], r.stderr[-3000:]
    assert "gloo" not in r.stderr and "Connection closed" not in r.stderr
    # The rank that read the bad file exits with status 2; the other one too once its collective fails,
    # unless torchrun's agent terminated it first (SIGTERM, then SIGKILL after a grace period: seen
    # once in a CI run on a loaded machine). A crash (a signal of its own, a traceback's status 1) fails.
    codes = sorted(int(c) for c in re.findall(r"^\s*exitcode  : (-?\d+)", r.stderr, re.M))
    assert len(codes) == 2 and 2 in codes and set(codes) <= {2, 143, -15, -9}, (codes, r.stderr[-3000:])
