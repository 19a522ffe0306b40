#!/usr/bin/env python
"""Benchmark the attention ops, forward + backward: FAVOR+ (ours), performer-pytorch (if installed), the sliding
window (ours), SDPA, naive.

    python scripts/benchmark_attention.py                                       # 256 ... 32768 (docs/performer.md)
    python scripts/benchmark_attention.py --lengths 1024 8192 --min_run_time 3  # two lengths, longer timing

Prints the table and writes `attention_benchmark.csv` and `attention_benchmark.md` to `--output_dir`.
"""

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import AttentionBenchmarkConfig, format_markdown, run_attention_benchmark, write_results
from txformer.cli import run_cli, script_parser
from txformer.machine import describe_machine


@dataclass
class OutputArguments:
    """Where the results go."""

    output_dir: str = field(
        default="outputs/benchmark_attention", metadata={"help": "Folder of the CSV and Markdown."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[AttentionBenchmarkConfig, OutputArguments]:
    """The benchmark config and the output folder (one flag per field)."""
    parser = script_parser((AttentionBenchmarkConfig, OutputArguments), __doc__)
    config, output = parser.parse_args_into_dataclasses(args=argv)
    return config, output


def main() -> None:
    config, output = parse_args()
    rows, summary = run_attention_benchmark(config)
    command = shlex.join(["python", "scripts/benchmark_attention.py", *sys.argv[1:]])
    markdown = format_markdown(rows, summary, config, describe_machine(), command)
    print()
    print(markdown)
    csv_path, markdown_path = write_results(rows, markdown, output.output_dir)
    print(f"wrote {csv_path} and {markdown_path}")


if __name__ == "__main__":
    run_cli(main)
