"""The ``adapt`` bench suite (value clipping and AGC) runs end to end and times every implementation
of each mode side by side."""

from __future__ import annotations

import json

from segclip.bench import cli


def test_adapt_suite_smoke(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["--suite", "adapt", "--models", "synthetic_smoke", "--dtypes", "fp32", "--min-run-time",
                     "0.001", "--rounds", "1", "--device", "cpu", "--no-progress", "--retries", "0", "--no-plot",
                     "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["suite"] == "adapt"
    got = {(r["mode"], r["impl"]) for r in data["records"] if r["median_s"]}
    for mode in ("value-inactive", "value-active"):
        assert {(mode, i) for i in ("torch_foreach", "torch_loop", "segclip_torch", "segclip_cpu")} <= got
    assert ("value-active", "refresh") in got
    assert {("agc", "torch_foreach"), ("agc", "segclip_cpu")} <= got
    assert "adaptive_clip_" in (out / "summary.md").read_text()
