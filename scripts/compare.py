#!/usr/bin/env python
"""On each synthetic data family, train every attention kind at several context lengths and seeds, and the LightGBM
baseline on the same split, then write `docs/results.md` (AUROC mean ± std, accuracy, the oracles, the margin over
the baseline, throughput, memory) and its plots. Resumable: finished
runs (a folder with all_results.json) are skipped, so rerunning continues where it stopped. Arguments after `--` go
to every `scripts/train.py` run.

    python scripts/compare.py                                          # the default grid, 3 seeds (hours on a CPU)
    python scripts/compare.py --families order:4000 --runs full:256 --seeds 42   # one family, one configuration
    python scripts/compare.py --no_baseline                            # models only
    python scripts/compare.py --time_limit_minutes 15                  # at most 15 min per run per call (resumes)
    python scripts/compare.py --report_only                            # rewrite the report from finished runs
    python scripts/compare.py --runs full:256 -- --bf16 --transactions t.csv --labels g.csv   # flags for train.py
    python scripts/compare.py --families long:2000 --train_max_length 512 -- --config_overrides pooling=mean_sum
"""

import shlex
import sys
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compare import CompareConfig, collect_results, run_all, write_report
from txformer.cli import run_cli, script_parser


def parse_args(argv: list[str] | None = None) -> tuple[CompareConfig, list[str]]:
    """The comparison config (one flag per field) and the flags after `--`, passed on to every training run."""
    argv = sys.argv[1:] if argv is None else argv
    extra_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    (config,) = script_parser(CompareConfig, __doc__).parse_args_into_dataclasses(args=argv)
    return config, extra_args


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
    run_cli(main)
