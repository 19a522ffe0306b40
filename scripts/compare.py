#!/usr/bin/env python
"""Train every attention kind at several context lengths and seeds on the synthetic default data, then write
`docs/results.md` (AUROC mean ± std, accuracy, the oracles, throughput, memory) and its plots. Resumable: finished
runs (a folder with all_results.json) are skipped, so rerunning continues where it stopped. Arguments after `--` go
to every `scripts/train.py` run.

    python scripts/compare.py                                          # the default grid, 2 seeds (hours on a CPU)
    python scripts/compare.py --runs full:256 infinity:0 --seeds 42 43 # the ∞-former's key comparison
    python scripts/compare.py --time_limit_minutes 15                  # at most 15 min per run per call (resumes)
    python scripts/compare.py --report_only                            # rewrite the report from finished runs
    python scripts/compare.py --runs full:256 -- --bf16 --transactions t.csv --labels g.csv   # flags for train.py
"""

import argparse
import shlex
import sys
from dataclasses import fields

from txformer.benchmark.compare import CompareConfig, collect_results, run_all, write_report


def parse_args() -> tuple[CompareConfig, list[str]]:
    """The comparison config (one flag per field) and the flags passed on to every training run."""
    argv = sys.argv[1:]
    extra_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    defaults = CompareConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for config_field in fields(CompareConfig):
        default = getattr(defaults, config_field.name)
        help_text = f"{config_field.metadata['help']} Default: {default}."
        if isinstance(default, list):
            item_type = str if isinstance(default[0], str) else int
            parser.add_argument(f"--{config_field.name}", type=item_type, nargs="+", default=default, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(f"--{config_field.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{config_field.name}", type=type(default), default=default, help=help_text)
    return CompareConfig(**vars(parser.parse_args(argv))), extra_args


def main() -> None:
    config, extra_args = parse_args()
    command = shlex.join(["python", "scripts/compare.py", *sys.argv[1:]])
    if config.report_only:
        finished = {result.spec for result in collect_results(config)}
        unfinished = [spec for spec in config.specs() if spec not in finished]
    else:
        unfinished = run_all(config, extra_args)
    if config.dry_run:
        return
    report = write_report(config, unfinished, command)
    print(report.read_text(encoding="utf-8"))
    print(f"wrote {report}" + (f"; {len(unfinished)} runs not finished yet: rerun to continue" if unfinished else ""))


if __name__ == "__main__":
    main()
