"""benchmarks/bench_train.py (``segclip bench --suite train``) runs (tiny settings) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from _train_util import REPO


def _load():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_train_smoke(tmp_path, monkeypatch, capsys):
    import segclip

    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    calls = {"clip_optimizer_": 0, "fused_clip_": 0}  # which path each mode takes: counted, not assumed
    for fn in calls:
        def counted(*a, _f=getattr(segclip, fn), _n=fn, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(segclip, fn, counted)
    assert _load().main(["--models", "lraspp_mobilenet_v3_large", "--size", "32", "--batch-size", "2",
                         "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu", "--no-plot",
                         "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["schema"] == "segclip-bench/2" and report["suite"] == "train"
    assert report["settings"]["batch_size"] == 2 and report["settings"]["clips"] == ["fused", "fused_clip", "torch", "none"]
    assert [r["impl"] for r in report["records"]] == ["fused", "fused_clip", "torch", "none"]
    # 1 warm-up step + 2 timed steps (one per round), each path taken by exactly one mode
    assert calls == {"clip_optimizer_": 3, "fused_clip_": 3}
    for r in report["records"]:
        assert r["n_samples"] == 2 and r["images_per_s"] == pytest.approx(2 / r["median_s"], rel=1e-3)
        assert 0 < r["clip_share"] < 1 and set(r["phase_ms"]) == {"forward", "backward", "clip", "step"}
    assert r["clipped_share"] == 0  # clip=none never clips
    out = capsys.readouterr().out
    assert "images/s clip_optimizer_" in out and "images/s fused_clip_" in out
    assert "clip share (clip_optimizer_)" in out and "fused_clip_ vs torch" in out
    assert "| lraspp_mobilenet_v3_large |" in (tmp_path / "summary.md").read_text()


BAD_ARGS = [
    (["--max-norm", "-1"], "argument --max-norm: must be a number >= 0, got -1"),
    (["--size", "8"], "--size must be at least 16"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
    (["--models", "deeplabv3_mobilenet_v3_large", "--batch-size", "1"],
     "--models deeplabv3_mobilenet_v3_large needs --batch-size 2 or more"),
    (["--models", ","], "--models: no name given"),
    (["--models", "fcn"], "unknown model 'fcn'"),
    (["--clips", "sometimes"], "unknown clip mode 'sometimes'"),
    (["--device", "bogus"], "argument --device: invalid choice: 'bogus'"),
    (["--out", "AFILE"], "--out AFILE: exists and is not a folder"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda but no CUDA device is visible")])


@pytest.mark.parametrize("argv, message", BAD_ARGS)
def test_bad_arguments_are_one_line_errors_before_the_run(argv, message, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before the error was found")

    monkeypatch.setattr("segclip.bench.engine.run", refuse)
    monkeypatch.setattr("segclip.bench.suites.train.make_batches", refuse)
    afile = tmp_path / "afile"
    afile.write_text("")
    argv = [str(afile) if a == "AFILE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        _load().main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err and err.count("error:") == 1
    assert last.startswith("bench_train.py: error: ") and message.replace("AFILE", str(afile)) in last


def test_train_speed_suite_smoke(tmp_path, monkeypatch, capsys):
    # Every implementation (the plain loop, the trainer with its options on and off) runs and is
    # reported against the plain loop; aot_eager spares inductor's code generation.
    from segclip.bench import main as bench_main

    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEGCLIP_COMPILE_BACKEND", "aot_eager")
    try:
        assert bench_main(["--suite", "train_speed", "--models", "lraspp_mobilenet_v3_large", "--size", "16",
                           "--batch-size", "2", "--steps", "1", "--warmup", "1", "--rounds", "1",
                           "--device", "cpu", "--no-plot", "--out", str(tmp_path)]) == 0
    finally:
        torch._dynamo.reset()
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["suite"] == "train_speed"
    assert [r["impl"] for r in report["records"]] == ["plain", "trainer", "trainer-own", "channels-last",
                                                      "compile", "best"]
    for r in report["records"]:
        assert r["images_per_s"] == pytest.approx(2 / r["median_s"], rel=1e-3) and r["first_step_s"] > 0
    out = capsys.readouterr().out
    assert "trainer vs plain" in out and "load average" in out
