"""The command line: the four subcommands exist, through `python -m segclip` and the `segclip`
console script, and --help documents every flag with its default."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segclip.cli import COMMAND_MODULES, build_parser

SUBCOMMANDS = ("train", "eval", "predict", "plot")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_registered_next_to_the_other_commands():
    assert "segclip.train.cli" in COMMAND_MODULES and "segclip.demo" in COMMAND_MODULES
    assert set(SUBCOMMANDS) <= set(_subparsers(build_parser()))


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_documents_every_flag_with_its_default(command, capsys):
    sub = _subparsers(build_parser())[command]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    formatter = sub.formatter_class(prog="segclip")
    n_flags = 0
    for action in sub._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"segclip {command} {flag} has no help text"
        assert flag in text
        if action.option_strings:
            n_flags += 1
            shown = formatter._get_help_string(action)
            assert "%(default)s" in shown or shown.endswith("(required)"), f"{flag}: {shown!r}"
            default = "(required)" if action.required else f"(default: {action.default})"
            assert default in text, f"{flag}: {default} not in the help"
    assert text.count("(default: ") + text.count("(required)") >= n_flags


def test_train_help_mentions_key_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--clip {fused,torch,none}", "(default: fused)", "--max-norm", "(default: 2.0)",
                     "--model", "(default: lraspp_mobilenet_v3_large)", "--data", "(default: synthetic)",
                     "--max-nonfinite", "(default: 20)", "--resume", "--amp", "--sync-bn", "torchrun"):
        assert expected in text, expected


def test_python_m_segclip_and_console_script():
    r = subprocess.run([sys.executable, "-m", "segclip", "plot", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--percentile" in r.stdout
    script = Path(sys.executable).parent / "segclip"
    if not script.exists():
        script = shutil.which("segclip")
        if script is None:
            pytest.skip("the segclip console script is not installed in this environment")
    r = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-norm" in r.stdout


def test_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--clip", "sometimes"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--norm-type", "two"])
    assert "not a number" in capsys.readouterr().err
    args = build_parser().parse_args(["train", "--norm-type", "inf", "--bn-momentum", "model"])
    assert args.norm_type == float("inf") and args.bn_momentum is None


def test_out_of_range_values_are_one_line_errors(tmp_path, capsys):
    from segclip.cli import main

    assert main(["train", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["train", "--scale-min", "2", "--scale-max", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--scale-min <= --scale-max" in capsys.readouterr().err


def test_norm_type_batch_size_and_device_errors_are_one_line(tmp_path, capsys):
    from segclip.cli import main

    for p in ("0", "-1", "nan"):
        assert main(["train", "--norm-type", p, "--out", str(tmp_path / "r")]) == 2
        assert "--norm-type must be a positive number or inf" in capsys.readouterr().err
    assert main(["train", "--model", "deeplabv3_mobilenet_v3_large", "--batch-size", "1",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "needs --batch-size 2 or more" in err and "BatchNorm" in err and "1x1" in err
    for device, message in (("gpu", "--device gpu: not a device"), ("cuda:x", "--device cuda:x: not a device")):
        assert main(["train", "--device", device, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    import torch
    if not torch.cuda.is_available():
        for command in (["train"], ["eval", "--checkpoint", "x.pt"],
                        ["predict", "--checkpoint", "x.pt", "--images", "x", "--out", str(tmp_path / "p")]):
            assert main([*command, "--device", "cuda", *(["--out", str(tmp_path / "r")] if command == ["train"] else [])]) == 2
            assert "--device cuda: CUDA is not available here" in capsys.readouterr().err


def test_a_run_folder_is_not_reused_without_resume(tmp_path, capsys):
    from segclip.cli import main

    # A folder with last.pt (a completed epoch) is refused. One with logs only (a run stopped in its
    # first epoch) is started afresh: see test_train_checkpoint.py.
    out = tmp_path / "run"
    out.mkdir()
    for name in ("steps.jsonl", "last.pt"):
        (out / name).write_text("")
    assert main(["train", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run (steps.jsonl, last.pt)" in err and f"--resume {out / 'last.pt'}" in err
    (tmp_path / "plots-only").mkdir()  # a folder without a run is fine: fails later, for another reason
    assert main(["train", "--out", str(tmp_path / "plots-only"), "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["demo", "--max-norm", "-1"], "argument --max-norm: must be a number >= 0, got -1"),
    (["demo", "--size", "0"], "argument --size: must be at least 1, got 0"),
])
def test_demo_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_runs_every_available_backend_cuda_included(monkeypatch, capsys):
    # No GPU needed: the cuda backend is reported available, its gradient copy stays on the CPU and
    # its calls go to the cpu kernel; what is checked is that demo runs it (and torch on its device).
    import dataclasses

    import segclip
    from segclip import demo
    from segclip.cli import main

    real_backends, real_clip = segclip.backends, segclip.fused_clip_
    monkeypatch.setattr(segclip, "backends", lambda: {
        k: dataclasses.replace(v, available=True, reason=None) if k == "cuda" else v
        for k, v in real_backends().items()})
    monkeypatch.setattr(segclip, "fused_clip_", lambda ps, max_norm, backend=None, **kw: real_clip(
        ps, max_norm, backend="cpu" if backend == "cuda" else backend, **kw))
    monkeypatch.setattr(demo, "CUDA_DEVICE", "cpu")
    assert main(["demo", "--size", "16", "--repeats", "1"]) == 0
    rows = {ln.split()[0] + (ln.split()[1] if ln.split()[1].startswith("[") else ""): ln
            for ln in capsys.readouterr().out.splitlines() if ln.startswith(("torch.nn", "segclip.fused"))}
    assert set(rows) == {"torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grad_norm_[cuda]",
                         "segclip.fused_clip_[cpu]", "segclip.fused_clip_[cuda]", "segclip.fused_clip_[torch]"}
    norms = {float(ln.split()[-6]) for ln in rows.values()}
    assert max(norms) - min(norms) < 1e-3 * max(norms)  # every implementation saw the same gradients
    assert all("norm after clipping 1.000000" in ln for ln in rows.values())


@pytest.mark.parametrize("argv, message", [
    (["train", "--crop-size", "-5"], "--crop-size must be at least 16, got -5"),
    (["train", "--crop-size", "0"], "--crop-size must be at least 16, got 0"),
    (["train", "--eval-size", "0"], "--eval-size must be at least 16, got 0"),
    (["train", "--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
    (["train", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["train", "--max-norm", "-1"], "--max-norm must be a number >= 0, got -1.0"),
    (["train", "--max-norm", "nan"], "--max-norm must be a number >= 0, got nan"),
    (["train", "--momentum", "1"], "--momentum must be between 0 and 1 (excluded), got 1.0"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["train", "--warmup-iters", "-1"], "--warmup-iters must be at least 0, got -1"),
    (["train", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
    (["train", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["train", "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["train", "--num-classes", "1"], "--num-classes must be between 2 and 255, got 1"),
    (["train", "--bn-momentum", "1.5"], "--bn-momentum must be between 0 and 1, got 1.5"),
    (["train", "--synthetic-size", "8"], "--synthetic-size must be at least 16, got 8"),
    (["train", "--scale-min", "0"], "--scale-min must be a positive finite number, got 0.0"),
    (["eval", "--checkpoint", "x.pt", "--eval-size", "-3"], "--eval-size must be at least 16, got -3"),
    (["eval", "--checkpoint", "x.pt", "--eval-size", "0"], "--eval-size must be at least 16, got 0"),
    (["eval", "--checkpoint", "x.pt", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["predict", "--checkpoint", "x.pt", "--images", "x", "--out", "o", "--size", "-3"],
     "--size must be 0 or at least 16, got -3"),
    (["predict", "--checkpoint", "x.pt", "--images", "x", "--out", "o", "--alpha", "2"],
     "--alpha must be between 0 and 1, got 2.0"),
    (["predict", "--checkpoint", "x.pt", "--images", "x", "--out", "o", "--alpha", "-1"],
     "--alpha must be between 0 and 1, got -1.0"),
    (["predict", "--checkpoint", "x.pt", "--images", "x", "--out", "o", "--void-below", "1.5"],
     "--void-below must be between 0 and 1, got 1.5"),
    (["plot", "run", "--percentile", "101"], "--percentile must be between 0 and 100, got 101.0"),
])
def test_every_numeric_option_is_checked_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    from segclip.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may be created: the check comes before any work
    assert main([*argv, *(["--out", "r"] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err == f"segclip {argv[0]}: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_checks_accept_what_they_should():
    from segclip.train import options

    assert options.at_least(1)(1) is None and options.at_least(1)(0) == "at least 1"
    assert options.positive()(float("inf")) is None and options.positive()(float("nan"))
    assert options.positive_finite()(float("inf")) and options.non_negative()(0.0) is None
    assert options.between(0, 1)(1.0) is None and options.between(0, 1, high_open=True)(1.0)
    assert options.zero_or_at_least(16)(0) is None and options.zero_or_at_least(16)(15)
    assert options.at_least(0)(True)  # a bool is not a number here


def test_typed_options_win_on_resume_even_when_they_equal_the_default():
    from segclip.train.trainer import resume_args

    saved = {"epochs": 4, "max_norm": 8.0, "deterministic": True, "lr": 0.1, "amp": True,
             "out": "/elsewhere", "unknown_future_option": 3}
    args = build_parser().parse_args(["train", "--resume", "x.pt", "--epochs", "10", "--max-norm", "2.0",
                                      "--no-deterministic"])
    notes = []
    resume_args(args, saved, notes.append)
    assert (args.epochs, args.max_norm, args.deterministic) == (10, 2.0, False)  # typed, = the defaults
    assert (args.lr, args.amp) == (0.1, True)                                     # not typed: the checkpoint's
    assert args.out is None and not hasattr(args, "unknown_future_option")         # never resumed / unknown
    assert notes == ["resume: from the checkpoint's arguments: --lr 0.1, --amp True"]
    # Without typing anything, everything resumable comes from the checkpoint.
    args = build_parser().parse_args(["train", "--resume", "x.pt"])
    resume_args(args, saved, notes.append)
    assert (args.epochs, args.max_norm, args.deterministic) == (4, 8.0, True)
