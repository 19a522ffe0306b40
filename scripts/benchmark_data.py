#!/usr/bin/env python
"""Time the data pipeline on a real-sized synthetic file, and print the oracle AUROCs of the synthetic data.

    python scripts/benchmark_data.py                      # 15,000 customers (~6.85 M rows): read, fit, encode
    python scripts/benchmark_data.py --learnability       # also: oracle AUROCs and the mean-feature baseline
    python scripts/benchmark_data.py --family order --learnability   # another family: oracle AUROCs at several
                                                          # windows against order-free aggregate baselines
    python scripts/benchmark_data.py --scale 1 10         # prepare_training_data at 1x and 10x the real size

Generation is timed apart. Reading and encoding run in a fresh process, so its peak RSS (VmHWM) is theirs alone.
"""

import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from sklearn.metrics import roc_auc_score


# `benchmarks/` lies next to `scripts/` in the source tree; it is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_scale import run_scale_benchmark
from txformer.cli import run_cli, script_parser
from txformer.data import (
    SYNTHETIC_FAMILIES,
    EventVocabulary,
    SyntheticOracle,
    aggregate_baseline_auroc,
    build_customer_dataset,
    customer_table,
    generate_synthetic_data,
    mean_feature_baseline_auroc,
)
from txformer.data.synthetic import ORACLE_FILE, TRAIN_LABELS_FILE, TRANSACTIONS_FILE
from txformer.data.synthetic_order import OrderPosterior
from txformer.machine import process_peak_memory_mib


def count_events(customers) -> int:
    """Total number of events of a customer dataset."""
    return int(pc.sum(pc.list_value_length(customer_table(customers).column("event_time"))).as_py())


def time_pipeline(data_dir: str, results) -> None:
    """Child process: reads the file into customers, then fits and encodes the vocabulary, timing each step."""
    start = time.perf_counter()
    customers = build_customer_dataset(Path(data_dir) / TRANSACTIONS_FILE)
    results.put(
        (
            "read",
            time.perf_counter() - start,
            process_peak_memory_mib() / 1024,
            len(customers),
            count_events(customers),
        )
    )
    start = time.perf_counter()
    encoded = EventVocabulary.fit(customers).encode(customers)
    results.put(
        (
            "fit + encode",
            time.perf_counter() - start,
            process_peak_memory_mib() / 1024,
            len(encoded),
            count_events(encoded),
        )
    )


# About 6.8 M rows each: the size of the real file.
TIMING_CUSTOMERS = {"independent": 15_000, "order": 15_000, "long": 2_500}
# Customers of the learnability check of the order and long families.
LEARNABILITY_CUSTOMERS = {"order": 8_000, "long": 2_500}
LEARNABILITY_WINDOWS = {"all": None, "last 4,096": 4096, "last 1,024": 1024, "last 256": 256, "last 64": 64}


def data_folder(root: Path, family: str, num_customers: int, seed: int) -> Path:
    """The folder of one generated data set (the independent family keeps its former name)."""
    prefix = "synthetic" if family == "independent" else f"synthetic-{family}"
    return root / f"{prefix}-n{num_customers}-seed{seed}"


def ensure_data(data_dir: Path, num_customers: int, seed: int, family: str = "independent") -> None:
    """Generates the folder unless it is already there, timing the generation."""
    if (data_dir / ORACLE_FILE).exists():
        print(f"using existing {data_dir}")
        return
    start = time.perf_counter()
    info = generate_synthetic_data(data_dir, num_customers=num_customers, seed=seed, family=family)
    print(
        f"generated {info.num_events:,} rows of {info.num_customers:,} customers in {time.perf_counter() - start:.1f} s"
    )


@dataclass
class DataBenchmarkArguments:
    """What to measure (one command-line flag per field)."""

    data_dir: str = field(default="outputs/benchmark-data", metadata={"help": "Where the benchmark data is written."})
    family: str = field(
        default="independent", metadata={"help": "Synthetic data family.", "choices": SYNTHETIC_FAMILIES}
    )
    num_customers: int | None = field(default=None, metadata={"help": "Default: about 6.8 M rows of the family."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated data."})
    learnability: bool = field(default=False, metadata={"help": "Oracle AUROCs and the feature baselines."})
    scale: list[int] | None = field(
        default=None, metadata={"help": "Only the sharded preparation, at these multiples of the real size."}
    )


def parse_args(argv: list[str] | None = None) -> DataBenchmarkArguments:
    """The arguments of the benchmark."""
    (args,) = script_parser(DataBenchmarkArguments, __doc__).parse_args_into_dataclasses(args=argv)
    return args


def main() -> None:
    args = parse_args()
    if args.scale:
        run_scale_benchmark(args.scale, Path(args.data_dir), args.seed)
        return

    num_customers = args.num_customers or TIMING_CUSTOMERS[args.family]
    data_dir = data_folder(Path(args.data_dir), args.family, num_customers, args.seed)
    ensure_data(data_dir, num_customers, args.seed, args.family)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=time_pipeline, args=(str(data_dir), results))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"the timed process failed (exit code {child.exitcode})")
    print("| step | wall time (s) | peak RSS so far (GiB) | customers | events |\n|---|---|---|---|---|")
    while not results.empty():
        step, seconds, rss, num_customers, num_events = results.get()
        print(f"| {step} | {seconds:.1f} | {rss:.2f} | {num_customers:,} | {num_events:,} |")

    if args.learnability and args.family == "independent":
        report_learnability(Path(args.data_dir), args.seed)
    elif args.learnability:
        report_family_learnability(Path(args.data_dir), args.family, args.seed)


def report_learnability(root: Path, seed: int) -> None:
    """Oracle AUROCs of the default synthetic data, and the mean-feature logistic regression against the oracle."""
    default_dir = data_folder(root, "independent", 8000, seed)
    ensure_data(default_dir, 8000, seed)
    oracle = SyntheticOracle.load(default_dir)
    labelled = build_customer_dataset(default_dir / TRANSACTIONS_FILE, default_dir / TRAIN_LABELS_FILE)["customer_id"]
    windows = {"all": None, "last 64": 64, "last 256": 256, "last 512": 512}
    print("\n| oracle AUROC, 8,000 customers | " + " | ".join(windows) + " |\n" + "|---" * (len(windows) + 1) + "|")
    for name, ids in (("all customers", None), ("labelled customers", labelled)):
        print(f"| {name} | " + " | ".join(f"{oracle.auroc(ids, window):.4f}" for window in windows.values()) + " |")

    check_dir = data_folder(root, "independent", 10_000, seed)
    ensure_data(check_dir, 10_000, seed)
    check_oracle = SyntheticOracle.load(check_dir)
    customer_ids = np.random.default_rng(seed).permutation(check_oracle.customer_ids)
    train_ids, test_ids = customer_ids[:6000], customer_ids[6000:]
    print("\n| window | mean-feature logistic regression (6,000 train, 4,000 test) | oracle, same test customers |")
    print("|---|---|---|")
    for window in (256, 512):
        baseline = mean_feature_baseline_auroc(check_dir, train_ids, test_ids, last_n=window, seed=seed)
        print(f"| last {window} | {baseline:.4f} | {check_oracle.auroc(test_ids, window):.4f} |")


def report_family_learnability(root: Path, family: str, seed: int) -> None:
    """Oracle AUROCs of a family at several windows, and order-free aggregate baselines (logistic regression and
    gradient-boosted trees, 75 % of the customers to train) against the oracle on the same test customers."""
    num_customers = LEARNABILITY_CUSTOMERS[family]
    data_dir = data_folder(root, family, num_customers, seed)
    ensure_data(data_dir, num_customers, seed, family)
    oracle = SyntheticOracle.load(data_dir)
    lengths = np.diff(oracle.offsets)
    print(
        f"\n{family} family, {num_customers:,} customers: {lengths.sum():,} events, median history "
        f"{np.median(lengths):,.0f}, mean {lengths.mean():,.0f}, longest {lengths.max():,}"
    )
    labelled = build_customer_dataset(data_dir / TRANSACTIONS_FILE, data_dir / TRAIN_LABELS_FILE)["customer_id"]
    windows = LEARNABILITY_WINDOWS
    print("\n| oracle AUROC | " + " | ".join(windows) + " |\n" + "|---" * (len(windows) + 1) + "|")
    for name, ids in (("all customers", None), ("labelled customers", labelled)):
        print(f"| {name} | " + " | ".join(f"{oracle.auroc(ids, window):.4f}" for window in windows.values()) + " |")
    if family == "order":
        report_order_ablations(data_dir, oracle, seed)

    customer_ids = np.random.default_rng(seed).permutation(oracle.customer_ids)
    num_train = int(0.75 * num_customers)
    train_ids, test_ids = customer_ids[:num_train], customer_ids[num_train:]
    print(
        f"\n| window | logistic regression on aggregates | gradient-boosted trees on aggregates | logistic regression on "
        f"counts | oracle ({num_train:,} train, {num_customers - num_train:,} test customers) |\n|---|---|---|---|---|"
    )
    for name in ("all", "last 256"):
        window = windows[name]
        baseline = aggregate_baseline_auroc(data_dir, train_ids, test_ids, last_n=window, seed=seed)
        print(
            f"| {name} | {baseline['logistic_regression']:.4f} | {baseline['gradient_boosting']:.4f} "
            f"| {baseline['logistic_regression_counts']:.4f} | {oracle.auroc(test_ids, window):.4f} |"
        )


def report_order_ablations(data_dir: Path, oracle: SyntheticOracle, seed: int) -> None:
    """Whole-history posterior AUROC of the order family with one of its two terms removed, on the events as they
    are and shuffled within each customer (same codes and amounts, order lost)."""
    customers = build_customer_dataset(data_dir / TRANSACTIONS_FILE)
    events = {name: np.concatenate(customers[name]) for name in ("mcc_code", "amount")}
    starts, ends = oracle.offsets[:-1], oracle.offsets[1:]
    rng = np.random.default_rng(seed)
    shuffled_order = np.concatenate([start + rng.permutation(end - start) for start, end in pairwise(oracle.offsets)])
    shuffled = {name: values[shuffled_order] for name, values in events.items()}
    parameters = oracle.parameters
    variants = {
        "whole posterior": parameters,
        "transition term only": parameters | {"amount_label_shift": [0.0] * len(parameters["amount_label_shift"])},
        "amount term only": parameters | {"log_transition": [parameters["log_transition"][0]] * 2},
    }
    print("\n| whole-history posterior | events in order | events shuffled within customers |\n|---|---|---|")
    for name, variant in variants.items():
        aurocs = [
            roc_auc_score(oracle.labels, OrderPosterior.from_events(variant, e)(starts, ends))
            for e in (events, shuffled)
        ]
        print(f"| {name} | {aurocs[0]:.4f} | {aurocs[1]:.4f} |")


if __name__ == "__main__":
    run_cli(main)
