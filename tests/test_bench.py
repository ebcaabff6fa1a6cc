"""Smoke tests of ``segclip bench`` and its reports. They check that the outputs exist and hold the
expected keys; they never assert a performance figure."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segclip import bench, bench_report

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--models", "synthetic_smoke", "--dtypes", "fp32", "--min-run-time", "0.001", "--rounds", "1",
         "--device", "cpu", "--no-progress", "--retries", "0"]
IMPLS = {"torch_foreach", "torch_loop", "segclip_torch", "segclip_cpu", "bound"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    assert bench.main(SMOKE + ["--out", str(out)]) == 0
    return out


def test_smoke_run_writes_json_markdown_png(smoke_run):
    data = json.loads((smoke_run / "bench.json").read_text())
    assert data["schema"] == bench.SCHEMA
    for key in ("cpu_model", "cpu_cores", "torch_threads", "gpu_name", "torch_version", "segclip_backends",
                "date", "command"):
        assert key in data["machine"], key
    assert "bench_clip.py" in data["machine"]["command"] or "segclip" in data["machine"]["command"]
    assert set(data["machine"]["segclip_backends"]) == {"cpu", "cuda", "torch"}
    assert data["settings"]["max_norm"] == {"active": 0.0, "inactive": 1e30}
    assert data["cases"]["cpu"]["synthetic_smoke"]["n_tensors"] == 16
    records = data["records"]
    assert {(r["mode"], r["impl"]) for r in records} == {(m, i) for m in ("active", "inactive") for i in IMPLS}
    for r in records:
        for key in ("device", "case", "dtype", "mode", "max_norm", "impl", "available", "median_s",
                    "speedup_vs_foreach", "fraction_of_bound", "bytes_moved", "others_cpu", "noisy"):
            assert key in r, key
        if r["available"]:
            assert r["median_s"] > 0 and r["speedup_vs_foreach"] > 0 and r["fraction_of_bound"] > 0
    # the returned norms were checked against float64 before timing
    errs = [r["norm_rel_err"] for r in records if "norm_rel_err" in r]
    assert len(errs) == 4 and max(errs) < 1e-5
    summary = (smoke_run / "summary.md").read_text()
    assert "Headline targets" in summary and "synthetic_smoke" in summary and "flat bound" in summary
    assert (smoke_run / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_wrong_norm_is_reported_before_timing(tmp_path, monkeypatch, capsys):
    real = bench.clip_fn

    def off_by_two_percent(impl, *args):
        fn = real(impl, *args)
        return (lambda: fn() * 1.02) if impl == "segclip_torch" else fn

    monkeypatch.setattr(bench, "clip_fn", off_by_two_percent)
    assert bench.main(SMOKE + ["--modes", "inactive", "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "segclip_torch" in warnings[0] and "relative error 0.02" in warnings[0]


def test_compare_two_jsons(smoke_run, tmp_path, capsys):
    old = json.loads((smoke_run / "bench.json").read_text())
    new = copy.deepcopy(old)
    slowed = next(r for r in new["records"] if r["impl"] == "segclip_torch" and r["mode"] == "active")
    slowed["median_s"] *= 1.5
    new["records"] = [r for r in new["records"] if not (r["impl"] == "torch_loop" and r["mode"] == "inactive")]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert bench.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "segclip torch" in ln and "active " in ln and "inactive" not in ln]
    assert len(lines) == 1 and "1.500x" in lines[0] and "REGRESSION" in lines[0]
    assert "only in old" in out
    assert out.count("REGRESSION") == 1


def test_results_page_says_not_measured(smoke_run, tmp_path):
    page_path = tmp_path / "RESULTS.md"
    assert bench_report.results_main(["--cpu-json", str(smoke_run / "bench.json"), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    # the smoke run measured no model: their rows, the GPU tables and bench_train say so
    assert "| lraspp_mobilenet_v3_large | - | - | not measured |" in page
    assert "every GPU figure is not measured" in page
    assert "images/s and the clip share of the step are not measured" in page
    assert "| lraspp_mobilenet_v3_large | active | time / flat bound <= 1.1x | not measured | not measured |" in page
    assert "Source: `" in page and "- command: `" in page and "- date: " in page


def test_results_page_reads_lenient_gpu_and_train_json(tmp_path):
    gpu = {"machine": {"gpu_name": "Some GPU", "date": "2026-01-01"},
           "results": [
               {"model": "lraspp_mobilenet_v3_large", "dtype": "float32", "clipping": True,
                "implementation": "torch foreach", "median_ms": 2.0},
               {"model": "lraspp_mobilenet_v3_large", "dtype": "float32", "clipping": True,
                "implementation": "fused", "median_ms": 0.5, "bound_ms": 0.25},
               {"model": "fcn_resnet50", "implementation": "fused"},  # no time: stays not measured
           ]}
    train = [{"model": "lraspp_mobilenet_v3_large", "clip": "fused", "images_per_s": 30.0, "clip_share": 0.01},
             {"model": "lraspp_mobilenet_v3_large", "clip": "torch", "images_per_s": 25.0, "clip_share": 0.2},
             {"model": "lraspp_mobilenet_v3_large", "clip": "none", "images_per_s": 31.0}]
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "cpu.json").write_text("[]")
    page_path = tmp_path / "RESULTS.md"
    assert bench_report.results_main(["--cpu-json", str(tmp_path / "cpu.json"), "--gpu-json", str(tmp_path / "gpu.json"),
                                      "--train-json", str(tmp_path / "train.json"), "--out", str(page_path),
                                      "--root", str(tmp_path)]) == 0
    page = page_path.read_text()
    assert "`cpu.json` holds no readable CPU records: every CPU figure is not measured" in page
    gpu_row = next(ln for ln in page.splitlines() if ln.startswith("| lraspp_mobilenet_v3_large")
                   and "2 ms" in ln)
    assert "500 us (4.00x, 50% of bound)" in gpu_row
    assert "Some GPU" in page
    train_row = next(ln for ln in page.splitlines() if ln.startswith("| lraspp_mobilenet_v3_large | 30"))
    assert "1.20x" in train_row and "1.0%" in train_row and "20.0%" in train_row


def test_targets_are_evaluated_from_records():
    recs = []
    for impl, t in (("torch_foreach", 2.0), ("segclip_cpu", 1.0), ("bound", 0.95)):
        recs.append({"device": "cpu", "case": "lraspp_mobilenet_v3_large", "dtype": "fp32", "mode": "active",
                     "impl": impl, "median_s": t, "available": True})
    targets = bench_report.evaluate_targets(bench_report.normalize_records(recs))
    by = {(t["case"], t["mode"], t["metric"]): t for t in targets}
    assert by[("lraspp_mobilenet_v3_large", "active", "time_over_bound")]["status"] == "met"
    assert by[("lraspp_mobilenet_v3_large", "active", "speedup_vs_foreach")]["measured"] == pytest.approx(2.0)
    assert by[("deeplabv3_resnet50", "inactive", "speedup_vs_foreach")]["status"] == "not measured"


def test_pure_pytorch_fallback_shows_compiled_row_not_available(tmp_path):
    env = dict(os.environ, SEGCLIP_BACKEND="torch")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_clip.py"), *SMOKE, "--modes",
                           "inactive", "--no-plot", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    rec = next(r for r in data["records"] if r["impl"] == "segclip_cpu")
    assert rec["available"] is False and rec["median_s"] is None and "SEGCLIP_BACKEND=torch" in rec["reason"]
    row = next(ln for ln in proc.stdout.splitlines() if "segclip cpu" in ln and "synthetic_smoke" in ln)
    assert "not available: disabled by SEGCLIP_BACKEND=torch" in row
    assert "not available" in (out / "summary.md").read_text()


def test_noisy_groups_are_marked():
    recs = [{"device": "cpu", "case": "synthetic_tiny", "dtype": "fp32", "mode": "active", "impl": impl,
             "median_s": 1e-3, "available": True, "noisy": True, "others_cpu": 0.9, "rounds_discarded": 3}
            for impl in ("torch_foreach", "segclip_cpu", "bound")]
    result = {"records": recs}
    assert "NOISY: other processes kept 0.90 cores busy" in bench_report.format_rows(result)
    assert "| synthetic_tiny (noisy) |" in bench_report.summary_markdown(result)
    assert "1 of 1 groups still noisy" in bench_report.noise_summary(bench_report.normalize_records(result))


def _gpu_bench_json(dry_run: bool) -> dict:
    """The layout benchmarks/gpu_bench.py writes (env, models/<model>/<clip|noclip>/<impl>, bandwidth)."""
    timing = {"clip": {"torch": {"median_us": 300.0}, "ops": {"median_us": 100.0}, "api": {"median_us": 120.0}},
              "noclip": {"torch": {"median_us": 200.0}, "ops": {"median_us": 50.0}}}
    return {"env": {"torch": "2.x", "cuda": "13.0", "device": "cpu (dry run)" if dry_run else "Some GPU",
                    "dry_run": dry_run},
            "models": {"lraspp_mobilenet_v3_large": {"tensors": 178, "elements": 1_000_000, **timing}},
            "bandwidth": {"bytes": 2 << 30, "tensors": 200, "copy": {"GBps": 1000.0},
                          "clip": {"torch": {"median_us": 9000.0}, "ops": {"median_us": 7000.0}}}}


def test_results_page_reads_gpu_bench_layout(tmp_path):
    for dry_run in (False, True):
        path = tmp_path / f"gpu-{dry_run}.json"
        path.write_text(json.dumps(_gpu_bench_json(dry_run)))
        page_path = tmp_path / "RESULTS.md"
        (tmp_path / "cpu.json").write_text("[]")
        assert bench_report.results_main(["--cpu-json", str(tmp_path / "cpu.json"), "--gpu-json", str(path),
                                          "--out", str(page_path), "--root", str(tmp_path)]) == 0
        page = page_path.read_text()
        rows = [ln for ln in page.splitlines() if ln.startswith("| lraspp_mobilenet_v3_large | 178 |")]
        if dry_run:
            assert "is a dry run on the CPU" in page and not rows
            continue
        # active: torch 300 us, api (segclip cuda) 120 us = 2.5x, ops 100 us = 3x; bound = 12 MB / 1 TB/s
        assert "120 us (2.50x, 10% of bound)" in rows[0] and "100 us (3.00x, 12% of bound)" in rows[0]
        assert "12 us (25.00x)" in rows[0]
        assert "| gpu_bench_2GiB_x200 | 200 |" in page and "GPU: Some GPU" in page


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50",
                                  "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"])
def test_model_cases_are_the_gradients_a_training_step_produces(name):
    # The benchmark times clipping on gradients of these shapes (from the meta device); a real
    # backward on the real model must give a gradient to exactly those parameters, in that order.
    import torchvision

    from segclip.bench import model_grad_shapes

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21).train()
    model(torch.randn(2, 3, 32, 32))["out"].square().mean().backward()
    got = [tuple(p.grad.shape) for p in model.parameters() if p.grad is not None]
    assert got == model_grad_shapes(name)


# ----------------------------------------------------------------------------------------------
# Usage errors: one line on stderr, exit 2, and before any timing (run_bench must not be reached)


@pytest.fixture()
def no_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before the error was found")
    monkeypatch.setattr(bench, "run_bench", refuse)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    # one error line (argparse puts its usage lines above it), no traceback
    assert "Traceback" not in err and ": error: " in last and err.count("error:") == 1, err
    return last


def test_bad_out_fails_before_the_run(tmp_path, no_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"--out {afile}: exists and is not a folder" in _usage_error(SMOKE + ["--out", str(afile)], capsys)
    err = _usage_error(SMOKE + ["--out", str(afile / "sub")], capsys)
    assert f"--out {afile / 'sub'}: cannot create the folder" in err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("not json", "not JSON"), ("5", "not a benchmark JSON (its top level is int"),
    ("[]", "holds no benchmark record"), ("{}", "holds no benchmark record"),
    ('{"records": [{"case": "x", "impl": "torch_foreach", "median_s": "abc"}], "machine": "str"}',
     "holds no benchmark record"),
])
def test_compare_checks_old_json_before_the_run(tmp_path, no_run, capsys, content, message):
    old = tmp_path / "old.json"
    if content is not None:
        old.write_text(content)
    err = _usage_error(SMOKE + ["--out", str(tmp_path / "run"), "--compare", str(old)], capsys)
    assert f"--compare {old}: {message}" in err
    assert not (tmp_path / "run").exists()
    # comparing two files: the same errors
    assert f"--compare {old}: {message}" in _usage_error(["--compare", str(old), str(old)], capsys)


def test_compare_reads_a_list_of_records_and_a_machine_that_is_no_object(tmp_path, capsys):
    rec = {"case": "synthetic_smoke", "impl": "torch_foreach", "mode": "active", "median_s": 1e-3}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    (tmp_path / "b.json").write_text(json.dumps({"records": [dict(rec, median_s=2e-3)], "machine": "str"}))
    assert bench.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "REGRESSION (+100%)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["--min-run-time", "-1"], "argument --min-run-time: must be a number >= 0, got -1"),
    (["--min-run-time", "inf"], "argument --min-run-time: must be a finite number >= 0"),
    (["--retries", "-1"], "argument --retries: must be 0 or more, got -1"),
    (["--models", ""], "--models: no name given"),
    (["--models", "bogus"], "unknown case 'bogus'"),
    (["--dtypes", "fp32 fp64"], "unknown dtype 'fp64'"),
])
def test_bad_values_are_one_line_usage_errors(argv, message, tmp_path, no_run, capsys):
    assert message in _usage_error(["--out", str(tmp_path / "run"), *argv], capsys)


def _settings(*argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return bench.resolve_settings(p.parse_args(list(argv)))


def test_lists_space_or_comma_separated_in_one_or_several_arguments():
    args = _settings("--models", "synthetic_smoke synthetic_tiny", "--dtypes", "bf16 fp16", "--modes", "active,inactive")
    assert args.models == ["synthetic_smoke", "synthetic_tiny"]
    assert args.dtypes == ["bf16", "fp16"] and args.modes == ["active", "inactive"]
    assert _settings("--dtypes", "bf16,", "fp16", "bf16").dtypes == ["bf16", "fp16"]
    assert _settings("--models", "all,synthetic_smoke").models == list(bench.ALL_CASES) + ["synthetic_smoke"]
    assert _settings("--models", "all").models == list(bench.ALL_CASES)


def test_results_page_refuses_bad_json_in_one_line(tmp_path, capsys):
    for content, message in ((None, "no such file"), ("not json", "not JSON"), ("5", "not a benchmark JSON (its top level is int")):
        path = tmp_path / "x.json"
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_text(content)
        for flag in ("--cpu-json", "--gpu-json", "--train-json"):
            argv = ["--cpu-json", str(ROOT / "benchmarks" / "results" / "cpu-2026-11-29.json")] if flag != "--cpu-json" else []
            assert bench_report.results_main([*argv, flag, str(path), "--out", str(tmp_path / "R.md")]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"make_results.py: error: {path}: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "R.md").exists()


def test_results_page_from_another_folder_writes_the_repository_page(tmp_path, monkeypatch, capsys):
    # A fake repository without CPU JSON: refused. With one: found from any current folder, the page
    # goes to REPO/benchmarks/RESULTS.md and nothing is written in the current folder.
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert bench_report.results_main([], repo_root=repo) == 2
    assert "no --cpu-json given and no " in capsys.readouterr().err
    (repo / "benchmarks" / "results" / "cpu-2026-01-01.json").write_text("[]")
    assert bench_report.results_main([], repo_root=repo) == 0
    page = (repo / "benchmarks" / "RESULTS.md").read_text()
    assert "--cpu-json benchmarks/results/cpu-2026-01-01.json" in page
    # an empty list is a given file that holds nothing, not "no file given"
    assert "`benchmarks/results/cpu-2026-01-01.json` holds no readable CPU records" in page
    assert "No CPU benchmark JSON was given" not in page
    assert not (tmp_path / "benchmarks").exists()
    # the script itself: run from elsewhere, it takes this repository's newest cpu-*.json
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_results.py"), "--out", "R.md"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    newest = sorted((ROOT / "benchmarks" / "results").glob("cpu-*.json"))[-1]
    assert f"--cpu-json benchmarks/results/{newest.name}" in (tmp_path / "R.md").read_text()
    assert not (tmp_path / "benchmarks").exists()


def _gpu_bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_out_is_checked_before_the_run(tmp_path, capsys):
    gpu_bench = _gpu_bench_module()
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, message in ((afile / "x.json", f"cannot create its folder {afile}"), (tmp_path, "is a folder")):
        assert gpu_bench.main(["--dry-run", "--out", str(out)]) == 2  # returns before building any case
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"gpu_bench.py: error: --out {out}: {message}") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        gpu_bench.main(["--dry-run", "--iters", "0"])
    assert e.value.code == 2 and "argument --iters: must be above 0, got 0" in capsys.readouterr().err


def test_gpu_bench_dry_run_evaluates_no_target(tmp_path, capsys):
    try:
        import segclip._C  # noqa: F401  (the dry run calls the compiled ops on the CPU)
    except ImportError:
        pytest.skip("segclip's CPU extension is not built")
    gpu_bench = _gpu_bench_module()
    assert gpu_bench.main(["--dry-run", "--out", str(tmp_path / "sub" / "dry.json")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("case "):]
    assert "dry run: targets not evaluated" in table
    assert " ok" not in table and "MISS" not in table
    assert json.loads((tmp_path / "sub" / "dry.json").read_text())["env"]["dry_run"] is True
