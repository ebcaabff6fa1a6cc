"""Writes benchmarks/RESULTS.md from segclip-bench/2 JSON files; the page is never edited by hand.

    python benchmarks/make_results.py                              # newest benchmarks/results/cpu-*.json
    python benchmarks/make_results.py --cpu-json benchmarks/results/cpu-<date>.json \\
        [--gpu-json GPU.json] [--train-json TRAIN.json]

Works from any folder: the page goes to benchmarks/RESULTS.md of this checkout (--out to change),
and without --cpu-json the newest benchmarks/results/cpu-*.json of this checkout is used (none
found: an error, exit 2). The code lives in segclip/bench/page.py.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: default --root, and --out is ROOT/benchmarks/RESULTS.md
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from segclip.bench.page import results_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(results_main(repo_root=ROOT))
