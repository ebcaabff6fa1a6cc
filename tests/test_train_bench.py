"""benchmarks/bench_train.py runs (tiny settings) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json

from _train_util import REPO


def test_bench_train_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGCLIP_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--models", "lraspp_mobilenet_v3_large", "--size", "32", "--batch-size", "2",
                       "--steps", "2", "--warmup", "1", "--rounds", "2",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_train.json").read_text())
    assert [r["clip"] for r in report["results"]] == ["fused", "torch", "none"]
    for r in report["results"]:
        assert r["steps"] == 2 and r["images_per_s"] > 0 and 0 < r["clip_share"] < 1
    assert r["clipped_share"] == 0  # clip=none never clips
    out = capsys.readouterr().out
    assert "clip share" in out and "img/s" in out
