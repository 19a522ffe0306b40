#!/usr/bin/env python
"""Peak training memory of reversible layers against ordinary ones, for every attention kind: 1 and 8 layers of each
at 4,096 events, side by side in one run, with the ratios (docs/reversible_layers.md).

python scripts/benchmark_reversible.py                                   # every kind, 4 histories of 4,096 events
python scripts/benchmark_reversible.py --kinds full --batch_size 1 --num_threads 1
python scripts/benchmark_reversible.py --device cuda --length 16384 --layers 1 16
"""

import sys
import time
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reversible import ReversibleBenchmarkConfig, format_reversible, run_reversible_benchmark
from txformer.cli import run_cli, script_parser


def parse_args(argv: list[str] | None = None) -> ReversibleBenchmarkConfig:
    """The benchmark config (one flag per field)."""
    (config,) = script_parser(ReversibleBenchmarkConfig, __doc__).parse_args_into_dataclasses(args=argv)
    return config


def main() -> None:
    config = parse_args()
    started = time.perf_counter()
    result = run_reversible_benchmark(config)
    print()
    print(format_reversible(result, config))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
