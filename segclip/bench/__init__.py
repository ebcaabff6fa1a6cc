"""One benchmark engine for every suite and device (docs/benchmarks.md). Its rooms, in the order
the data flows:

    cases.py     parameter sets: model gradient shapes, synthetic lists, the gradients built from them
    timers.py    CPU: torch.utils.benchmark; CUDA: events around back-to-back calls; side-by-side rounds
    suites/      one module per suite (clip, train, ...), each a Suite: what to time (plug-in interface)
    engine.py    runs a suite: machine, settings, progress bar, the default side-by-side loop
    schema.py    the one JSON layout (segclip-bench/2) every suite writes on every device
    report.py    the tables (terminal, summary.md, results page), headline targets, --compare
    plots.py     speedup.png
    page.py      benchmarks/RESULTS.md from segclip-bench/2 files (benchmarks/make_results.py)
    cli.py       ``segclip bench``: arguments, checks, --dry-run, outputs

Each module imports only modules above it in this list (suites/ imports cases and schema).
"""

from .._quiet import silence_cuda_home_notice

silence_cuda_home_notice()  # before torch.utils.benchmark is imported (see note: [CUDA_HOME notice])

from .cli import main, non_negative_float, non_negative_int, positive_int, prepare_out, register, usage_error  # noqa: E402

__all__ = ["main", "register", "positive_int", "non_negative_int", "non_negative_float", "prepare_out", "usage_error"]
