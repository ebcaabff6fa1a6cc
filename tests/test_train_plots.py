"""segclip plot: the PNG charts exist and are PNGs; the max_norm suggestion is the documented
percentile (checked against a value worked out by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segclip.cli import main
from segclip.train.plots import suggest_max_norm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("loss.png", "lr.png", "miou.png", "grad_norm.png", "grad_norm_hist.png", "timing.png")


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder written by hand: 2 epochs of 50 steps, norms 1..100 (steps 1-10 are warmup)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"args": {"model": "m", "max_norm": 90.0, "clip": "fused",
                                                         "norm_type": 2.0}, "warmup_iters": 10}))
    with open(d / "steps.jsonl", "w") as f:
        for s in range(1, 101):
            f.write(json.dumps({"step": s, "epoch": 1 + (s - 1) // 50, "lr": 0.1 * (1 - s / 100), "loss": 3.0 / s,
                                "grad_norm": float(s), "clipped": s > 90, "skipped": False, "t_data": 0.001,
                                "t_forward": 0.01, "t_backward": 0.02, "t_clip": 0.001, "t_step": 0.002}) + "\n")
        f.write('{"step": 101, "epo')  # a torn last line (killed writer) is ignored
    with open(d / "epochs.jsonl", "w") as f:
        for e in range(1, 3):  # epochs count from 1 in the logs
            f.write(json.dumps({"epoch": e, "train_loss": 0.5 / e, "val_mean_iou": 0.1 + 0.2 * e,
                                "val_pixel_accuracy": 0.75 + 0.05 * e}) + "\n")
    return d


def test_plot_writes_png_charts(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name in CHARTS:
        path = run_dir / "plots" / name
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000, name
        assert str(path) in out
    # Norms after warmup are 11..100 (90 values); numpy's linear 95th percentile of them is
    # 11 + 0.95 * 89 = 95.55. The median is 55.5.
    text = " ".join(out.split())  # the paragraph is wrapped
    assert "suggested max_norm = 95.5" in text and "median 55.5" in text
    assert "clipped 10.0% of steps" in text
    assert all(len(line) <= 100 for line in out.splitlines() if not line.startswith("/"))


def test_suggestion_by_hand():
    value, median, why = suggest_max_norm([float(v) for v in range(1, 101)], percentile=90, skip=0)
    assert value == pytest.approx(1 + 0.9 * 99) and median == pytest.approx(50.5)
    assert "90th percentile" in why
    # Too few norms after warmup: all are used.
    value, _, _ = suggest_max_norm([1.0, 2.0, 3.0, None, float("nan")], percentile=50, skip=2)
    assert value == 2.0


def test_plot_of_a_folder_without_logs_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "steps.jsonl is missing or empty" in capsys.readouterr().err


def test_plot_to_another_folder(run_dir, tmp_path, monkeypatch):
    from segclip.train.runlog import default_run_dir

    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded in RUN_DIR and --out (and --runs-root)
    assert main(["plot", "~/run", "--out", "~/charts", "--percentile", "99"]) == 0
    assert default_run_dir("m", "~/runs").parent == tmp_path / "runs"
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == sorted(CHARTS)


def _write_run(d, norms):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"args": {"model": "m", "max_norm": 2.0, "clip": "fused"},
                                               "warmup_iters": 0}))
    with open(d / "steps.jsonl", "w") as f:
        for s, g in enumerate(norms, 1):
            # json.dumps writes NaN / Infinity, which json.loads reads back (as the trainer's log may hold)
            f.write(json.dumps({"step": s, "epoch": 1, "lr": 0.1, "loss": None if g is None else 1.0,
                                "grad_norm": g, "clipped": g is not None and g > 2.0, "skipped": g is None,
                                "t_data": 0.001, "t_forward": 0.01, "t_backward": 0.02, "t_clip": 0.001,
                                "t_step": 0.002}) + "\n")
    return d


@pytest.fixture()
def titles(monkeypatch):
    """The first line of each chart's title, by file name."""
    from matplotlib.figure import Figure

    seen = {}
    real = Figure.savefig

    def savefig(self, path, *args, **kwargs):
        seen[Path(path).name] = self.axes[0].get_title().splitlines()[0]
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


@pytest.mark.filterwarnings("error")
def test_plot_of_a_run_where_every_step_was_skipped(tmp_path, capsys, titles):
    d = _write_run(tmp_path / "run", [None] * 5)
    assert main(["plot", str(d)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (d / "plots").iterdir()) == sorted(set(CHARTS) - {"grad_norm_hist.png"})
    assert "no max_norm suggested and grad_norm_hist.png not drawn: no finite gradient norm was logged" in out
    assert "0.0% of 0 steps clipped (5 without a finite norm)" in titles["grad_norm.png"]


@pytest.mark.filterwarnings("error")  # no numpy RuntimeWarning from NaN or inf
def test_plot_ignores_nan_and_infinite_norms(tmp_path, capsys, titles):
    norms = [1.0, float("nan"), 3.0, float("inf"), None, 1.5, -float("inf")]
    d = _write_run(tmp_path / "run", norms)
    assert "NaN" in (d / "steps.jsonl").read_text()
    assert main(["plot", str(d)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (d / "plots").iterdir()) == sorted(CHARTS)
    # the 3 finite norms 1, 3, 1.5: median 1.5; one of them (3) above max_norm 2
    assert "of the 3 gradient norms logged (median 1.5)" in out
    assert "33.3% of 3 steps clipped (4 without a finite norm)" in titles["grad_norm.png"]
    assert "(3 steps, 4 without a finite norm)" in titles["grad_norm_hist.png"]


def test_plot_out_that_is_a_file_is_a_one_line_error(run_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["plot", str(run_dir), "--out", str(afile)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"segclip plot: error: --out {afile}: exists and is not a folder"
    # any other OSError (here from mkdir under a file) is one line naming the path too
    assert main(["plot", str(run_dir), "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"segclip plot: error: {afile / 'sub'}: Not a directory"


def test_plot_draws_logged_group_norms(run_dir, monkeypatch):
    import matplotlib.figure

    drawn = {}
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, fname, *a, **kw):  # what each chart draws: its lines' labels and data
        drawn[Path(fname).name] = {line.get_label(): line.get_ydata() for ax in fig.axes for line in ax.get_lines()}
        return savefig(fig, fname, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    assert main(["plot", str(run_dir)]) == 0
    assert not any(k.endswith(" norm") for k in drawn["grad_norm.png"])  # nothing logged: no group line
    lines = (run_dir / "steps.jsonl").read_text().splitlines()[:-1]
    with open(run_dir / "steps.jsonl", "w") as f:
        for line in lines:
            r = json.loads(line)
            r["group_norms"] = {"backbone": r["grad_norm"] * 0.8,
                                "classifier": None if r["step"] == 5 else r["grad_norm"] * 0.3}
            f.write(json.dumps(r) + "\n")
    assert main(["plot", str(run_dir)]) == 0
    got = drawn["grad_norm.png"]
    assert list(got["backbone norm"]) == pytest.approx([0.8 * s for s in range(1, 101)])
    assert list(got["classifier norm"]) == pytest.approx([0.3 * s for s in range(1, 101) if s != 5])  # null skipped
    assert (run_dir / "plots" / "grad_norm.png").read_bytes()[:8] == PNG_MAGIC
