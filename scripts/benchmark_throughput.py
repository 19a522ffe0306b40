#!/usr/bin/env python
"""Training and scoring events/s of attention kinds at their natural batch shapes, side by side in one run.

python scripts/benchmark_throughput.py                     # ∞-former 8 x 4,096 against full attention 128 x 256
python scripts/benchmark_throughput.py --num_threads 2 --rounds 5 --ragged
python scripts/benchmark_throughput.py --points full_sdpa:128x256 infinity:8x4096 infinity:32x1024
"""

import sys
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import main


if __name__ == "__main__":
    main()
