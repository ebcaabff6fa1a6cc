"""The `segclip` command itself: --version, a bare `segclip`, and no torch CUDA_HOME notice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import segclip
from conftest import ROOT
from segclip import cli

NOTICE = "No CUDA runtime is found"


def _segclip(*args, env=None, timeout=300, python_flags=()):
    return subprocess.run([sys.executable, *python_flags, "-m", "segclip", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_version_matches_the_package_metadata(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert segclip.__version__ == version
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"segclip {version} (torch {torch.__version__})"


def test_bare_segclip_prints_the_help_and_exits_zero(capsys):
    assert cli.main([]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: segclip") and not err
    for command in ("demo", "train", "eval", "predict", "plot", "bench"):
        assert f"    {command} " in out
    with pytest.raises(SystemExit) as info:  # a wrong command is still a usage error
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_the_filter_drops_only_the_cuda_home_notice(caplog):
    cli.silence_cuda_home_notice()
    cli.silence_cuda_home_notice()  # idempotent: one filter
    logger = logging.getLogger("torch.utils.cpp_extension")
    assert sum(isinstance(f, cli._NoCudaRuntimeNotice) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/x")
        logger.warning("some other warning from cpp_extension")
    assert [r.getMessage() for r in caplog.records] == ["some other warning from cpp_extension"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the notice only without a GPU")
def test_segclip_commands_do_not_print_torchs_cuda_home_notice(tmp_path):
    # torch takes CUDA_HOME from the environment as it is: a fake toolkit folder triggers the notice
    # on any machine without a GPU, toolkit installed or not.
    env = dict(os.environ, CUDA_HOME=str(tmp_path))
    control = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert NOTICE in control.stderr  # the condition this test guards against is really there
    # `segclip bench` imports torch.utils.benchmark, which imports torch.utils.cpp_extension
    # (-X importtime lists every import on stderr: the test shows that the module did load).
    done = _segclip("bench", "--models", "synthetic_smoke", "--dtypes", "fp32", "--modes", "active",
                    "--rounds", "1", "--min-run-time", "0.001", "--device", "cpu", "--no-progress",
                    "--retries", "0", "--no-plot", "--out", str(tmp_path / "bench"), env=env,
                    python_flags=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.utils.cpp_extension\n" in done.stderr
    assert NOTICE not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the notice only without a GPU")
@pytest.mark.parametrize("script", ["benchmarks/make_results.py", "benchmarks/bench_clip.py",
                                    "benchmarks/bench_train.py"])
def test_benchmark_scripts_do_not_print_torchs_cuda_home_notice(script, tmp_path):
    """The scripts import segclip.bench directly (not through segclip.cli.main): the package itself
    installs the filter before torch.utils.benchmark is imported."""
    env = dict(os.environ, CUDA_HOME=str(tmp_path))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-X", "importtime", str(root / script), "--help"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.utils.cpp_extension\n" in done.stderr  # the module that logs it did load
    assert NOTICE not in done.stderr
