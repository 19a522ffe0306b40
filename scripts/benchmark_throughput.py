#!/usr/bin/env python
"""Training and scoring events/s of attention kinds at their natural batch shapes, side by side in one run.

python scripts/benchmark_throughput.py                     # ∞-former 8 x 4,096 against full attention 128 x 256
python scripts/benchmark_throughput.py --num_threads 2 --rounds 5 --ragged
python scripts/benchmark_throughput.py --points full_sdpa:128x256 infinity:8x4096 infinity:32x1024
python scripts/benchmark_throughput.py --points full_sdpa:64x256 infinity:64x256 \
    "infinity[ltm_read_current_segment=false]:64x256"   # config fields of one point
"""

import sys
import time
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import ThroughputConfig, format_throughput, run_throughput
from txformer.cli import run_cli, script_parser


def parse_args(argv: list[str] | None = None) -> ThroughputConfig:
    """The throughput config (one flag per field)."""
    (config,) = script_parser(ThroughputConfig, __doc__).parse_args_into_dataclasses(args=argv)
    return config


def main() -> None:
    config = parse_args()
    started = time.perf_counter()
    rows, loads = run_throughput(config)
    print()
    print(format_throughput(rows, config, loads))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
