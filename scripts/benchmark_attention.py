#!/usr/bin/env python
"""Benchmark the attention ops, forward + backward: FAVOR+ (ours), performer-pytorch (if installed), SDPA, naive.

    python scripts/benchmark_attention.py                                  # 256 ... 32768 (docs/performer.md)
    python scripts/benchmark_attention.py --lengths 1024 8192 --repeats 3  # a quick check

Prints the table and writes `attention_benchmark.csv` and `attention_benchmark.md` to `--output_dir`.
"""

import argparse
import shlex
import sys
from dataclasses import fields

import torch

from txformer.benchmark.attention import (
    AttentionBenchmarkConfig,
    describe_machine,
    format_markdown,
    run_attention_benchmark,
    write_results,
)
from txformer.cli import run_cli


def parse_args() -> tuple[AttentionBenchmarkConfig, str]:
    """The benchmark config from the command line (one flag per config field) and the output folder."""
    defaults = AttentionBenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for config_field in fields(AttentionBenchmarkConfig):
        default = getattr(defaults, config_field.name)
        help_text = f"{config_field.metadata['help']} Default: {default}."
        if isinstance(default, list):
            parser.add_argument(f"--{config_field.name}", type=int, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(f"--{config_field.name}", type=type(default), default=default, help=help_text)
    parser.add_argument("--output_dir", default="outputs/benchmark_attention", help="Folder of the CSV and Markdown.")
    args = vars(parser.parse_args())
    output_dir = args.pop("output_dir")
    return AttentionBenchmarkConfig(**args), output_dir


def main() -> None:
    config, output_dir = parse_args()
    rows, summary = run_attention_benchmark(config)
    machine = describe_machine(torch.device(config.device))
    command = shlex.join(["python", "scripts/benchmark_attention.py", *sys.argv[1:]])
    markdown = format_markdown(rows, summary, config, machine, command)
    print()
    print(markdown)
    csv_path, markdown_path = write_results(rows, markdown, output_dir)
    print(f"wrote {csv_path} and {markdown_path}")


if __name__ == "__main__":
    run_cli(main)
