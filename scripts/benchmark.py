#!/usr/bin/env python
"""Speed and peak memory against sequence length of every attention kind and its peers (exact SDPA, naive softmax,
performer-pytorch), at three levels (attention layer, model forward, training step), plus the ∞-former check of one
89,000-event history against a 2,000-event one. Writes CSV, Markdown, JSON and PNG plots to `--output_dir`.

    python scripts/benchmark.py                                   # CPU defaults (docs/benchmark.md)
    python scripts/benchmark.py --levels train --lengths 256 1024 --check_lengths   # a quick look, no check
    python scripts/benchmark.py --lengths 1024 4096 16384 65536 --batch_size 16 --dtype bfloat16 \\
        --max_seconds 30                                          # a GPU
"""

import argparse
import shlex
import shutil
import sys
from dataclasses import fields

from txformer.benchmark.report import write_results
from txformer.benchmark.suite import BenchmarkConfig, run_benchmark
from txformer.cli import run_cli


def parse_args() -> tuple[BenchmarkConfig, str, str | None]:
    """The benchmark config (one flag per field), the output folder and the optional figures folder."""
    defaults = BenchmarkConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for config_field in fields(BenchmarkConfig):
        default = getattr(defaults, config_field.name)
        help_text = f"{config_field.metadata['help']} Default: {default}."
        if isinstance(default, list):
            item_type = str if default and isinstance(default[0], str) else int
            parser.add_argument(f"--{config_field.name}", type=item_type, nargs="*", default=default, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(
                f"--{config_field.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(f"--{config_field.name}", type=type(default), default=default, help=help_text)
    parser.add_argument("--output_dir", default="outputs/benchmark", help="Folder of the results.")
    parser.add_argument("--figures_dir", default=None, help="Also copy the PNG plots here (e.g. docs/figures).")
    args = vars(parser.parse_args())
    output_dir, figures_dir = args.pop("output_dir"), args.pop("figures_dir")
    return BenchmarkConfig(**args), output_dir, figures_dir


def main() -> None:
    config, output_dir, figures_dir = parse_args()
    command = shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    result = run_benchmark(config)
    paths = write_results(result, config, command, output_dir)
    print()
    print(paths[1].read_text(encoding="utf-8"))
    if figures_dir is not None:
        for path in paths:
            if path.suffix == ".png":
                shutil.copy(path, figures_dir)
    print("wrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    run_cli(main)
