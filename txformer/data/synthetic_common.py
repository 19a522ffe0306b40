"""What every synthetic family shares: the label-free constants, customers, history lengths, code sets, activity
days, terminals, the real file formats and quirks, and the writing of the four files of a data folder."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from tqdm.auto import tqdm

from ..io_utils import atomic_write_json
from .reader import SECONDS_PER_DAY, TRANSACTION_COLUMNS


logger = logging.getLogger(__name__)

TRANSACTIONS_FILE = "transactions.csv"
TRAIN_LABELS_FILE = "gender_train.csv"
TEST_IDS_FILE = "gender_test_kaggle_sample_submission.csv"
ORACLE_FILE = "oracle.json"
ORACLE_FORMAT_VERSION = 1
HOURS_PER_DAY = 24
CSV_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class SyntheticBaseConfig:
    """The label-free constants every family shares: label prior, history lengths, code sets, file quirks and the
    share of customers with a label (all saved in oracle.json)."""

    label_prior: float = 0.442
    median_length: float = 305.0
    length_log_std: float = 0.84
    heavy_fraction: float = 0.0015
    heavy_length_range: tuple[int, int] = (3_000, 90_000)
    num_days: int = 457
    num_mcc_codes: int = 184
    num_tr_types: int = 77
    mcc_zipf_exponent: float = 1.4
    tr_type_zipf_exponent: float = 1.6
    credit_type_fraction: float = 0.25
    num_terminals: int = 30_000
    missing_term_fraction: float = 0.35
    second_60_fraction: float = 0.002
    swapped_pair_fraction: float = 0.005
    split_customer_fraction: float = 0.01
    labelled_fraction: float = 0.7


@dataclass(frozen=True)
class SyntheticDataInfo:
    """Where the generated files are and what they hold."""

    output_dir: Path
    transactions_path: Path
    train_labels_path: Path
    test_ids_path: Path
    oracle_path: Path
    num_customers: int
    num_events: int
    num_labelled: int


@dataclass
class SampledCustomers:
    """What a family draws: customers (ascending ids), their labels, and every event grouped by customer in time
    order (`customer_of_event` is non-decreasing), with the family's oracle parameters."""

    customer_ids: np.ndarray
    labels: np.ndarray
    customer_of_event: np.ndarray
    # day, hour, minute, second, mcc_code, tr_type, amount_cents (signed integer cents), term_index (-1 = missing)
    columns: dict[str, np.ndarray]
    oracle: dict


@dataclass
class CodeSets:
    """Real-like MCC and transaction type codes, their label-free popularity, and the types each MCC allows."""

    mcc_codes: np.ndarray
    tr_types: np.ndarray
    tr_type_is_credit: np.ndarray
    mcc_probability: np.ndarray
    # [mcc, tr_type]: p(tr_type | mcc), rows sum to 1
    tr_type_given_mcc: np.ndarray


def zipf_probabilities(size: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like probabilities over `size` items in a random order."""
    probabilities = 1.0 / (np.arange(size) + 2.0) ** exponent
    return rng.permutation(probabilities / probabilities.sum())


def build_code_sets(config: SyntheticBaseConfig, rng: np.random.Generator) -> CodeSets:
    """MCC and type codes, 25 % credit types, Zipf popularities, and a few allowed types per MCC (every type is
    allowed by at least one MCC)."""
    mcc_codes = np.sort(rng.choice(np.arange(742, 10_000), config.num_mcc_codes, replace=False))
    tr_types = np.sort(rng.choice(np.arange(1000, 8200), config.num_tr_types, replace=False))
    tr_type_is_credit = rng.random(config.num_tr_types) < config.credit_type_fraction
    mcc_probability = zipf_probabilities(config.num_mcc_codes, config.mcc_zipf_exponent, rng)
    tr_type_popularity = zipf_probabilities(config.num_tr_types, config.tr_type_zipf_exponent, rng)
    allowed = np.zeros((config.num_mcc_codes, config.num_tr_types))
    for mcc_index in range(config.num_mcc_codes):
        num_types = min(1 + rng.poisson(1.5), 6)
        chosen = rng.choice(config.num_tr_types, num_types, replace=False, p=tr_type_popularity)
        allowed[mcc_index, chosen] = rng.dirichlet(np.ones(num_types))
    for type_index in np.flatnonzero(allowed.sum(axis=0) == 0):
        mcc_index = rng.integers(config.num_mcc_codes)
        allowed[mcc_index, type_index] = 0.05
        allowed[mcc_index] /= allowed[mcc_index].sum()
    return CodeSets(mcc_codes, tr_types, tr_type_is_credit, mcc_probability, allowed)


def hour_of_day_probability() -> np.ndarray:
    """A day-shaped profile over the 24 hours: low at night, a midday peak and an evening peak."""
    hours = np.arange(HOURS_PER_DAY)
    probability = 0.15 + np.exp(-0.5 * ((hours - 13.0) / 4.0) ** 2) + 0.5 * np.exp(-0.5 * ((hours - 19.5) / 2.0) ** 2)
    return probability / probability.sum()


def draw_customers(
    num_customers: int, config: SyntheticBaseConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct 8-digit customer ids in ascending order, and labels `y ~ Bernoulli(label_prior)`."""
    customer_ids = np.sort(10_000_000 + rng.choice(90_000_000, num_customers, replace=False))
    labels = (rng.random(num_customers) < config.label_prior).astype(np.int64)
    return customer_ids, labels


def history_lengths(num_customers: int, config: SyntheticBaseConfig, rng: np.random.Generator) -> np.ndarray:
    """Log-normal body, with probability `heavy_fraction` log-uniform on `heavy_length_range`, capped at its end."""
    body = np.exp(rng.normal(np.log(config.median_length), config.length_log_std, num_customers))
    low, high = config.heavy_length_range
    heavy = np.exp(rng.uniform(np.log(low), np.log(high), num_customers))
    lengths = np.where(rng.random(num_customers) < config.heavy_fraction, heavy, body)
    return np.clip(np.rint(lengths), 1, high).astype(np.int64)


def activity_days(
    num_customers: int, config: SyntheticBaseConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's first day in [0, 119] and last day in the final 30 days."""
    first_day = rng.integers(0, 120, num_customers)
    last_day = config.num_days - 1 - rng.integers(0, 30, num_customers)
    return first_day, last_day


def terminal_indices(num_events: int, config: SyntheticBaseConfig, rng: np.random.Generator) -> np.ndarray:
    """A Zipf-popular terminal per event, -1 (missing) with probability `missing_term_fraction`."""
    term_probability = zipf_probabilities(config.num_terminals, 1.05, rng)
    term_index = rng.choice(config.num_terminals, num_events, p=term_probability)
    term_index[rng.random(num_events) < config.missing_term_fraction] = -1
    return term_index


def clock_fields(seconds: np.ndarray) -> dict[str, np.ndarray]:
    """Day, hour, minute and second of integer seconds since day 0."""
    day, second_of_day = np.divmod(seconds, SECONDS_PER_DAY)
    hour, second_of_hour = np.divmod(second_of_day, 3600)
    minute, second = np.divmod(second_of_hour, 60)
    return {"day": day, "hour": hour, "minute": minute, "second": second}


def _terminal_pool(config: SyntheticBaseConfig, rng: np.random.Generator) -> pa.Array:
    """Terminal ids of mixed real-like forms: `RU570124`, zero-padded `022915`, and short plain numbers."""
    numbers = rng.choice(1_000_000, config.num_terminals, replace=False).astype(str)
    form = rng.choice(3, config.num_terminals, p=[0.5, 0.35, 0.15])
    padded = np.char.zfill(numbers, 6)
    return pa.array(np.where(form == 0, np.char.add("RU", padded), np.where(form == 1, padded, numbers)))


def _zero_padded(values: np.ndarray) -> pa.Array:
    return pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), 2, "0")


def _format_rows(columns: dict[str, np.ndarray], terminals: pa.Array) -> pa.Table:
    """The real string formats: `D HH:MM:SS` times, amounts with two decimals, empty term_id when missing."""
    tr_datetime = pc.binary_join_element_wise(
        pc.cast(pa.array(columns["day"]), pa.string()),
        " ",
        _zero_padded(columns["hour"]),
        ":",
        _zero_padded(columns["minute"]),
        ":",
        _zero_padded(columns["second"]),
        "",
    )
    cents = columns["amount_cents"]
    magnitude = np.abs(cents)
    amount = pc.binary_join_element_wise(
        pa.array(np.where(cents < 0, "-", "")),
        pc.cast(pa.array(magnitude // 100), pa.string()),
        ".",
        _zero_padded(magnitude % 100),
        "",
    )
    term_index = columns["term_index"]
    term_id = terminals.take(pa.array(term_index, mask=term_index < 0))
    return pa.table(
        {
            "customer_id": columns["customer_id"],
            "tr_datetime": tr_datetime,
            "mcc_code": columns["mcc_code"],
            "tr_type": columns["tr_type"],
            "amount": amount,
            "term_id": term_id,
        }
    )


def _write_table_csv(path: Path, table: pa.Table) -> None:
    """A small table as CSV with an unquoted header, like the real files."""
    with open(path, "wb") as file:
        file.write((",".join(table.column_names) + "\n").encode())
        pa_csv.write_csv(table, file, pa_csv.WriteOptions(include_header=False, quoting_style="none"))


def _write_csv(path: Path, columns: dict[str, np.ndarray], terminals: pa.Array) -> None:
    """Writes the rows in chunks (with a progress bar) to a temporary file renamed over `path` at the end."""
    temporary = path.with_name(f".{path.name}.tmp")
    num_rows = len(columns["customer_id"])
    with open(temporary, "wb") as file:
        file.write((",".join(TRANSACTION_COLUMNS) + "\n").encode())
        options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
        for start in tqdm(range(0, num_rows, CSV_CHUNK_ROWS), desc=f"writing {path.name}", unit="chunk"):
            chunk = {name: values[start : start + CSV_CHUNK_ROWS] for name, values in columns.items()}
            pa_csv.write_csv(_format_rows(chunk, terminals), file, options)
    os.replace(temporary, path)


def _file_order(customer_of_row: np.ndarray, config: SyntheticBaseConfig, rng: np.random.Generator) -> np.ndarray:
    """Row order of the file from rows grouped by customer and sorted by time: a few adjacent rows swapped, and the
    second half of a few customers' histories moved to the end of the file."""
    num_rows = len(customer_of_row)
    order = np.arange(num_rows)
    first = np.flatnonzero(rng.random(num_rows - 1) < config.swapped_pair_fraction)
    first = first[customer_of_row[first] == customer_of_row[first + 1]]
    first = first[np.r_[True, np.diff(first) > 1]]
    order[first], order[first + 1] = first + 1, first
    num_customers = customer_of_row.max() + 1
    split = rng.random(num_customers) < config.split_customer_fraction
    starts = np.searchsorted(customer_of_row, np.arange(num_customers))
    position = np.arange(num_rows) - starts[customer_of_row]
    length = np.bincount(customer_of_row, minlength=num_customers)[customer_of_row]
    moved = split[customer_of_row] & (position >= length // 2) & (length > 1)
    return np.r_[order[~moved], order[moved]]


def write_synthetic_files(
    output_dir: Path, sampled: SampledCustomers, config: SyntheticBaseConfig, rng: np.random.Generator
) -> SyntheticDataInfo:
    """Writes the four files: customers in a random file order with the small disorders, a random
    `labelled_fraction` of them in the label file and the others in the test ids file, and `sampled.oracle` plus
    every customer's label in oracle.json."""
    customer_ids, labels, customer_of_event = sampled.customer_ids, sampled.labels, sampled.customer_of_event
    num_customers, num_events = len(customer_ids), len(customer_of_event)
    customer_rank = rng.permutation(num_customers)
    order = np.argsort(customer_rank[customer_of_event], kind="stable")
    order = order[_file_order(customer_rank[customer_of_event[order]], config, rng)]
    columns = {"customer_id": customer_ids[customer_of_event], **sampled.columns}
    columns = {name: values[order] for name, values in columns.items()}
    transactions_path = output_dir / TRANSACTIONS_FILE
    _write_csv(transactions_path, columns, _terminal_pool(config, rng))

    # Drawn the same way for every fraction, so with one seed a smaller fraction labels a subset of the customers
    # that a larger one labels, and the transactions are the same bytes.
    labelled = rng.random(num_customers) < config.labelled_fraction
    train_labels_path, test_ids_path = output_dir / TRAIN_LABELS_FILE, output_dir / TEST_IDS_FILE
    _write_table_csv(train_labels_path, pa.table({"customer_id": customer_ids[labelled], "gender": labels[labelled]}))
    _write_table_csv(
        test_ids_path,
        pa.table({"customer_id": customer_ids[~labelled], "probability": np.full(int((~labelled).sum()), 0.5)}),
    )
    oracle = {
        "format_version": ORACLE_FORMAT_VERSION,
        **sampled.oracle,
        "customer_ids": customer_ids.tolist(),
        "labels": labels.tolist(),
    }
    oracle_path = atomic_write_json(output_dir / ORACLE_FILE, oracle)
    logger.info("Wrote %d events of %d customers to %s", num_events, num_customers, output_dir)
    return SyntheticDataInfo(
        output_dir=output_dir,
        transactions_path=transactions_path,
        train_labels_path=train_labels_path,
        test_ids_path=test_ids_path,
        oracle_path=oracle_path,
        num_customers=num_customers,
        num_events=num_events,
        num_labelled=int(labelled.sum()),
    )
