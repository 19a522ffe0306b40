#!/usr/bin/env python
"""How much of the order family's oracle can be learnt from a given number of labelled customers? The plug-in
Bayes classifier of the family's own model class (`TransitionCountClassifier`: per-label Markov chains over MCC codes
from smoothed transition counts, the smoothing picked by cross-validation on the training customers) trained on whole
histories and scored on the last `--window` events, next to the oracle of that window.

1. On the comparison's data and split (`scripts/compare.py`, `order:4000`, split seed 42): what a data-efficient
   learner reaches with the labelled customers every model there trains on.
2. A learning curve on customers drawn in memory with the same generator parameters (`--seed` of the data), scored
   on `--num_test` other customers.

    python benchmarks/order_learnability.py                  # a few minutes on one core
"""

import shlex
import sys
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from transformers import HfArgumentParser

from txformer.cli import run_cli
from txformer.data import build_customer_dataset, split_for_evaluation
from txformer.data.synthetic import SyntheticOracle
from txformer.data.synthetic_order import (
    OrderPosterior,
    OrderSyntheticConfig,
    TransitionCountClassifier,
    sample_order_family,
)
from txformer.training import DataArguments, data_files


@dataclass
class LearnabilityConfig:
    num_customers: int = field(default=4000, metadata={"help": "Customers of the comparison's order data."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated data (its generator parameters)."})
    window: int = field(default=256, metadata={"help": "Most recent events a held-out customer shows."})
    curve: list[int] = field(
        default_factory=lambda: [500, 1000, 2500, 5000, 10000, 20000],
        metadata={"help": "Training customers of the learning curve."},
    )
    num_test: int = field(default=2000, metadata={"help": "Test customers of the learning curve."})
    smoothings: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0])


def last(codes: list[np.ndarray], window: int) -> list[np.ndarray]:
    return [sequence[-window:] for sequence in codes]


def fit_cross_validated(
    codes: list[np.ndarray], labels: np.ndarray, smoothings: list[float], window: int, seed: int = 0
) -> tuple[TransitionCountClassifier, float]:
    """The classifier with the smoothing of best 3-fold AUROC on the training customers (scored on their last
    `window` events), refitted on all of them."""
    folds = list(StratifiedKFold(3, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))

    def cv_auroc(smoothing: float) -> float:
        scores = []
        for fit_rows, score_rows in folds:
            model = TransitionCountClassifier(smoothing).fit([codes[i] for i in fit_rows], labels[fit_rows])
            held = model.decision_function(last([codes[i] for i in score_rows], window))
            scores.append(roc_auc_score(labels[score_rows], held))
        return float(np.mean(scores))

    best = max(smoothings, key=cv_auroc)
    return TransitionCountClassifier(best).fit(codes, labels), best


def comparison_customers(num_customers: int, seed: int = 0):
    """(train, held_out, data folder) of the comparison's order data (`scripts/compare.py`: split 90/10, seed 42)."""
    data_args = DataArguments(synthetic_family="order", synthetic_num_customers=num_customers, synthetic_seed=seed)
    transactions, labels_file, data_dir = data_files(data_args)
    return *split_for_evaluation(build_customer_dataset(transactions, labels_file), 0.1, 42), data_dir


def comparison_split(config: LearnabilityConfig) -> list[str]:
    train, held_out, data_dir = comparison_customers(config.num_customers, config.seed)
    train_codes = [np.asarray(codes) for codes in train["mcc_code"]]
    held_codes = last([np.asarray(codes) for codes in held_out["mcc_code"]], config.window)
    oracle = SyntheticOracle.load(data_dir).auroc(held_out["customer_id"], config.window)
    lines = [
        f"*The comparison's split:* order family, {config.num_customers:,} customers, {len(train):,} training "
        f"customers (training and validation of the model runs), {len(held_out):,} held out, scored on their last "
        f"{config.window} events; oracle of that window **{oracle:.4f}**.",
        "",
        "| plug-in trained on | smoothing (3-fold CV) | held-out AUROC | gap to the oracle |",
        "|---|---:|---:|---:|",
    ]
    for name, codes in (
        ("whole histories", train_codes),
        (f"last {config.window} events", last(train_codes, config.window)),
    ):
        model, smoothing = fit_cross_validated(codes, np.asarray(train["labels"]), config.smoothings, config.window)
        auroc = roc_auc_score(held_out["labels"], model.decision_function(held_codes))
        lines.append(f"| {name} | {smoothing:g} | {auroc:.4f} | {oracle - auroc:.4f} |")
    return [*lines, ""]


def learning_curve(config: LearnabilityConfig) -> list[str]:
    order_config = OrderSyntheticConfig()
    total = max(config.curve) + config.num_test
    sampled = sample_order_family(total, order_config, np.random.default_rng(config.seed))
    lengths = np.bincount(sampled.customer_of_event, minlength=total)
    bounds = np.r_[0, np.cumsum(lengths)]
    codes = np.split(sampled.columns["mcc_code"], bounds[1:-1])
    test = np.arange(total - config.num_test, total)
    posterior = OrderPosterior.from_events(
        {**sampled.oracle, "label_prior": order_config.label_prior},
        {"mcc_code": sampled.columns["mcc_code"], "amount": sampled.columns["amount_cents"] / 100},
    )
    oracle = roc_auc_score(
        sampled.labels[test], posterior(np.maximum(bounds[test], bounds[test + 1] - config.window), bounds[test + 1])
    )
    test_codes = last([codes[i] for i in test], config.window)
    lines = [
        f"*Learning curve:* {config.num_test:,} test customers, last {config.window} events, oracle {oracle:.4f}.",
        "",
        "| training customers | smoothing (3-fold CV) | plug-in AUROC | gap to the oracle |",
        "|---:|---:|---:|---:|",
    ]
    for size in config.curve:
        model, smoothing = fit_cross_validated(
            codes[:size], sampled.labels[:size], config.smoothings, config.window, config.seed
        )
        auroc = roc_auc_score(sampled.labels[test], model.decision_function(test_codes))
        lines.append(f"| {size:,} | {smoothing:g} | {auroc:.4f} | {oracle - auroc:.4f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    (config,) = HfArgumentParser(LearnabilityConfig).parse_args_into_dataclasses()
    lines = [f"```bash\n{shlex.join(['python', 'benchmarks/order_learnability.py', *sys.argv[1:]])}\n```", ""]
    print("\n".join(lines + comparison_split(config) + learning_curve(config)))


if __name__ == "__main__":
    run_cli(main)
