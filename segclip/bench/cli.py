"""``segclip bench``: the command line of every suite (also ``python -m segclip.bench`` and the
scripts in benchmarks/). Every argument is checked before anything is timed; a bad one is one
line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
from pathlib import Path

from . import suites

PROG = "segclip bench"


def usage_error(prog: str, message: str) -> SystemExit:
    """Prints ``PROG: error: MESSAGE`` (one line, no traceback) and returns SystemExit(2) to raise."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def number(kind: type = float, low: float = 0, *, finite: bool = False):
    """An argparse type: a ``kind`` number >= ``low`` (NaN refused; inf too with ``finite``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if kind is int and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if low else f"must be 0 or more, got {value}")
        if kind is float and (not value >= low or finite and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a {'finite ' * finite}number >= {low:g}, got {text}")
        return value
    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
non_negative_float = number(float, 0)


def names(text: str) -> list[str]:
    """An argparse type: names, space or comma separated."""
    return [x for x in re.split(r"[\s,]+", text) if x]


def prepare_out(path, prog: str, flag: str = "--out") -> Path:
    """Creates the output folder (or a ``.json`` file's folder) before any timing, so that a bad
    path costs nothing, and checks that it can be written; a one-line error and exit 2 otherwise."""
    out = Path(path)
    folder = out.parent if out.suffix == ".json" else out
    if folder.exists() and not folder.is_dir() or out.suffix == ".json" and out.is_dir():
        raise usage_error(prog, f"{flag} {out}: exists and is not a {'file' if out.is_dir() else 'folder'}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise usage_error(prog, f"{flag} {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise usage_error(prog, f"{flag} {out}: cannot write into the folder (permission denied)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    found = suites.all_suites()
    p.add_argument("--suite", choices=list(found), default="clip",
                   help="; ".join(f"{n}: {s.help}" for n, s in found.items()) + " [default: clip]")
    p.add_argument("--quick", action="store_true",
                   help="the suite's quick set (clip: the target cases, fp32, 0.1 s x 1 round: under a minute on 2 cores)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments, build every case and print the plan; time nothing (no GPU needed)")
    p.add_argument("--models", type=names, nargs="+", action="extend", metavar="CASE",
                   help="cases, space or comma separated ('all': the default set, to which others may be added)")
    p.add_argument("--dtypes", type=names, nargs="+", action="extend", metavar="DTYPE", help="gradient dtypes: fp32 bf16 fp16")
    p.add_argument("--modes", type=names, nargs="+", action="extend", metavar="MODE",
                   help="clip: active (max_norm=0) and/or inactive (max_norm=1e30) [default: both]")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="'all' [default]: cpu, and cuda when a GPU is visible")
    p.add_argument("--out", metavar="DIR|FILE.json",
                   help="output folder (bench.json, summary.md, speedup.png), or a .json file (that file only) "
                        "[default: runs/bench/<timestamp>, git-ignored]")
    p.add_argument("--min-run-time", type=number(finite=True), metavar="S",
                   help="time per implementation and round [default: 0.2; --quick 0.1]")
    p.add_argument("--rounds", type=positive_int, help="interleaved rounds merged into one median [default: 3; --quick 1]")
    p.add_argument("--threads", type=positive_int, help="torch threads [default: torch.get_num_threads()]")
    p.add_argument("--sync-each-call", action="store_true",
                   help="CUDA: synchronise after every call (the time a host that waits for each result sees)")
    p.add_argument("--max-other-load", type=non_negative_float, default=0.15, metavar="CORES",
                   help="a round during which other processes kept more cores busy is timed again [default: 0.15]")
    p.add_argument("--retries", type=non_negative_int, help="times a disturbed round is redone [default: 3; --quick 1]")
    p.add_argument("--quiet-timeout", type=non_negative_float, metavar="S",
                   help="longest wait for a quiet moment before a retry [default: 60; --quick 5]")
    p.add_argument("--retry-budget", type=non_negative_float, metavar="S",
                   help="most seconds a run spends on redone rounds and waits [default: 900; --quick 20]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random gradients [default: 0]")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD.json: run, then show how each figure moved (OLD is checked before the run); "
                        "OLD.json NEW.json: compare two runs without running")
    p.add_argument("--threshold", type=non_negative_float, default=0.10,
                   help="--compare flags time ratios above 1 + THRESHOLD [default: 0.10]")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")
    for s in found.values():
        s.add_arguments(p.add_argument_group(f"--suite {s.name}"))


def resolve(args: argparse.Namespace, prog: str = PROG) -> argparse.Namespace:
    """Fills the suite's defaults and checks every value against it; exits (one line) on a bad one."""
    import torch

    suite = suites.get(args.suite)
    preset = suite.presets["quick" if args.quick else "full"]

    def pick(flag: str, given, allowed, default) -> list[str]:
        if given is None:
            return list(default)
        given = [x for names_ in given for x in names_]
        if not given:
            raise usage_error(prog, f"{flag}: no name given")
        if "all" in given and flag == "--models":
            i = given.index("all")
            given = given[:i] + list(suite.default_cases) + given[i + 1:]
        for x in given:
            if x not in allowed:
                raise usage_error(prog, f"unknown {flag[2:-1]} {x!r}; choose from {', '.join(allowed)}"
                                        + (" or all" if flag == "--models" else ""))
        return list(dict.fromkeys(given))

    args.models = pick("--models", args.models, suite.cases, suite.quick_cases if args.quick else suite.default_cases)
    args.dtypes = pick("--dtypes", args.dtypes, suite.dtypes, suite.quick_dtypes if args.quick else suite.dtypes)
    args.modes = pick("--modes", args.modes, suite.modes, suite.modes)
    gpu = torch.cuda.is_available()
    args.devices = ["cpu"] + ["cuda"] * gpu if args.device == "all" else [args.device]
    if args.device == "cuda" and not gpu and not args.dry_run:
        raise usage_error(prog, "--device cuda but no CUDA device is visible (--dry-run plans the run without one)")
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.threads = args.threads or torch.get_num_threads()
    suite.check(args, lambda message: usage_error(prog, message))
    if args.out is None and not args.dry_run:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("runs", "bench", stamp + ("-quick" if args.quick else ""))
    skip = {"func", "compare", "threshold", "no_plot", "no_progress", "out", "command", "bench_command", "dry_run", "device"}
    args.recorded = {k: v for k, v in vars(args).items() if k not in skip}
    args.recorded["timing"] = (f"min_run_time {args.min_run_time} s x {args.rounds} rounds per implementation; "
                               "CPU: torch.utils.benchmark.Timer.blocked_autorange; CUDA: events around back-to-back "
                               f"calls{' (synchronised after each)' if args.sync_each_call else ''}; median over all "
                               "blocks of all rounds; implementations interleaved per round")
    return args


def dry_run(args) -> int:
    """The plan: every case built (shapes only) and every implementation's availability; nothing timed."""
    import torch

    suite = suites.get(args.suite)
    print(f"dry run of --suite {suite.name}: {len(args.models)} case(s) x {len(args.dtypes)} dtype(s) x "
          f"{len(args.modes)} mode(s) on {', '.join(args.devices)}; {suite.count_timings(args)} timings"
          + (f" of >= {args.min_run_time} s" if args.min_run_time else ""))
    for device in args.devices:
        impls = suite.impls(device)
        print(f"{device}: " + ", ".join(label + ("" if why is None else f" (not available: {why})")
                                          for label, why in impls.values()))
        for name in args.models:
            case = suite.make_case(name, device)
            print(f"  {name:<30} {case.n_tensors:>6} tensors {case.n_elements:>13,} elements  {case.description}")
        if device == "cuda" and not torch.cuda.is_available():
            print("no CUDA device is visible: the cuda cases were planned, nothing was timed")
    print("dry run: nothing was timed")
    return 0


def main_args(args: argparse.Namespace, prog: str = PROG) -> int:
    from . import engine, report, schema

    if args.compare is not None and len(args.compare) > 2:
        raise usage_error(prog, "--compare takes OLD.json or OLD.json NEW.json")
    try:  # read and checked before any timing: a wrong file must not cost a run
        compared = [schema.load(p) for p in args.compare or ()]
    except schema.BadJSON as exc:
        raise usage_error(prog, f"--compare {exc}") from None
    if len(compared) == 2:
        print(report.format_compare(*compared, args.threshold, names=tuple(args.compare)))
        return 0
    # (args.command is the segclip CLI's subcommand name: "bench")
    args.bench_command = getattr(args, "bench_command", None) or command_line("segclip", sys.argv[1:])
    args = resolve(args, prog)
    if args.dry_run:
        return dry_run(args)
    out = prepare_out(args.out, prog)
    import torch

    if args.threads != torch.get_num_threads():
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0
    if os.cpu_count() and load > 0.5 * os.cpu_count():
        print(f"note: load average {load:.2f} on {os.cpu_count()} cores: other processes are running, timings are "
              "noisy (all implementations share the noise: they run interleaved)", file=sys.stderr)
    result = engine.run(suites.get(args.suite), args)
    json_path = out if out.suffix == ".json" else out / "bench.json"
    json_path.write_text(schema.dumps(result))
    result = schema.load(json_path)  # every report reads the figures as the file holds them
    print(report.suite_tables(result, markdown=False))
    print(report.format_targets(result))
    written = [json_path]
    if out.suffix != ".json":
        (out / "summary.md").write_text(report.summary_markdown(result))
        written.append(out / "summary.md")
        if not args.no_plot:
            from .plots import plot_speedups

            written += [p for p in [plot_speedups(result, out / "speedup.png")] if p]
    if compared:
        print(report.format_compare(compared[0], result, args.threshold,
                                    names=(args.compare[0], str(json_path))))
    print(f"wrote {', '.join(map(str, written))} ({result['wall_time_s']} s)")
    return 0


def command_line(prog: str, argv: list[str]) -> str:
    return " ".join([prog, *argv])


def register(sub: argparse._SubParsersAction) -> None:
    """``segclip bench`` in the ``segclip`` command line (segclip/cli.py)."""
    p = sub.add_parser("bench", help="benchmark suites (clip: fused_clip_ against clip_grad_norm_)",
                       description="Times each implementation side by side in one run; see docs/benchmarks.md.")
    add_arguments(p)
    p.set_defaults(func=lambda args: main_args(args))


def main(argv: list[str] | None = None, prog: str = "python -m segclip.bench") -> int:
    """``python -m segclip.bench`` and the scripts in benchmarks/: the same as ``segclip bench``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.bench_command = command_line(prog, argv)
    return main_args(args, prog)
