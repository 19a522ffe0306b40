#!/usr/bin/env python
"""Scarce labels: with a share of the training customers labelled (10% by default), CoLES pretraining on every
customer plus fine-tuning, against supervised training on that share and with every label (3 seeds, the held-out
customers of `scripts/compare.py`), then `docs/label_study.md`. Resumable like `scripts/compare.py`, whose
every-label runs it shares. Arguments after `--` go to every `scripts/train.py` run.

    python scripts/label_study.py                                      # independent family, 8,000 customers
    python scripts/label_study.py --family order:4000 --report docs/label_study_order.md
    python scripts/label_study.py --report_only                        # rewrite the report from finished runs
"""

import shlex
import sys
from pathlib import Path


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.label_study import LabelStudyConfig, run_study, write_report
from txformer.cli import run_cli, script_parser


def main() -> None:
    argv = sys.argv[1:]
    extra_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own_args = argv[: argv.index("--")] if "--" in argv else argv
    (config,) = script_parser(LabelStudyConfig, __doc__).parse_args_into_dataclasses(args=own_args)
    unfinished = [] if config.report_only else run_study(config, extra_args)
    report = write_report(config, shlex.join(["python", "scripts/label_study.py", *argv]))
    print(report.read_text(encoding="utf-8"))
    print(f"wrote {report}" + (f"; {len(unfinished)} runs not finished yet: rerun to continue" if unfinished else ""))


if __name__ == "__main__":
    run_cli(main)
