"""Writes benchmarks/RESULTS.md from benchmark JSON files; the page is never edited by hand.

    python benchmarks/make_results.py                              # newest benchmarks/results/cpu-*.json
    python benchmarks/make_results.py --cpu-json benchmarks/results/cpu-<date>.json \\
        [--gpu-json GPU.json] [--train-json TRAIN.json]

A figure the JSON files do not hold reads "not measured". The code lives in segclip/bench_report.py
(accepted JSON layouts: its docstring and docs/benchmarks.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segclip.bench_report import results_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(results_main())
