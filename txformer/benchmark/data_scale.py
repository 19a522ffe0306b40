"""Preparation of generated data at multiples of the real size (`scripts/benchmark_data.py --scale 1 10`): the time
and peak memory of `prepare_training_data` from scratch, and of the second call that loads the cache, each measured
in a fresh process; at the first scale also the in-memory preparation (`build_customer_dataset`, the split, the
vocabulary, `encode`: what training did before it read the prepared data) for comparison.

The peak is the process's own high-water mark of resident memory (`VmHWM`, imports included). Not `ru_maxrss` from
`getrusage` or `wait4`: on Linux a child's `ru_maxrss` starts from its launcher's peak, which survives `exec`.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from ..data import EventVocabulary, build_customer_dataset, generate_synthetic_data, split_for_evaluation
from ..data.prepare import prepare_training_data
from ..data.synthetic import ORACLE_FILE, TRAIN_LABELS_FILE, TRANSACTIONS_FILE


# About 6.85 M rows: the size of the real transactions file.
REAL_SIZE_CUSTOMERS = 15_000
STEPS = ("prepare", "load from cache")
IN_MEMORY = "in memory"


def scaled_data(root: Path, scale: int, seed: int, num_customers: int = REAL_SIZE_CUSTOMERS) -> Path:
    """A folder with `transactions.csv` and `gender_train.csv` of `scale` times the real size: `scale` generated
    data sets of the real size (seeds `seed`, `seed + 1`, ...) in one file, the ids of copy k > 0 prefixed with k."""
    copies = [root / f"synthetic-n{num_customers}-seed{seed + copy}" for copy in range(scale)]
    for copy, folder in enumerate(copies):
        if not (folder / ORACLE_FILE).exists():
            generate_synthetic_data(folder, num_customers=num_customers, seed=seed + copy)
    if scale == 1:
        return copies[0]
    folder = root / f"scale-{scale}-n{num_customers}-seed{seed}"
    if not (folder / TRAIN_LABELS_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name in (TRANSACTIONS_FILE, TRAIN_LABELS_FILE):
            with open(folder / f".{name}.tmp", "wb") as output:
                for copy, source in enumerate(copies):
                    header, rows = (source / name).read_bytes().split(b"\n", 1)
                    if copy == 0:
                        output.write(header + b"\n")
                    # Generated ids have 8 digits: a leading k adds k * 10^8, so the copies' ids stay distinct.
                    prefix = str(copy).encode() if copy else b""
                    output.write(prefix + rows.rstrip(b"\n").replace(b"\n", b"\n" + prefix) + b"\n")
        for name in (TRANSACTIONS_FILE, TRAIN_LABELS_FILE):
            (folder / f".{name}.tmp").rename(folder / name)
    return folder


def count_rows(path: Path) -> int:
    """Data rows of a CSV file (lines after the header)."""
    with open(path, "rb") as file:
        return sum(block.count(b"\n") for block in iter(lambda: file.read(1 << 24), b"")) - 1


def measure(step: str, data_dir: Path, cache_dir: Path) -> dict:
    """Child process: one `prepare_training_data` call (or the in-memory preparation), timed."""
    transactions, labels = data_dir / TRANSACTIONS_FILE, data_dir / TRAIN_LABELS_FILE
    start = time.perf_counter()
    if step == IN_MEMORY:
        train, held_out = split_for_evaluation(build_customer_dataset(transactions, labels), 0.1, 42)
        vocabulary = EventVocabulary.fit(train)
        splits = (vocabulary.encode(train), vocabulary.encode(held_out))
    else:
        prepared = prepare_training_data(transactions, labels, cache_dir=cache_dir)
        splits = (prepared.train, prepared.eval)
    seconds = time.perf_counter() - start
    num_events = sum(pc.sum(split.with_format("arrow")["num_events"]).as_py() for split in splits)
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])
    return {
        "seconds": seconds,
        "customers": sum(len(split) for split in splits),
        "events": num_events,
        "peak_rss_gib": peak_kib / 2**20,
    }


def measure_in_fresh_process(step: str, data_dir: Path, cache_dir: Path) -> dict:
    """`measure` in a new Python process; adds the wall time of the whole process, imports included."""
    code = (
        "import json, sys; from pathlib import Path; from txformer.benchmark.data_scale import measure; "
        "print(json.dumps(measure(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))"
    )
    start = time.perf_counter()
    output = subprocess.run(
        [sys.executable, "-c", code, step, str(data_dir), str(cache_dir)], stdout=subprocess.PIPE, check=True
    ).stdout
    return {**json.loads(output.decode().strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start}


def run_scale_benchmark(scales: list[int], root: Path, seed: int = 0) -> list[dict]:
    """Prepares each scale from scratch, then loads it again, each in a fresh process (at the first scale, also in
    memory); prints a table with the ratios to the first scale."""
    results = []
    for scale in scales:
        data_dir = scaled_data(root, scale, seed)
        input_rows = count_rows(data_dir / TRANSACTIONS_FILE)
        cache_dir = root / f"prepared-cache-scale-{scale}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        for step in (*STEPS, IN_MEMORY) if scale == scales[0] else STEPS:
            figures = measure_in_fresh_process(step, data_dir, cache_dir)
            cache_bytes = sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file())
            cache_gib = None if step == IN_MEMORY else cache_bytes / 2**30
            results.append({"scale": scale, "step": step, "input_rows": input_rows, "cache_gib": cache_gib, **figures})
            print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(cache_dir)
    print(format_results(results))
    return results


def format_results(results: list[dict]) -> str:
    """Markdown table: each step's time and peak RSS, and their ratios to the same step at the first scale."""
    first = {result["step"]: result for result in results if result["scale"] == results[0]["scale"]}
    lines = [
        "| scale | input rows | labelled customers (events) | step | time (s) | × first | process with imports (s) "
        "| peak RSS (GiB) | × first | cache on disk (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = first[result["step"]]
        cache = "" if result["cache_gib"] is None else f"{result['cache_gib']:.2f}"
        lines.append(
            f"| {result['scale']}× | {result['input_rows']:,} | {result['customers']:,} ({result['events']:,}) | "
            f"{result['step']} | {result['seconds']:.2f} | {result['seconds'] / base['seconds']:.2f} | "
            f"{result['process_seconds']:.1f} | {result['peak_rss_gib']:.2f} | "
            f"{result['peak_rss_gib'] / base['peak_rss_gib']:.2f} | {cache} |"
        )
    return "\n".join(lines)
