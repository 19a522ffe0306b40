#!/usr/bin/env python
"""Trained models scored on many fresh customers of the same generator: a precise held-out AUROC.

The comparison holds out 10% of the labelled customers (275 on `order:4000`, 140 on `long:2000`), so an AUROC
there has a standard error of about 0.03, as large as the differences being measured. This draws `--num_customers`
other customers with the generator parameters of the comparison's data (same family and data seed, another number
of customers, so other draws), scores them with each trained folder (`scripts/predict.py`, the folder's own window)
and reports the AUROC next to the Bayes oracle of that window. On the order family it adds the plug-in Bayes
classifier of the family's model class (`TransitionCountClassifier`) fitted on the comparison's training customers,
the yardstick of what those labels allow.

    python -m benchmarks.fresh_customers --family order --model_dirs outputs/compare/order/full-256-seed42
"""

import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from transformers import HfArgumentParser

from txformer.cli import run_cli
from txformer.data import build_customer_dataset
from txformer.data.synthetic import SyntheticOracle
from txformer.prediction import PredictionArguments, predict, report_path
from txformer.training import DataArguments, data_files

from .order_learnability import LearnabilityConfig, comparison_customers, fit_cross_validated, last


@dataclass
class FreshCustomersConfig:
    """The fresh customers, the comparison data they share their generator with, and the folders to score."""

    model_dirs: list[str] = field(metadata={"help": "Trained output folders (`scripts/train.py`) to score."})
    family: str = field(default="order", metadata={"help": "Synthetic family of the comparison's data."})
    comparison_customers: int = field(default=4000, metadata={"help": "Customers of the comparison's data."})
    num_customers: int = field(default=5000, metadata={"help": "Fresh customers to score (all, labelled or not)."})
    seed: int = field(default=0, metadata={"help": "Data seed of the comparison's data (its generator parameters)."})
    plugin_window: int = field(default=256, metadata={"help": "Events the order family's plug-in classifier reads."})

    def __post_init__(self):
        if self.num_customers == self.comparison_customers:
            raise ValueError(
                "--num_customers must differ from --comparison_customers: with the same seed they are the same draws."
            )


def synthetic_folder(family: str, num_customers: int, seed: int) -> tuple[Path, Path, Path]:
    """(transactions, labels, folder) of generated data, from the package's cache."""
    return data_files(
        DataArguments(synthetic_family=family, synthetic_num_customers=num_customers, synthetic_seed=seed)
    )


def score_folder(model_dir: str, transactions: Path, oracle: SyntheticOracle) -> tuple[float, float, int | None]:
    """(AUROC, oracle AUROC at the folder's window, window) of a trained folder on every customer of the file."""
    with tempfile.TemporaryDirectory() as scratch:
        output = predict(
            PredictionArguments(model=model_dir, transactions=str(transactions), output_file=f"{scratch}/p.csv")
        )
        scores = pd.read_csv(output)
        window = pd.read_json(report_path(output), typ="series")["max_length"]
    window = None if pd.isna(window) else int(window)
    ids = scores["customer_id"].to_numpy()
    return roc_auc_score(oracle.true_labels(ids), scores["probability"]), oracle.auroc(ids, window), window


def plugin_auroc(
    config: FreshCustomersConfig, fresh_transactions: Path, oracle: SyntheticOracle
) -> tuple[float, float]:
    """(AUROC, oracle AUROC) of the order family's plug-in classifier, fitted on the comparison's training
    customers (whole histories, smoothing by 3-fold CV) and scored on the fresh customers' last events."""
    train, _, _ = comparison_customers(config.comparison_customers, config.seed)
    codes = [np.asarray(sequence) for sequence in train["mcc_code"]]
    smoothings = LearnabilityConfig().smoothings
    classifier, _ = fit_cross_validated(codes, np.asarray(train["labels"]), smoothings, config.plugin_window)
    fresh = build_customer_dataset(fresh_transactions, keep_unlabelled=True)
    ids = np.asarray(fresh["customer_id"])
    fresh_codes = last([np.asarray(sequence) for sequence in fresh["mcc_code"]], config.plugin_window)
    auroc = roc_auc_score(oracle.true_labels(ids), classifier.decision_function(fresh_codes))
    return auroc, oracle.auroc(ids, config.plugin_window)


def main() -> None:
    (config,) = HfArgumentParser(FreshCustomersConfig).parse_args_into_dataclasses()
    transactions, _, folder = synthetic_folder(config.family, config.num_customers, config.seed)
    oracle = SyntheticOracle.load(folder)
    lines = [
        f"```bash\n{shlex.join(['python', '-m', 'benchmarks.fresh_customers', *sys.argv[1:]])}\n```",
        "",
        f"{config.num_customers:,} fresh customers of the `{config.family}` family (generator of "
        f"`{config.family}:{config.comparison_customers}`, data seed {config.seed}); whole-history oracle "
        f"{oracle.auroc():.4f}.",
        "",
        "| reader | window | AUROC | oracle, same window | gap |",
        "|---|---:|---:|---:|---:|",
    ]
    if config.family == "order":
        auroc, window_oracle = plugin_auroc(config, transactions, oracle)
        lines.append(
            f"| plug-in Bayes (transition counts) | {config.plugin_window} | {auroc:.4f} | {window_oracle:.4f} | "
            f"{window_oracle - auroc:.4f} |"
        )
    for model_dir in config.model_dirs:
        auroc, window_oracle, window = score_folder(model_dir, transactions, oracle)
        lines.append(
            f"| `{model_dir}` | {window or 'all'} | {auroc:.4f} | {window_oracle:.4f} | {window_oracle - auroc:.4f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
