"""Synthetic bank transactions in the real file format, from a generative process whose exact label posterior is
known, so a model can be compared with the Bayes-optimal AUROC (the "oracle") on the same customers.

Generative process (docs/data.md gives it in full):

1. label `y ~ Bernoulli(label_prior)`; a latent customer taste `theta = latent_values[k]` with
   `k ~ Categorical(latent_prior[y])`, a discretised normal centred on `-latent_mean` (y = 0) or `+latent_mean`
   (y = 1);
2. a history length `n`, independent of `y` (log-normal body, log-uniform heavy tail);
3. `n` events drawn independently given `theta`: `p(e | theta) = base(e) exp(theta g(e) - A(theta))` over the
   joint (mcc_code, tr_type, amount bucket, hour of day), with the evidence score
   `g(e) = w_mcc[mcc_code] + w_type[tr_type] + w_bucket[amount bucket] + w_hour[hour]` and the log-partition
   `A(theta) = log sum_e base(e) exp(theta g(e))`;
4. everything else (day, minute, second, the amount inside its bucket, term_id) independently of `y` and `theta`.

So for any set of `n` observed events with score sum `S = sum g(e_i)`, the posterior log-odds is exactly
`log(pi / (1 - pi)) + LSE_k[log q1_k + theta_k S - n A_k] - LSE_k[log q0_k + theta_k S - n A_k]`.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ..io_utils import atomic_write_json
from .reader import (
    SECONDS_PER_DAY,
    TRANSACTION_COLUMNS,
    build_customer_dataset,
    customer_table,
    list_offsets_and_values,
)


logger = logging.getLogger(__name__)

TRANSACTIONS_FILE = "transactions.csv"
TRAIN_LABELS_FILE = "gender_train.csv"
TEST_IDS_FILE = "gender_test_kaggle_sample_submission.csv"
ORACLE_FILE = "oracle.json"
ORACLE_FORMAT_VERSION = 1
# Amount buckets are decades of |amount| in integer cents: bucket b holds cents in [edges[b], edges[b + 1]).
AMOUNT_BUCKET_EDGES_CENTS = (1, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 15_000_000_000)
HOURS_PER_DAY = 24
CSV_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class SyntheticConfig:
    """The constants of the generative process (all saved in oracle.json)."""

    label_prior: float = 0.442
    latent_mean: float = 0.067
    latent_std: float = 0.065
    num_latent_values: int = 41
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
    evidence_share: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)
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
class EventSpace:
    """The joint outcomes (mcc_code, tr_type, amount bucket, hour) with their base probability and score g."""

    mcc_codes: np.ndarray
    tr_types: np.ndarray
    tr_type_is_credit: np.ndarray
    mcc_weights: np.ndarray
    tr_type_weights: np.ndarray
    bucket_weights: np.ndarray
    hour_weights: np.ndarray
    outcome_mcc: np.ndarray
    outcome_tr_type: np.ndarray
    outcome_bucket: np.ndarray
    outcome_hour: np.ndarray
    outcome_base_probability: np.ndarray

    @property
    def outcome_score(self) -> np.ndarray:
        """g(e) of every outcome."""
        return (
            self.mcc_weights[self.outcome_mcc]
            + self.tr_type_weights[self.outcome_tr_type]
            + self.bucket_weights[self.outcome_bucket]
            + self.hour_weights[self.outcome_hour]
        )

    def log_partition(self, latent_values: np.ndarray) -> np.ndarray:
        """A(theta) = log sum_e base(e) exp(theta g(e)) for each theta."""
        log_base = np.log(self.outcome_base_probability)
        return logsumexp(log_base[None, :] + latent_values[:, None] * self.outcome_score[None, :], axis=1)


def _zipf_probabilities(size: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like probabilities over `size` items in a random order."""
    probabilities = 1.0 / (np.arange(size) + 2.0) ** exponent
    return rng.permutation(probabilities / probabilities.sum())


def _build_event_space(config: SyntheticConfig, rng: np.random.Generator) -> EventSpace:
    """Real-like code sets and base frequencies, and the score weights scaled so that g has mean 0 and variance 1
    under the base distribution, each field carrying its `evidence_share` of that variance."""
    mcc_codes = np.sort(rng.choice(np.arange(742, 10_000), config.num_mcc_codes, replace=False))
    tr_types = np.sort(rng.choice(np.arange(1000, 8200), config.num_tr_types, replace=False))
    tr_type_is_credit = rng.random(config.num_tr_types) < config.credit_type_fraction
    mcc_probability = _zipf_probabilities(config.num_mcc_codes, config.mcc_zipf_exponent, rng)
    tr_type_popularity = _zipf_probabilities(config.num_tr_types, config.tr_type_zipf_exponent, rng)

    # Each MCC allows a few transaction types; every type is allowed by at least one MCC.
    allowed = np.zeros((config.num_mcc_codes, config.num_tr_types))
    for mcc_index in range(config.num_mcc_codes):
        num_types = min(1 + rng.poisson(1.5), 6)
        chosen = rng.choice(config.num_tr_types, num_types, replace=False, p=tr_type_popularity)
        allowed[mcc_index, chosen] = rng.dirichlet(np.ones(num_types))
    for type_index in np.flatnonzero(allowed.sum(axis=0) == 0):
        mcc_index = rng.integers(config.num_mcc_codes)
        allowed[mcc_index, type_index] = 0.05
        allowed[mcc_index] /= allowed[mcc_index].sum()
    pair_mcc, pair_tr_type = np.nonzero(allowed)
    pair_probability = mcc_probability[pair_mcc] * allowed[pair_mcc, pair_tr_type]

    # Debits peak at hundreds to thousands, credits an order of magnitude higher.
    bucket_centre = np.where(tr_type_is_credit, 4.2, 3.0)
    bucket_index = np.arange(len(AMOUNT_BUCKET_EDGES_CENTS) - 1)
    bucket_given_type = np.exp(-0.5 * ((bucket_index[None, :] - bucket_centre[:, None]) / 1.2) ** 2)
    bucket_given_type /= bucket_given_type.sum(axis=1, keepdims=True)
    hours = np.arange(HOURS_PER_DAY)
    hour_probability = (
        0.15 + np.exp(-0.5 * ((hours - 13.0) / 4.0) ** 2) + 0.5 * np.exp(-0.5 * ((hours - 19.5) / 2.0) ** 2)
    )
    hour_probability /= hour_probability.sum()

    num_pairs, num_buckets = len(pair_mcc), len(bucket_index)
    pair_grid, bucket_grid, hour_grid = np.meshgrid(np.arange(num_pairs), bucket_index, hours, indexing="ij")
    pair_grid, bucket_grid, hour_grid = pair_grid.ravel(), bucket_grid.ravel(), hour_grid.ravel()
    base = (
        pair_probability[pair_grid]
        * bucket_given_type[pair_tr_type[pair_grid], bucket_grid]
        * hour_probability[hour_grid]
    )
    base /= base.sum()

    mcc_weights = rng.normal(size=config.num_mcc_codes)
    tr_type_weights = rng.normal(size=config.num_tr_types)
    bucket_weights = (bucket_index - 3.5) / 3.5 + 0.8 * rng.normal(size=num_buckets)
    phase = rng.uniform(0, HOURS_PER_DAY)
    hour_weights = np.cos(2 * np.pi * (hours - phase) / HOURS_PER_DAY) + 0.5 * np.sin(
        4 * np.pi * hours / HOURS_PER_DAY
    )
    outcome_fields = (pair_mcc[pair_grid], pair_tr_type[pair_grid], bucket_grid, hour_grid)
    weights = [mcc_weights, tr_type_weights, bucket_weights, hour_weights]
    for weight, outcome_index, share in zip(weights, outcome_fields, config.evidence_share, strict=True):
        part = weight[outcome_index]
        mean = np.sum(base * part)
        weight -= mean
        weight *= np.sqrt(share / np.sum(base * (part - mean) ** 2))
    score = sum(weight[outcome_index] for weight, outcome_index in zip(weights, outcome_fields, strict=True))
    total_std = np.sqrt(np.sum(base * score**2))
    for weight in weights:
        weight /= total_std
    return EventSpace(
        mcc_codes=mcc_codes,
        tr_types=tr_types,
        tr_type_is_credit=tr_type_is_credit,
        mcc_weights=mcc_weights,
        tr_type_weights=tr_type_weights,
        bucket_weights=bucket_weights,
        hour_weights=hour_weights,
        outcome_mcc=outcome_fields[0],
        outcome_tr_type=outcome_fields[1],
        outcome_bucket=outcome_fields[2],
        outcome_hour=outcome_fields[3],
        outcome_base_probability=base,
    )


def latent_grid(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """The latent values theta_k and log q[y, k], the discretised normal prior of theta given each label."""
    half_width = config.latent_mean + 5 * config.latent_std
    latent_values = np.linspace(-half_width, half_width, config.num_latent_values)
    centres = np.array([-config.latent_mean, config.latent_mean])
    log_prior = -0.5 * ((latent_values[None, :] - centres[:, None]) / config.latent_std) ** 2
    return latent_values, log_prior - logsumexp(log_prior, axis=1, keepdims=True)


def _history_lengths(num_customers: int, config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    body = np.exp(rng.normal(np.log(config.median_length), config.length_log_std, num_customers))
    low, high = config.heavy_length_range
    heavy = np.exp(rng.uniform(np.log(low), np.log(high), num_customers))
    lengths = np.where(rng.random(num_customers) < config.heavy_fraction, heavy, body)
    return np.clip(np.rint(lengths), 1, high).astype(np.int64)


def _terminal_pool(config: SyntheticConfig, rng: np.random.Generator) -> pa.Array:
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


def _sample_events(
    space: EventSpace,
    latent_index: np.ndarray,
    lengths: np.ndarray,
    latent_values: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Outcome index of every event (customers in order, `lengths[c]` events each), sampled from p(e | theta_k)."""
    event_customer = np.repeat(np.arange(len(lengths)), lengths)
    event_latent = latent_index[event_customer]
    outcome = np.empty(len(event_customer), dtype=np.int64)
    log_base, score = np.log(space.outcome_base_probability), space.outcome_score
    for k in tqdm(np.unique(latent_index), desc="sampling events", unit="latent value"):
        events = np.flatnonzero(event_latent == k)
        log_probability = log_base + latent_values[k] * score
        cumulative = np.cumsum(np.exp(log_probability - logsumexp(log_probability)))
        draws = np.searchsorted(cumulative, rng.random(len(events)) * cumulative[-1], side="right")
        outcome[events] = np.minimum(draws, len(cumulative) - 1)
    return outcome


def _file_order(customer_of_row: np.ndarray, config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
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


def generate_synthetic_data(
    output_dir: str | os.PathLike, num_customers: int = 8000, seed: int = 0, config: SyntheticConfig | None = None
) -> SyntheticDataInfo:
    """Writes `transactions.csv`, `gender_train.csv`, `gender_test_kaggle_sample_submission.csv` (real formats and
    quirks) and `oracle.json` (everything the exact posterior needs) to `output_dir`. Deterministic given the seed."""
    config = config or SyntheticConfig()
    if num_customers < 2:
        raise ValueError(f"num_customers must be at least 2, got {num_customers}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    space = _build_event_space(config, rng)
    latent_values, log_latent_prior = latent_grid(config)

    customer_ids = np.sort(rng.choice(np.arange(10_000_000, 100_000_000), num_customers, replace=False))
    labels = (rng.random(num_customers) < config.label_prior).astype(np.int64)
    latent_cumulative = np.cumsum(np.exp(log_latent_prior), axis=1)
    latent_index = (rng.random(num_customers)[:, None] > latent_cumulative[labels, :-1]).sum(axis=1)
    lengths = _history_lengths(num_customers, config, rng)
    outcome = _sample_events(space, latent_index, lengths, latent_values, rng)

    # Label-independent parts of each event.
    customer_of_event = np.repeat(np.arange(num_customers), lengths)
    num_events = len(customer_of_event)
    first_day = rng.integers(0, 120, num_customers)
    last_day = config.num_days - 1 - rng.integers(0, 30, num_customers)
    day = first_day[customer_of_event] + np.floor(
        rng.random(num_events) * (last_day - first_day + 1)[customer_of_event]
    ).astype(np.int64)
    hour = space.outcome_hour[outcome]
    minute = rng.integers(0, 60, num_events)
    second = rng.integers(0, 60, num_events)
    # Seconds = 60 as in the real data; never at minute 59, so the hour read back from the time stays `hour`.
    second[(rng.random(num_events) < config.second_60_fraction) & (minute < 59)] = 60
    bucket = space.outcome_bucket[outcome]
    edges = np.log10(np.array(AMOUNT_BUCKET_EDGES_CENTS, dtype=np.float64))
    cents = np.floor(10 ** rng.uniform(edges[bucket], edges[bucket + 1])).astype(np.int64)
    cents = np.clip(
        cents, np.array(AMOUNT_BUCKET_EDGES_CENTS)[bucket], np.array(AMOUNT_BUCKET_EDGES_CENTS)[bucket + 1] - 1
    )
    tr_type_index = space.outcome_tr_type[outcome]
    cents = np.where(space.tr_type_is_credit[tr_type_index], cents, -cents)
    term_probability = _zipf_probabilities(config.num_terminals, 1.05, rng)
    term_index = rng.choice(config.num_terminals, num_events, p=term_probability)
    term_index[rng.random(num_events) < config.missing_term_fraction] = -1

    # Within each customer by time, then customers in a random file order, then the small disorders.
    time_of_day = 3600 * hour + 60 * minute + second
    order = np.lexsort((time_of_day, day, customer_of_event))
    customer_rank = rng.permutation(num_customers)
    order = order[np.argsort(customer_rank[customer_of_event[order]], kind="stable")]
    order = order[_file_order(customer_rank[customer_of_event[order]], config, rng)]
    columns = {
        "customer_id": customer_ids[customer_of_event],
        "day": day,
        "hour": hour,
        "minute": minute,
        "second": second,
        "mcc_code": space.mcc_codes[space.outcome_mcc[outcome]],
        "tr_type": space.tr_types[tr_type_index],
        "amount_cents": cents,
        "term_index": term_index,
    }
    columns = {name: values[order] for name, values in columns.items()}
    transactions_path = output_dir / TRANSACTIONS_FILE
    _write_csv(transactions_path, columns, _terminal_pool(config, rng))

    labelled = rng.random(num_customers) < config.labelled_fraction
    train_labels_path, test_ids_path = output_dir / TRAIN_LABELS_FILE, output_dir / TEST_IDS_FILE
    _write_table_csv(train_labels_path, pa.table({"customer_id": customer_ids[labelled], "gender": labels[labelled]}))
    _write_table_csv(
        test_ids_path,
        pa.table({"customer_id": customer_ids[~labelled], "probability": np.full(int((~labelled).sum()), 0.5)}),
    )
    oracle = {
        "format_version": ORACLE_FORMAT_VERSION,
        "formula": (
            "log_odds = log(label_prior / (1 - label_prior)) + LSE_k[log_latent_prior[1][k] + latent_values[k] * S"
            " - n * log_partition[k]] - LSE_k[log_latent_prior[0][k] + latent_values[k] * S - n * log_partition[k]],"
            " S = sum over the n observed events of mcc_weights[mcc_code] + tr_type_weights[tr_type]"
            " + amount_bucket_weights[bucket(round(100 |amount|))] + hour_weights[floor(seconds of day / 3600)]"
        ),
        "config": asdict(config),
        "seed": seed,
        "label_prior": config.label_prior,
        "latent_values": latent_values.tolist(),
        "log_latent_prior": log_latent_prior.tolist(),
        "log_partition": space.log_partition(latent_values).tolist(),
        "mcc_codes": space.mcc_codes.tolist(),
        "mcc_weights": space.mcc_weights.tolist(),
        "tr_types": space.tr_types.tolist(),
        "tr_type_weights": space.tr_type_weights.tolist(),
        "tr_type_is_credit": space.tr_type_is_credit.tolist(),
        "amount_bucket_edges_cents": list(AMOUNT_BUCKET_EDGES_CENTS),
        "amount_bucket_weights": space.bucket_weights.tolist(),
        "hour_weights": space.hour_weights.tolist(),
        "customer_ids": customer_ids.tolist(),
        "labels": labels.tolist(),
        "latent_index": latent_index.tolist(),
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


def event_scores(
    oracle: dict, event_time: np.ndarray, mcc_code: np.ndarray, tr_type: np.ndarray, amount: np.ndarray
) -> np.ndarray:
    """g(e) of observed events, from the weights in oracle.json: the hour comes from the seconds of the day of
    `event_time`, the amount bucket from the integer cents of `|amount|`."""
    mcc_codes, tr_types = np.asarray(oracle["mcc_codes"]), np.asarray(oracle["tr_types"])
    mcc_index, tr_type_index = np.searchsorted(mcc_codes, mcc_code), np.searchsorted(tr_types, tr_type)
    unknown = (mcc_codes[np.minimum(mcc_index, len(mcc_codes) - 1)] != mcc_code) | (
        tr_types[np.minimum(tr_type_index, len(tr_types) - 1)] != tr_type
    )
    if unknown.any():
        raise ValueError("Events with codes that the synthetic process never generates: not synthetic data.")
    seconds_of_day = np.rint((event_time - np.floor(event_time)) * SECONDS_PER_DAY).astype(np.int64)
    hour = seconds_of_day // 3600
    cents = np.rint(np.abs(amount) * 100).astype(np.int64)
    bucket = np.searchsorted(np.asarray(oracle["amount_bucket_edges_cents"]), cents, side="right") - 1
    return (
        np.asarray(oracle["mcc_weights"])[mcc_index]
        + np.asarray(oracle["tr_type_weights"])[tr_type_index]
        + np.asarray(oracle["amount_bucket_weights"])[bucket]
        + np.asarray(oracle["hour_weights"])[hour]
    )


def posterior_log_odds(oracle: dict, score_sum: np.ndarray, num_events: np.ndarray) -> np.ndarray:
    """Exact log p(y=1 | events) / p(y=0 | events) from the score sum S and the number n of observed events."""
    latent_values = np.asarray(oracle["latent_values"])
    log_latent_prior = np.asarray(oracle["log_latent_prior"])
    shared = latent_values[None, :] * np.asarray(score_sum)[:, None] - np.outer(num_events, oracle["log_partition"])
    prior = oracle["label_prior"]
    return (
        np.log(prior / (1 - prior))
        + logsumexp(shared + log_latent_prior[1][None, :], axis=1)
        - logsumexp(shared + log_latent_prior[0][None, :], axis=1)
    )


def _flat_events(dataset) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """List offsets per customer and the flattened event columns of a customer dataset."""
    table = customer_table(dataset)
    values = {}
    for name in ("event_time", "mcc_code", "tr_type", "amount"):
        offsets, flat = list_offsets_and_values(table.column(name))
        values[name] = flat.to_numpy()
    return offsets, values


def _last_n_window(offsets: np.ndarray, last_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (flat event indices) of each customer's last `last_n` events (all when None)."""
    ends = offsets[1:]
    starts = offsets[:-1] if last_n is None else np.maximum(offsets[:-1], ends - last_n)
    return starts, ends


@dataclass
class SyntheticOracle:
    """The Bayes-optimal posterior of a generated data folder, evaluated on the events as the reader returns them."""

    parameters: dict
    customer_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    cumulative_score: np.ndarray

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> "SyntheticOracle":
        """Reads `oracle.json` and `transactions.csv` of a folder written by `generate_synthetic_data` (cached)."""
        data_dir = Path(data_dir).resolve()
        paths = (data_dir / ORACLE_FILE, data_dir / TRANSACTIONS_FILE)
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {data_dir} is not a generate_synthetic_data folder.")
        return _load_oracle(str(data_dir), tuple(path.stat().st_mtime_ns for path in paths))

    def _rows(self, customer_ids) -> np.ndarray:
        if customer_ids is None:
            return np.arange(len(self.customer_ids))
        customer_ids = np.asarray(customer_ids, dtype=np.int64)
        rows = np.clip(np.searchsorted(self.customer_ids, customer_ids), 0, len(self.customer_ids) - 1)
        unknown = self.customer_ids[rows] != customer_ids
        if unknown.any():
            raise KeyError(
                f"{int(unknown.sum())} customer ids are not in the synthetic data, e.g. {customer_ids[unknown][:5].tolist()}."
            )
        return rows

    def log_odds(self, customer_ids=None, last_n: int | None = None) -> np.ndarray:
        """Exact posterior log-odds of label 1 for each customer seeing only its last `last_n` events (None = all)."""
        starts, ends = _last_n_window(self.offsets, last_n)
        rows = self._rows(customer_ids)
        score_sum = self.cumulative_score[ends[rows]] - self.cumulative_score[starts[rows]]
        return posterior_log_odds(self.parameters, score_sum, ends[rows] - starts[rows])

    def true_labels(self, customer_ids=None) -> np.ndarray:
        """The generated labels of the customers (unlabelled test customers included)."""
        return self.labels[self._rows(customer_ids)]

    def auroc(self, customer_ids=None, last_n: int | None = None) -> float:
        """Bayes-optimal AUROC on the customers when each shows only its last `last_n` events (None = all)."""
        return float(roc_auc_score(self.true_labels(customer_ids), self.log_odds(customer_ids, last_n)))


@lru_cache(maxsize=2)
def _load_oracle(data_dir: str, modification_times: tuple[int, ...]) -> SyntheticOracle:
    parameters = json.loads((Path(data_dir) / ORACLE_FILE).read_text())
    if parameters.get("format_version") != ORACLE_FORMAT_VERSION:
        raise ValueError(
            f"{data_dir}/{ORACLE_FILE} has format {parameters.get('format_version')}, expected {ORACLE_FORMAT_VERSION}."
        )
    customers = build_customer_dataset(Path(data_dir) / TRANSACTIONS_FILE)
    offsets, events = _flat_events(customers)
    scores = event_scores(parameters, events["event_time"], events["mcc_code"], events["tr_type"], events["amount"])
    customer_ids = np.asarray(customers["customer_id"], dtype=np.int64)
    labels = dict(zip(parameters["customer_ids"], parameters["labels"], strict=True))
    return SyntheticOracle(
        parameters=parameters,
        customer_ids=customer_ids,
        labels=np.array([labels[customer] for customer in customer_ids.tolist()], dtype=np.int64),
        offsets=offsets,
        cumulative_score=np.r_[0.0, np.cumsum(scores)],
    )


def oracle_auroc(data_dir: str | os.PathLike, customer_ids=None, last_n: int | None = None) -> float:
    """Bayes-optimal AUROC of a generated data folder on `customer_ids` (all when None), each customer showing its
    last `last_n` events (all when None)."""
    return SyntheticOracle.load(data_dir).auroc(customer_ids, last_n)


def _window_mean_one_hot(dataset, last_n: int) -> np.ndarray:
    """Per customer, the mean over its last `last_n` events of one-hot mcc_code, tr_type, hour of day and signed
    decade of the amount."""
    offsets, events = _flat_events(dataset)
    seconds_of_day = np.rint((events["event_time"] - np.floor(events["event_time"])) * SECONDS_PER_DAY)
    amount = events["amount"]
    fields = [
        events["mcc_code"],
        events["tr_type"],
        (seconds_of_day // 3600).astype(np.int64),
        (np.sign(amount) * (1 + np.floor(np.log10(np.abs(amount) + 1e-3)))).astype(np.int64),
    ]
    starts, ends = _last_n_window(offsets, last_n)
    lengths = ends - starts
    in_window = np.repeat(starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    customer_row = np.repeat(np.arange(len(lengths)), lengths)
    blocks = []
    for values in fields:
        codes, column = np.unique(values[in_window], return_inverse=True)
        counts = np.zeros((len(lengths), len(codes)))
        np.add.at(counts, (customer_row, column), 1.0)
        blocks.append(counts / lengths[:, None])
    return np.hstack(blocks)


def mean_feature_baseline_auroc(
    data_dir: str | os.PathLike, train_ids, test_ids, last_n: int = 256, seed: int = 0
) -> float:
    """Test AUROC of a logistic regression on window-mean one-hot event features (`_window_mean_one_hot`): how close
    a learner that only sees means over the last `last_n` events gets to the oracle on the same window."""
    train_ids, test_ids = np.asarray(train_ids, dtype=np.int64), np.asarray(test_ids, dtype=np.int64)
    oracle = SyntheticOracle.load(data_dir)
    customers = build_customer_dataset(Path(data_dir) / TRANSACTIONS_FILE, customer_ids=np.r_[train_ids, test_ids])
    features = _window_mean_one_hot(customers, last_n)
    customer_ids = np.asarray(customers["customer_id"], dtype=np.int64)
    is_train = np.isin(customer_ids, train_ids)
    labels = oracle.true_labels(customer_ids)
    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=np.logspace(-4, 1, 11),
            cv=5,
            scoring="roc_auc",
            random_state=seed,
            l1_ratios=(0.0,),
            use_legacy_attributes=False,
        ),
    )
    model.fit(features[is_train], labels[is_train])
    return float(roc_auc_score(labels[~is_train], model.decision_function(features[~is_train])))
