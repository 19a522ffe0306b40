#!/usr/bin/env python
"""Time the data pipeline on a real-sized synthetic file, and print the oracle AUROCs of the synthetic data.

    python scripts/benchmark_data.py                      # 15,000 customers (~6.85 M rows): read, fit, encode
    python scripts/benchmark_data.py --learnability       # also: oracle AUROCs and the mean-feature baseline
    python scripts/benchmark_data.py --scale 1 10         # prepare_training_data at 1x and 10x the real size

Generation is timed apart. Reading and encoding run in a fresh process, so its peak RSS (getrusage) is theirs alone.
"""

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from txformer.benchmark.data_scale import run_scale_benchmark
from txformer.data import (
    EventVocabulary,
    SyntheticOracle,
    build_customer_dataset,
    customer_table,
    generate_synthetic_data,
    mean_feature_baseline_auroc,
)
from txformer.data.synthetic import ORACLE_FILE, TRAIN_LABELS_FILE, TRANSACTIONS_FILE


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_events(customers) -> int:
    """Total number of events of a customer dataset."""
    return int(pc.sum(pc.list_value_length(customer_table(customers).column("event_time"))).as_py())


def time_pipeline(data_dir: str, results) -> None:
    """Child process: reads the file into customers, then fits and encodes the vocabulary, timing each step."""
    start = time.perf_counter()
    customers = build_customer_dataset(Path(data_dir) / TRANSACTIONS_FILE)
    results.put(("read", time.perf_counter() - start, peak_rss_gib(), len(customers), count_events(customers)))
    start = time.perf_counter()
    encoded = EventVocabulary.fit(customers).encode(customers)
    results.put(("fit + encode", time.perf_counter() - start, peak_rss_gib(), len(encoded), count_events(encoded)))


def ensure_data(data_dir: Path, num_customers: int, seed: int) -> None:
    """Generates the folder unless it is already there, timing the generation."""
    if (data_dir / ORACLE_FILE).exists():
        print(f"using existing {data_dir}")
        return
    start = time.perf_counter()
    info = generate_synthetic_data(data_dir, num_customers=num_customers, seed=seed)
    print(
        f"generated {info.num_events:,} rows of {info.num_customers:,} customers in {time.perf_counter() - start:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="outputs/benchmark-data", help="Where the benchmark data is written.")
    parser.add_argument("--num_customers", type=int, default=15_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learnability", action="store_true", help="Oracle AUROCs and the mean-feature baseline.")
    parser.add_argument(
        "--scale", type=int, nargs="+", help="Only the sharded preparation, at these multiples of the real size."
    )
    args = parser.parse_args()
    if args.scale:
        run_scale_benchmark(args.scale, Path(args.data_dir), args.seed)
        return

    data_dir = Path(args.data_dir) / f"synthetic-n{args.num_customers}-seed{args.seed}"
    ensure_data(data_dir, args.num_customers, args.seed)
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

    if args.learnability:
        report_learnability(Path(args.data_dir), args.seed)


def report_learnability(root: Path, seed: int) -> None:
    """Oracle AUROCs of the default synthetic data, and the mean-feature logistic regression against the oracle."""
    default_dir = root / f"synthetic-n8000-seed{seed}"
    ensure_data(default_dir, 8000, seed)
    oracle = SyntheticOracle.load(default_dir)
    labelled = build_customer_dataset(default_dir / TRANSACTIONS_FILE, default_dir / TRAIN_LABELS_FILE)["customer_id"]
    windows = {"all": None, "last 64": 64, "last 256": 256, "last 512": 512}
    print("\n| oracle AUROC, 8,000 customers | " + " | ".join(windows) + " |\n" + "|---" * (len(windows) + 1) + "|")
    for name, ids in (("all customers", None), ("labelled customers", labelled)):
        print(f"| {name} | " + " | ".join(f"{oracle.auroc(ids, window):.4f}" for window in windows.values()) + " |")

    check_dir = root / f"synthetic-n10000-seed{seed}"
    ensure_data(check_dir, 10_000, seed)
    check_oracle = SyntheticOracle.load(check_dir)
    customer_ids = np.random.default_rng(seed).permutation(check_oracle.customer_ids)
    train_ids, test_ids = customer_ids[:6000], customer_ids[6000:]
    print("\n| window | mean-feature logistic regression (6,000 train, 4,000 test) | oracle, same test customers |")
    print("|---|---|---|")
    for window in (256, 512):
        baseline = mean_feature_baseline_auroc(check_dir, train_ids, test_ids, last_n=window, seed=seed)
        print(f"| last {window} | {baseline:.4f} | {check_oracle.auroc(test_ids, window):.4f} |")


if __name__ == "__main__":
    main()
