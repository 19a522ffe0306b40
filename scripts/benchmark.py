#!/usr/bin/env python
"""Speed and peak memory against sequence length of every attention kind and its peers (exact SDPA, naive softmax,
performer-pytorch), at three levels (attention layer, model forward, training step), plus the ∞-former check of one
89,000-event history against a 2,000-event one. Writes CSV, Markdown, JSON and PNG plots to `--output_dir`.

    python scripts/benchmark.py                                   # CPU defaults (docs/benchmark.md)
    python scripts/benchmark.py --levels train --lengths 256 1024                   # a quick look, no check
    python scripts/benchmark.py --lengths 1024 4096 16384 65536 --batch_size 16 --dtype bfloat16 \\
        --max_seconds 30                                          # a GPU
"""

import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_results
from benchmarks.suite import BenchmarkConfig, run_benchmark
from txformer.cli import run_cli, script_parser


@dataclass
class OutputArguments:
    """Where the results go."""

    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Folder of the results."})
    figures_dir: str | None = field(
        default=None, metadata={"help": "Also copy the PNG plots here (e.g. docs/figures)."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[BenchmarkConfig, OutputArguments]:
    """The benchmark config and the output folders (one flag per field)."""
    config, output = script_parser((BenchmarkConfig, OutputArguments), __doc__).parse_args_into_dataclasses(args=argv)
    return config, output


def main() -> None:
    config, output = parse_args()
    command = shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    result = run_benchmark(config)
    paths = write_results(result, config, command, output.output_dir)
    print()
    print(paths[1].read_text(encoding="utf-8"))
    if output.figures_dir is not None:
        for path in paths:
            if path.suffix == ".png":
                shutil.copy(path, output.figures_dir)
    print("wrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    run_cli(main)
