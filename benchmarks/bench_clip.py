"""Clipping benchmark: the same as ``segclip bench`` (the code lives in segclip/bench/).

    python benchmarks/bench_clip.py --quick        # < 1 min on 2 cores
    python benchmarks/bench_clip.py                # every case, dtype and mode
    python benchmarks/bench_clip.py --compare runs/bench/<old>/bench.json

See docs/benchmarks.md and ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segclip.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="bench_clip.py"))
