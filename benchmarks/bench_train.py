#!/usr/bin/env python3
"""Training throughput with fused, torch and no clipping: ``segclip bench --suite train`` (the code
lives in segclip/bench/suites/train.py; docs/benchmarks.md).

    python benchmarks/bench_train.py                       # a small CPU set, about 2 minutes
    python benchmarks/bench_train.py --models fcn_resnet50 --size 256 --batch-size 8 --out results/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from segclip.bench import main as bench_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return bench_main(["--suite", "train", *(sys.argv[1:] if argv is None else argv)], prog="bench_train.py")


if __name__ == "__main__":
    sys.exit(main())
