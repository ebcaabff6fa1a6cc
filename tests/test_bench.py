"""Smoke tests of ``segclip bench`` (segclip/bench/) and its reports. They check that the outputs
exist, hold the schema's keys and agree with each other; they never assert a performance figure."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segclip.bench import cli, page, report, schema
from segclip.bench.suites import clip as clip_suite

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--models", "synthetic_smoke", "--dtypes", "fp32", "--min-run-time", "0.001", "--rounds", "1",
         "--device", "cpu", "--no-progress", "--retries", "0"]
IMPLS = {"torch_foreach", "torch_loop", "segclip_torch", "segclip_cpu", "bound"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    assert cli.main(SMOKE + ["--out", str(out)]) == 0
    return out


def test_smoke_run_writes_json_markdown_png(smoke_run, capsys):
    data = json.loads((smoke_run / "bench.json").read_text())
    assert data["schema"] == schema.SCHEMA == "segclip-bench/2" and data["suite"] == "clip"
    for key in ("cpu_model", "cpu_cores", "torch_threads", "gpu_name", "torch_version", "segclip_backends",
                "date", "command", "load_average_start", "load_average_end"):
        assert key in data["machine"], key
    assert data["machine"]["command"].startswith("python -m segclip.bench --models synthetic_smoke")
    assert set(data["machine"]["segclip_backends"]) == {"cpu", "cuda", "torch"}
    assert data["settings"]["models"] == ["synthetic_smoke"] and data["settings"]["rounds"] == 1
    assert data["cases"]["cpu"]["synthetic_smoke"]["n_tensors"] == 16
    records = data["records"]
    assert {(r["mode"], r["impl"]) for r in records} == {(m, i) for m in ("active", "inactive") for i in IMPLS}
    for r in records:
        for key in ("device", "case", "dtype", "mode", "impl", "available", "median_s", "max_norm", "bytes_moved",
                    "others_cpu", "noisy"):
            assert key in r, key
        assert r["median_s"] > 0 and r["timer"] == "cpu" and r["n_samples"] >= 1
    assert {r["max_norm"] for r in records if r["mode"] == "active"} == {0.0}
    # the returned norms were checked against float64 before timing (the bound returns no clip norm)
    errs = [r["norm_rel_err"] for r in records if "norm_rel_err" in r]
    assert len(errs) == 4 and max(errs) < 1e-5
    summary = (smoke_run / "summary.md").read_text()
    assert "Headline targets" in summary and "synthetic_smoke" in summary and "flat bound" in summary
    assert (smoke_run / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # loads back as written
    assert [r.as_json() for r in schema.load(smoke_run / "bench.json")["records"]] == records


def test_the_terminal_table_and_the_markdown_show_the_same_cells(tmp_path, capsys):
    assert cli.main(SMOKE + ["--modes", "inactive", "--out", str(tmp_path / "run"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    result = schema.load(tmp_path / "run" / "bench.json")
    ((title, header, (row,)),) = report.tables(result, "cpu")
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert f"| {' | '.join(row)} |" in summary and f"## {title}" in summary
    line = next(ln for ln in out.splitlines() if ln.startswith("synthetic_smoke"))
    assert all(cell in line for cell in row)
    # a cell shows time, speedup and bound from the medians, e.g. "23.4 us (4.73x, 60% of bound)"
    recs = {r.impl: r.median_s for r in result["records"]}
    speedup, of_bound = recs["torch_foreach"] / recs["segclip_cpu"], recs["bound"] / recs["segclip_cpu"]
    assert row[header.index("segclip cpu")] == (f"{report.fmt_time(recs['segclip_cpu'])} ({speedup:.2f}x, "
                                                f"{100 * of_bound:.0f}% of bound)")


def test_no_carriage_returns_when_stderr_is_no_terminal(tmp_path):
    argv = [a for a in SMOKE if a != "--no-progress"]  # the bar is asked for, but stderr is a pipe
    proc = subprocess.run([sys.executable, "-m", "segclip", "bench", *argv, "--modes", "inactive", "--no-plot",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr + proc.stdout and "wrote " in proc.stdout
    command = json.loads((tmp_path / "run" / "bench.json").read_text())["machine"]["command"]
    assert command.startswith("segclip bench --models synthetic_smoke")  # as typed, through the segclip CLI


def test_a_wrong_norm_is_reported_before_timing(tmp_path, monkeypatch, capsys):
    real = clip_suite.ClipSuite.clip_fn

    def off_by_two_percent(impl, *args):
        fn = real(impl, *args)
        return (lambda: fn() * 1.02) if impl == "segclip_torch" else fn

    monkeypatch.setattr(clip_suite.ClipSuite, "clip_fn", staticmethod(off_by_two_percent))
    assert cli.main(SMOKE + ["--modes", "inactive", "--no-plot", "--out", str(tmp_path / "run")]) == 0
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
    assert cli.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "segclip_torch" in ln and " active " in ln]
    assert len(lines) == 1 and "1.500x" in lines[0] and "REGRESSION (+50%)" in lines[0]
    assert "only in old" in out and out.count("REGRESSION") == 1


def _result(records: list[dict], suite: str = "clip", **head) -> dict:
    return {"schema": schema.SCHEMA, "suite": suite, "machine": {}, "settings": {}, "cases": {},
            "records": records, **head}


def _write(path: Path, result: dict) -> Path:
    path.write_text(json.dumps(result))
    return path


def test_results_page_says_not_measured(smoke_run, tmp_path):
    page_path = tmp_path / "RESULTS.md"
    assert page.results_main(["--cpu-json", str(smoke_run / "bench.json"), "--out", str(page_path)]) == 0
    text = page_path.read_text()
    # the smoke run measured no model: their rows, the GPU tables and bench_train say so
    assert "| lraspp_mobilenet_v3_large | - | - | not measured |" in text
    assert "every GPU figure is not measured" in text
    assert "images/s and the clip share of the step are not measured" in text
    assert "| lraspp_mobilenet_v3_large | active | time / flat bound <= 1.1x | not measured | not measured |" in text
    assert "Source: `" in text and "- command: `" in text and "- date: " in text


def test_results_page_reads_gpu_and_train_json(tmp_path):
    rec = {"device": "cuda", "case": "lraspp_mobilenet_v3_large", "mode": "active"}
    gpu = _result([{**rec, "impl": "torch_foreach", "median_s": 2e-3}, {**rec, "impl": "segclip_cuda", "median_s": 5e-4},
                   {**rec, "impl": "bound", "median_s": 2.5e-4, "timer": "computed"},
                   {**rec, "impl": "torch_loop", "median_s": None, "available": False, "reason": "because"}],
                  machine={"gpu_name": "Some GPU", "date": "2026-01-01"})
    train = _result([{"device": "cpu", "case": "lraspp_mobilenet_v3_large", "impl": clip, "median_s": 8 / ips,
                      "images_per_s": ips, "clip_share": share}
                     for clip, ips, share in (("fused", 30.0, 0.01), ("torch", 25.0, 0.2), ("none", 31.0, 0.0))],
                    suite="train", settings={"batch_size": 8, "size": 96, "steps": 30})
    args = ["--cpu-json", str(_write(tmp_path / "cpu.json", _result([]))),
            "--gpu-json", str(_write(tmp_path / "gpu.json", gpu)), "--train-json", str(_write(tmp_path / "train.json", train)),
            "--out", str(tmp_path / "RESULTS.md"), "--root", str(tmp_path)]
    assert page.results_main(args) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "`cpu.json` holds no cpu records: every CPU figure is not measured" in text
    gpu_row = next(ln for ln in text.splitlines() if ln.startswith("| lraspp_mobilenet_v3_large") and "2 ms" in ln)
    assert "| 500 us (4.00x, 50% of bound) | 250 us* (8.00x) |" in gpu_row and "not available: because" in gpu_row
    assert "GPU: Some GPU" in text
    assert "| speedup vs torch foreach >= 3.0x | 4.00x | met |" in text
    train_row = next(ln for ln in text.splitlines() if ln.startswith("| lraspp_mobilenet_v3_large | 30"))
    assert "| 1.20x | 1.0% | 20.0% |" in train_row and "batch 8 x 96 px, 30 timed steps" in text
    # a file of the wrong suite is refused
    assert page.results_main([*args[:2], "--train-json", str(tmp_path / "gpu.json")]) == 2



def test_results_page_takes_other_suites_runs(tmp_path):
    rec = {"device": "cpu", "case": "deeplabv3_mobilenet_v3_large", "dtype": "fp32", "mode": "fp32"}
    step = _result([{**rec, "impl": impl, "median_s": t} for impl, t in
                    (("torch", 2e-3), ("folded", 1e-3), ("step", 0.8e-3), ("bound", 0.9e-3))], suite="step")
    args = ["--cpu-json", str(_write(tmp_path / "cpu.json", _result([]))), "--out", str(tmp_path / "R.md"),
            "--root", str(tmp_path), "--suite-json", str(_write(tmp_path / "step.json", step))]
    assert page.results_main(args) == 0
    text = (tmp_path / "R.md").read_text()
    section = text.split("## `segclip bench --suite step`", 1)[1]
    assert "Source: `step.json`" in section
    rows = [ln for ln in section.splitlines() if ln.startswith("| deeplabv3_mobilenet_v3_large")]
    assert "| fp32 | time / step + read <= 1.15x | 1.11x | met |" in rows[0]  # the targets table first
    assert "(2.00x, 90% of bound)" in rows[-1]  # folded: torch / folded, bound / folded
    assert "--suite-json step.json" in text  # the command that wrote the page
    # a clip run has its own flags
    clip = _write(tmp_path / "clip.json", _result([]))
    assert page.results_main([*args[:-1], str(clip)]) == 2


def test_targets_are_evaluated_from_records():
    recs = [schema.Record("cpu", "lraspp_mobilenet_v3_large", impl, "fp32", "active", median_s=t)
            for impl, t in (("torch_foreach", 2.0), ("segclip_cpu", 1.0), ("bound", 0.95))]
    by = {(e["target"].case, e["target"].mode, e["target"].metric): e
          for e in report.evaluate_targets(_result(recs), device="cpu")}
    assert by[("lraspp_mobilenet_v3_large", "active", "time_over_bound")]["status"] == "met"
    assert by[("lraspp_mobilenet_v3_large", "active", "time_over_bound")]["measured"] == pytest.approx(1 / 0.95)
    assert by[("lraspp_mobilenet_v3_large", "active", "speedup")]["measured"] == pytest.approx(2.0)
    assert by[("deeplabv3_resnet50", "inactive", "speedup")]["status"] == "not measured"
    recs[1].median_s = 1.2  # 1.67x, and 1.26x the bound: both targets missed
    by = {e["target"].metric: e for e in report.evaluate_targets(_result(recs), device="cpu")
          if e["target"].case == "lraspp_mobilenet_v3_large" and e["target"].mode == "active"}
    assert by["speedup"]["status"] == by["time_over_bound"]["status"] == "not met"


def test_groups_target_is_against_the_global_call_in_the_same_run():
    case = "deeplabv3_mobilenet_v3_large"
    recs = [schema.Record("cpu", case, impl, "fp32", mode, median_s=t) for mode in ("norm", "clip")
            for impl, t in (("global_kernel", 1.0), ("segclip_global", 1.04), ("segclip_groups", 1.08))]
    got = {e["target"].mode: e for e in report.evaluate_targets(_result(recs, suite="groups"), device="cpu")}
    assert got["norm"]["measured"] == pytest.approx(1.08 / 1.04) and got["norm"]["status"] == "met"
    recs[2].median_s = 1.10  # 1.058x the global call (1.10x the kernel): missed
    got = {e["target"].mode: e for e in report.evaluate_targets(_result(recs, suite="groups"), device="cpu")}
    assert got["norm"]["status"] == "not met" and got["clip"]["status"] == "met"
    rows = report.targets_table(_result(recs, suite="groups"), "cpu")[1]
    assert rows[0][2:] == ["time / segclip global <= 1.05x", "1.06x", "not met"]


def test_pure_pytorch_fallback_shows_compiled_row_not_available(tmp_path):
    env = dict(os.environ, SEGCLIP_BACKEND="torch")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_clip.py"), *SMOKE, "--modes",
                           "inactive", "--no-plot", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    rec = next(r for r in data["records"] if r["impl"] == "segclip_cpu")
    assert rec["available"] is False and rec["median_s"] is None and "SEGCLIP_BACKEND=torch" in rec["reason"]
    assert data["machine"]["command"].startswith("bench_clip.py --models")
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("synthetic_smoke"))
    assert "not available: disabled by SEGCLIP_BACKEND=torch" in row
    assert "not available" in (out / "summary.md").read_text()


def test_noisy_groups_are_marked():
    recs = [schema.Record("cpu", "synthetic_tiny", impl, median_s=1e-3, mode="active", noisy=True,
                          extra={"others_cpu": 0.9, "rounds_discarded": 3}) for impl in ("torch_foreach", "segclip_cpu")]
    result = _result(recs)
    assert "| synthetic_tiny (noisy) |" in report.summary_markdown(result)
    assert "1 of 1 groups still noisy after the retries: cpu/synthetic_tiny/fp32/active" in report.Figures(result).noise_summary()


def test_cuda_dry_run_plans_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli.main(["--device", "cuda", "--dry-run", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_huge" in out and "268,435,456 elements" in out  # the CUDA size of the case
    assert "bandwidth bound" in out and "no CUDA device is visible" in out and "nothing was timed" in out
    # without --dry-run: one line, before anything is built
    assert "--device cuda but no CUDA device is visible" in _usage_error(["--device", "cuda", "--out", str(tmp_path)], capsys)


def test_cuda_timer_logic_with_fake_events(monkeypatch):
    # No GPU here: the CUDA path of measure() runs against host-clock "events", so its blocks,
    # calibration and per-call synchronisation are checked; the GPU test below checks the real thing.
    import time

    from segclip.bench.timers import measure

    syncs = []

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # ms, as CUDA's

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    calls = []

    def fn():
        calls.append(1)
        time.sleep(2e-4)

    for sync in (False, True):
        syncs.clear(), calls.clear()
        m = measure(fn, "cuda", 0.02, 1, description="sleep", sync_each_call=sync)
        assert m.median >= 2e-4 and len(m.times) >= 3 and sum(m.raw_times) >= 0.02  # no upper bound: load
        # blocks: a warm-up call, x10 until a block takes 1 ms, then blocks until 0.02 s are spent;
        # one sync before each block (back-to-back calls inside it), or one more after every call
        steps = round(math.log10(m.number_per_run))  # calibration blocks before the first kept one
        blocks = 1 + steps + len(m.raw_times)
        assert len(calls) == 1 + sum(10 ** i for i in range(steps)) + m.number_per_run * len(m.raw_times)
        assert len(syncs) == blocks + (len(calls) if sync else 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_timer_returns_a_measurement():
    from segclip.bench.timers import measure

    x = torch.randn(2**20, device="cuda")
    for sync in (False, True):
        m = measure(lambda: x.mul_(1.0), "cuda", 0.05, 1, description="mul_", sync_each_call=sync)
        assert 0 < m.median < 0.01 and len(m.times) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50",
                                  "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"])
def test_model_cases_are_the_gradients_a_training_step_produces(name):
    # The benchmark times clipping on gradients of these shapes (from the meta device); a real
    # backward on the real model must give a gradient to exactly those parameters, in that order.
    import torchvision

    from segclip.bench.cases import model_grad_shapes

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21).train()
    model(torch.randn(2, 3, 32, 32))["out"].square().mean().backward()
    assert tuple(tuple(p.grad.shape) for p in model.parameters() if p.grad is not None) == model_grad_shapes(name)


# ----------------------------------------------------------------------------------------------
# Usage errors: one line on stderr, exit 2, and before any timing (the engine must not be reached)


@pytest.fixture()
def no_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before the error was found")
    monkeypatch.setattr("segclip.bench.engine.run", refuse)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
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
    (tmp_path / "x.json").mkdir()
    assert f"--out {tmp_path / 'x.json'}: exists and is not a file" in _usage_error(
        SMOKE + ["--out", str(tmp_path / "x.json")], capsys)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("not json", "not JSON"), ("5", "not a segclip-bench/2 benchmark JSON (its top level is int)"),
    ("[]", "not a segclip-bench/2 benchmark JSON (its top level is list)"),
    ('{"schema": "segclip-bench/1", "records": []}', "not a segclip-bench/2 benchmark JSON (schema 'segclip-bench/1')"),
    ('{"schema": "segclip-bench/2", "records": {}}', "'records' must be a list"),
    ('{"schema": "segclip-bench/2", "records": [{"case": "x", "impl": "torch_foreach", "device": "cpu", "median_s": "abc"}]}',
     "record 0 is not a record"),
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


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["--threads", "x"], "argument --threads: not an integer: 'x'"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["--min-run-time", "-1"], "argument --min-run-time: must be a finite number >= 0, got -1"),
    (["--min-run-time", "inf"], "argument --min-run-time: must be a finite number >= 0, got inf"),
    (["--max-other-load", "nan"], "argument --max-other-load: must be a number >= 0, got nan"),
    (["--retries", "-1"], "argument --retries: must be 0 or more, got -1"),
    (["--models", ""], "--models: no name given"),
    (["--models", "bogus"], "unknown model 'bogus'"),
    (["--dtypes", "fp32 fp64"], "unknown dtype 'fp64'"),
    (["--modes", "sometimes"], "unknown mode 'sometimes'"),
    (["--compare", "a", "b", "c"], "--compare takes OLD.json or OLD.json NEW.json"),
])
def test_bad_values_are_one_line_usage_errors(argv, message, tmp_path, no_run, capsys):
    assert message in _usage_error(["--out", str(tmp_path / "run"), *argv], capsys)


def _settings(*argv):
    p = cli.argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.resolve(p.parse_args([*argv, "--dry-run"]))


def test_lists_space_or_comma_separated_in_one_or_several_arguments():
    args = _settings("--models", "synthetic_smoke synthetic_tiny", "--dtypes", "bf16 fp16", "--modes", "active,inactive")
    assert args.models == ["synthetic_smoke", "synthetic_tiny"]
    assert args.dtypes == ["bf16", "fp16"] and args.modes == ["active", "inactive"]
    assert _settings("--dtypes", "bf16,", "fp16", "bf16").dtypes == ["bf16", "fp16"]
    assert _settings("--models", "all,synthetic_smoke").models == list(clip_suite.ALL_CASES) + ["synthetic_smoke"]
    assert _settings("--models", "all").models == list(clip_suite.ALL_CASES)
    quick = _settings("--quick")
    assert quick.models == list(clip_suite.QUICK_CASES) and quick.dtypes == ["fp32"] and quick.rounds == 1


def test_results_page_refuses_bad_json_in_one_line(tmp_path, capsys):
    for content, message in ((None, "no such file"), ("not json", "not JSON"),
                             ("5", "not a segclip-bench/2 benchmark JSON (its top level is int)")):
        path = tmp_path / "x.json"
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_text(content)
        for flag in ("--cpu-json", "--gpu-json", "--train-json"):
            argv = ["--cpu-json", str(ROOT / "benchmarks" / "results" / "cpu-2026-11-29.json")] if flag != "--cpu-json" else []
            assert page.results_main([*argv, flag, str(path), "--out", str(tmp_path / "R.md")]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"make_results.py: error: {path}: {message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "R.md").exists()


def test_results_page_from_another_folder_writes_the_repository_page(tmp_path, monkeypatch, capsys):
    # A fake repository without CPU JSON: refused. With one: found from any current folder, the page
    # goes to REPO/benchmarks/RESULTS.md and nothing is written in the current folder.
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert page.results_main([], repo_root=repo) == 2
    assert "no --cpu-json given and no " in capsys.readouterr().err
    _write(repo / "benchmarks" / "results" / "cpu-2026-01-01.json", _result([]))
    assert page.results_main([], repo_root=repo) == 0
    text = (repo / "benchmarks" / "RESULTS.md").read_text()
    assert "--cpu-json benchmarks/results/cpu-2026-01-01.json" in text
    assert "`benchmarks/results/cpu-2026-01-01.json` holds no cpu records" in text
    assert not (tmp_path / "benchmarks").exists()
    # the script itself: run from elsewhere, it takes this repository's newest cpu-*.json
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_results.py"), "--out", "R.md"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    newest = sorted((ROOT / "benchmarks" / "results").glob("cpu-*.json"))[-1]
    assert f"--cpu-json benchmarks/results/{newest.name}" in (tmp_path / "R.md").read_text()
    assert not (tmp_path / "benchmarks").exists()


def test_committed_results_page_is_what_the_committed_json_gives(tmp_path):
    # RESULTS.md is generated, never edited: regenerating it from its own command changes nothing.
    committed = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    command = next(ln for ln in committed.splitlines() if ln.startswith("Generated by `")).split("`")[1]
    argv = command.split()[2:]
    assert page.results_main([*argv, "--out", str(tmp_path / "R.md"), "--root", str(ROOT)], repo_root=ROOT) == 0
    assert (tmp_path / "R.md").read_text() == committed


TOY_SUITE = '''
import torch

from segclip.bench.cases import Case
from segclip.bench.suites import Group, Suite, Target


class ToySuite(Suite):
    name, help = "toy", "a test's suite: sum of squares two ways"
    cases = default_cases = quick_cases = ("small", "big")
    modes = ("a", "b")
    baseline = "loop"
    targets = (Target("cpu", "big", "a", "foreach", "speedup", ">=", 1e-9),)

    def impls(self, device):
        return {"loop": ("python loop", None), "foreach": ("torch._foreach_norm", None),
                "gpu_only": ("needs a GPU", "not on this machine")}

    def make_case(self, name, device):
        return Case(name, ((8,),) * (4 if name == "small" else 64), f"{name} list")

    def groups(self, settings, device, result):
        for name in settings.models:
            case = self.make_case(name, device)
            xs = [torch.randn(s) for s in case.shapes]
            for dtype in settings.dtypes:
                for mode in settings.modes:
                    yield Group(case, dtype, mode, {"loop": lambda: sum(float(x.square().sum()) for x in xs),
                                                    "foreach": lambda: torch._foreach_norm(xs)},
                                extra={"mode_seen": mode}, impl_extra={"loop": {"python": True}})


SUITE = ToySuite()
'''


def test_a_suite_is_one_module_that_plugs_in(tmp_path, monkeypatch, capsys):
    # A suite module in another folder on the suites package's path: found by name, listed in
    # --help, timed by the engine, and every report (tables, targets, summary, PNG) works on it.
    from segclip.bench import suites

    (tmp_path / "toy.py").write_text(TOY_SUITE)
    monkeypatch.setattr(suites, "__path__", [*suites.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "segclip.bench.suites.toy", raising=False)
    assert "toy" in suites.names()
    out = tmp_path / "run"
    assert cli.main(["--suite", "toy", "--models", "big", "--min-run-time", "0.001", "--rounds", "2", "--retries", "0",
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    result = schema.load(out / "bench.json")
    assert result["suite"] == "toy" and result["cases"]["cpu"]["big"]["n_tensors"] == 64
    got = {(r.mode, r.impl): r for r in result["records"]}
    assert set(got) == {(m, i) for m in "ab" for i in ("loop", "foreach", "gpu_only")}
    assert got["a", "loop"].extra == {"mode_seen": "a", "python": True, "others_cpu": got["a", "loop"].extra["others_cpu"],
                                      "rounds_discarded": 0}
    assert got["b", "gpu_only"].median_s is None and not got["b", "gpu_only"].available
    assert got["a", "foreach"].median_s > 0 and got["a", "foreach"].n_samples >= 2
    assert "== cpu, fp32, a ==" in text and "not available: not on this machine" in text
    assert "1 of 1 measured targets met" in text
    assert "| big |" in (out / "summary.md").read_text() and (out / "speedup.png").exists()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert f"--suite {{{','.join(suites.names())}}}" in capsys.readouterr().out  # toy among the others
