"""The baseline a user would otherwise pick: hand-crafted per-customer aggregates (and/or customer embeddings from a
Parquet file) fed to LightGBM, on the model's held-out split and with the model's metrics."""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import datasets
import lightgbm
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from transformers import HfArgumentParser

from .cli import configure_logging
from .data import (
    EventVocabulary,
    customer_table,
    oracle_auroc,
    prepare_customers,
    split_for_evaluation,
    stratified_split,
)
from .data.reader import SECONDS_PER_DAY, list_offsets_and_values
from .file_names import BASELINE_PREDICTIONS_FILE, BASELINE_RESULTS_FILE
from .io_utils import atomic_write_json, check_writable_folder
from .metrics import classification_metrics, write_evaluated_predictions
from .training import DataArguments, data_files


logger = logging.getLogger(__name__)

# Fields with a column per code; distinct values are counted for these and the terminal.
CODE_FIELDS = ("mcc_code", "tr_type")
DISTINCT_FIELDS = (*CODE_FIELDS, "term_id")
OTHER_CODE = "other"
EMBEDDING_PREFIX = "emb_"
AMOUNT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Decades of |amount|: from cents (10^-2) to 10^8; amounts outside go to the end decades.
AMOUNT_DECADES = range(-2, 9)
HOURS_PER_DAY = 24
DAYS_PER_WEEK = 7
FeatureSet = Literal["aggregates", "embeddings", "both"]
FEATURE_SETS = get_args(FeatureSet)


class CustomerFeatures(NamedTuple):
    """A feature matrix with one row per customer: `customer_ids` [n], `values` float32 [n, d], `names` [d]."""

    customer_ids: np.ndarray
    values: np.ndarray
    names: list[str]


@dataclass
class FlatEvents:
    """The events of a customer dataset flattened in customer order: `row` is each event's customer row."""

    customer_ids: np.ndarray
    lengths: np.ndarray
    row: np.ndarray
    event_time: np.ndarray
    amount: np.ndarray
    codes: dict[str, pa.Array]

    @property
    def num_customers(self) -> int:
        """Number of customers (rows of every feature matrix)."""
        return len(self.customer_ids)


def flatten_events(dataset: datasets.Dataset, max_events: int | None = None) -> FlatEvents:
    """The events of every customer of `dataset` (only the last `max_events` of each when given), one flat array per
    column."""
    table = customer_table(dataset)
    offsets, _ = list_offsets_and_values(table.column("event_time"))
    lengths = np.diff(offsets)
    keep = None
    if max_events is not None:
        position_from_end = np.repeat(offsets[1:], lengths) - np.arange(offsets[-1])
        keep = position_from_end <= max_events
        lengths = np.minimum(lengths, max_events)

    def flat(name: str) -> pa.Array:
        values = list_offsets_and_values(table.column(name))[1]
        return values if keep is None else values.filter(pa.array(keep))

    return FlatEvents(
        customer_ids=table.column("customer_id").to_numpy().astype(np.int64),
        lengths=lengths,
        row=np.repeat(np.arange(table.num_rows), lengths),
        event_time=flat("event_time").to_numpy(),
        amount=flat("amount").to_numpy(),
        codes={name: flat(name) for name in DISTINCT_FIELDS},
    )


@dataclass
class AggregateFeaturizer:
    """Per-customer aggregates of the event histories, in the spirit of pytorch-lifestream's hand-crafted features.

    Per MCC code and per transaction type: count, share of events, sum and mean of the amount; shares per hour of day,
    day of week (day index modulo 7) and decade of the debit and credit amounts; count, sum, mean, std, min, max and
    quantiles of all, debit and credit amounts; activity span, active days, gaps, distinct codes and terminals.
    The codes with a column are those of the training customers (`fit`); any other code counts as "other".
    """

    vocabulary: EventVocabulary
    max_events: int | None = None

    @classmethod
    def fit(
        cls, dataset: datasets.Dataset, max_events: int | None = None, **vocabulary_kwargs
    ) -> "AggregateFeaturizer":
        """Takes the MCC codes and types of `dataset` (the training customers) with the model vocabulary's rules;
        `vocabulary_kwargs` go to `EventVocabulary.fit` (e.g. `min_count`). `max_events`: aggregate only the most
        recent events of each customer."""
        vocabulary = EventVocabulary.fit(dataset, categorical_fields=CODE_FIELDS, **vocabulary_kwargs)
        return cls(vocabulary, max_events)

    def transform(self, dataset: datasets.Dataset) -> CustomerFeatures:
        """The feature matrix of every customer of `dataset`, in its row order (vectorised over events)."""
        events = flatten_events(dataset, self.max_events)
        blocks = [
            *(code_aggregates(events, vocabulary) for vocabulary in self.vocabulary.fields),
            calendar_shares(events),
            amount_decade_shares(events),
            amount_statistics(events),
            activity_statistics(events),
        ]
        return CustomerFeatures(
            customer_ids=events.customer_ids,
            values=np.hstack([values for values, _ in blocks]).astype(np.float32),
            names=[name for _, names in blocks for name in names],
        )


def customer_aggregates(dataset: datasets.Dataset, featurizer: AggregateFeaturizer | None = None) -> CustomerFeatures:
    """`(customer_ids, feature_matrix, feature_names)` of `dataset` with `featurizer`, or one fitted on `dataset`."""
    return (featurizer or AggregateFeaturizer.fit(dataset)).transform(dataset)


def _per_customer_sums(events: FlatEvents, column: np.ndarray, width: int, weights: np.ndarray | None = None):
    """[customers, width] sums of `weights` (or counts) of the events by customer row and `column` index."""
    flat = np.bincount(events.row * width + column, weights=weights, minlength=events.num_customers * width)
    return flat.reshape(events.num_customers, width)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN (LightGBM's "missing") where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _shares(counts: np.ndarray, events: FlatEvents) -> np.ndarray:
    return _divide(counts, events.lengths[:, None].astype(np.float64))


def code_aggregates(events: FlatEvents, vocabulary) -> tuple[np.ndarray, list[str]]:
    """Count, share, amount sum and amount mean per known code of one field, and for the other codes together."""
    # The vocabulary's index 1 (unknown) becomes column 0 ("other"), its known codes columns 1 onwards.
    column = vocabulary.encode_values(events.codes[vocabulary.name]).to_numpy() - 1
    width = 1 + len(vocabulary.codes)
    counts = _per_customer_sums(events, column, width)
    amount_sums = _per_customer_sums(events, column, width, weights=events.amount)
    labels = [OTHER_CODE, *vocabulary.codes]
    names = [
        f"{vocabulary.name}={code}:{statistic}"
        for statistic in ("count", "share", "amount_sum", "amount_mean")
        for code in labels
    ]
    return np.hstack([counts, _shares(counts, events), amount_sums, _divide(amount_sums, counts)]), names


def calendar_shares(events: FlatEvents) -> tuple[np.ndarray, list[str]]:
    """Shares of events per hour of day and per day of week (day index modulo 7: the weekday of day 0 is unknown)."""
    day = np.floor(events.event_time)
    seconds_of_day = np.rint((events.event_time - day) * SECONDS_PER_DAY).astype(np.int64)
    hour = np.minimum(seconds_of_day // 3600, HOURS_PER_DAY - 1)
    weekday = day.astype(np.int64) % DAYS_PER_WEEK
    values = np.hstack(
        [
            _shares(_per_customer_sums(events, hour, HOURS_PER_DAY), events),
            _shares(_per_customer_sums(events, weekday, DAYS_PER_WEEK), events),
        ]
    )
    names = [f"hour={hour}:share" for hour in range(HOURS_PER_DAY)]
    names += [f"weekday={weekday}:share" for weekday in range(DAYS_PER_WEEK)]
    return values, names


def amount_decade_shares(events: FlatEvents) -> tuple[np.ndarray, list[str]]:
    """Shares of events per decade of |amount| (10^d <= |amount| < 10^(d+1)), debits and credits apart; zero
    amounts count in neither."""
    with np.errstate(divide="ignore"):
        decade = np.floor(np.log10(np.abs(events.amount)))
    decade = np.clip(decade, AMOUNT_DECADES[0], AMOUNT_DECADES[-1]).astype(np.int64) - AMOUNT_DECADES[0]
    num_decades = len(AMOUNT_DECADES)
    # Column 0..num_decades-1: debits; then credits; then zero amounts (dropped).
    column = np.where(events.amount < 0, decade, np.where(events.amount > 0, num_decades + decade, 2 * num_decades))
    shares = _shares(_per_customer_sums(events, column, 2 * num_decades + 1)[:, :-1], events)
    names = [f"{side}_decade={decade}:share" for side in ("debit", "credit") for decade in AMOUNT_DECADES]
    return shares, names


def amount_statistics(events: FlatEvents) -> tuple[np.ndarray, list[str]]:
    """Count, sum, mean, std, min, max and quantiles of the signed amounts: all events, debits, credits; and the
    share of debits."""
    # Sorted by customer then amount, debits (negative) come before credits within each customer, so each group's
    # values stay sorted after masking: quantiles are index arithmetic.
    # One sort of an integer key (customer row, rank of the amount) rather than `np.lexsort` (docs/baseline.md).
    amount_rank = np.empty(len(events.amount), dtype=np.int64)
    amount_rank[np.argsort(events.amount)] = np.arange(len(events.amount))
    order = np.argsort(events.row.astype(np.int64) * len(events.amount) + amount_rank)
    sorted_row, sorted_amount = events.row[order], events.amount[order]
    blocks, names = [], []
    for group, in_group in (
        ("amount", np.ones(len(sorted_amount), dtype=bool)),
        ("debit", sorted_amount < 0),
        ("credit", sorted_amount > 0),
    ):
        values, statistics = _sorted_group_statistics(sorted_row[in_group], sorted_amount[in_group], events)
        blocks.append(values)
        names += [f"{group}:{statistic}" for statistic in statistics]
    debit_count = blocks[1][:, 0]
    return np.hstack([*blocks, _divide(debit_count, events.lengths)[:, None]]), [*names, "debit:share"]


def _sorted_group_statistics(row: np.ndarray, amount: np.ndarray, events: FlatEvents):
    """Per-customer statistics of `amount` values sorted by (row, amount); NaN for customers without values."""
    count = np.bincount(row, minlength=events.num_customers).astype(np.float64)
    total = np.bincount(row, weights=amount, minlength=events.num_customers)
    mean = _divide(total, count)
    squared_deviations = np.bincount(row, weights=(amount - mean[row]) ** 2, minlength=events.num_customers)
    start = np.cumsum(count).astype(np.int64) - count.astype(np.int64)
    last = np.maximum(count.astype(np.int64) - 1, 0)
    present = count > 0
    padded = np.r_[amount, np.nan]  # customers without values read index len(amount): NaN

    def at(index_in_group: np.ndarray) -> np.ndarray:
        return padded[np.where(present, start + index_in_group, len(amount))]

    quantiles = []
    for quantile in AMOUNT_QUANTILES:
        # Linear interpolation between order statistics, as numpy.quantile.
        position = quantile * last
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, last)
        quantiles.append(at(below) + (position - below) * (at(above) - at(below)))
    values = np.column_stack(
        [
            count,
            total,
            mean,
            np.sqrt(_divide(squared_deviations, count)),
            at(np.zeros_like(last)),
            at(last),
            *quantiles,
        ]
    )
    statistics = ["count", "sum", "mean", "std", "min", "max", *(f"q{round(100 * q)}" for q in AMOUNT_QUANTILES)]
    return values, statistics


def _distinct_per_customer(events: FlatEvents, codes: pa.Array) -> np.ndarray:
    """Number of distinct non-null `codes` of each customer."""
    encoded = pc.dictionary_encode(codes)
    width = max(len(encoded.dictionary), 1)
    present = pc.is_valid(encoded.indices).to_numpy(zero_copy_only=False)
    keys = np.sort(events.row[present].astype(np.int64) * width + encoded.indices.drop_null().to_numpy())
    first_of_pair = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, dtype=bool)
    return np.bincount(keys[first_of_pair] // width, minlength=events.num_customers).astype(np.float64)


def activity_statistics(events: FlatEvents) -> tuple[np.ndarray, list[str]]:
    """Events, first and last day, span, active days, events per day, gaps between events, distinct codes and
    terminals, share of events without a terminal."""
    count = events.lengths.astype(np.float64)
    start = np.cumsum(events.lengths) - events.lengths
    end = start + events.lengths - 1
    present = events.lengths > 0
    padded_time = np.r_[events.event_time, np.nan]
    first = padded_time[np.where(present, start, len(events.event_time))]
    last = padded_time[np.where(present, end, len(events.event_time))]
    span = last - first
    active_days = _distinct_per_customer(events, pa.array(np.floor(events.event_time).astype(np.int64)))

    same_customer = events.row[1:] == events.row[:-1]
    gap_row = events.row[1:][same_customer]
    gap = np.diff(events.event_time)[same_customer]
    gap_count = np.bincount(gap_row, minlength=events.num_customers).astype(np.float64)
    gap_mean = _divide(np.bincount(gap_row, weights=gap, minlength=events.num_customers), gap_count)
    gap_variance = _divide(
        np.bincount(gap_row, weights=(gap - gap_mean[gap_row]) ** 2, minlength=events.num_customers), gap_count
    )
    gap_max = np.full(events.num_customers, np.nan)
    np.fmax.at(gap_max, gap_row, gap)

    distinct = [_distinct_per_customer(events, events.codes[name]) for name in DISTINCT_FIELDS]
    no_terminal = pc.is_null(events.codes["term_id"]).to_numpy(zero_copy_only=False)
    missing_terminal = np.bincount(events.row, weights=no_terminal, minlength=events.num_customers)
    values = np.column_stack(
        [
            count,
            first,
            last,
            span,
            active_days,
            _divide(count, span + 1),
            _divide(count, active_days),
            gap_mean,
            np.sqrt(gap_variance),
            gap_max,
            *distinct,
            _divide(missing_terminal, count),
        ]
    )
    names = [
        "num_events",
        "first_day",
        "last_day",
        "span_days",
        "active_days",
        "events_per_day",
        "events_per_active_day",
        "gap_days:mean",
        "gap_days:std",
        "gap_days:max",
        *(f"{name}:distinct" for name in DISTINCT_FIELDS),
        "term_id:missing_share",
    ]
    return values, names


def read_customer_embeddings(path: str | os.PathLike) -> CustomerFeatures:
    """Customer embeddings from a Parquet file: one row per customer, an integer `customer_id` column and numeric
    columns `emb_0` … `emb_{d-1}` (other columns are ignored). Bad files raise naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embeddings file.")
    try:
        schema = pq.read_schema(path)
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: not a Parquet file ({error})") from None
    if "customer_id" not in schema.names or not pa.types.is_integer(schema.field("customer_id").type):
        raise ValueError(f"{path}: expected an integer `customer_id` column; the columns are {schema.names}.")
    embedding_names = [name for name in schema.names if name.startswith(EMBEDDING_PREFIX)]
    expected = [f"{EMBEDDING_PREFIX}{index}" for index in range(len(embedding_names))]
    if not embedding_names or set(embedding_names) != set(expected):
        raise ValueError(
            f"{path}: expected embedding columns {EMBEDDING_PREFIX}0 … {EMBEDDING_PREFIX}{{d-1}}; found "
            f"{embedding_names or 'none'}."
        )
    not_numeric = [
        name
        for name in expected
        if not (pa.types.is_floating(schema.field(name).type) or pa.types.is_integer(schema.field(name).type))
    ]
    if not_numeric:
        raise ValueError(f"{path}: embedding columns {not_numeric} are not numeric.")
    table = pq.read_table(path, columns=["customer_id", *expected])
    if table.num_rows == 0:
        raise ValueError(f"{path}: the file has no rows.")
    customer_ids = table.column("customer_id")
    if customer_ids.null_count:
        raise ValueError(f"{path}: row {pc.index(pc.is_null(customer_ids), True).as_py()} has no customer_id.")
    customer_ids = customer_ids.to_numpy().astype(np.int64)
    unique_ids, counts = np.unique(customer_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path}: customer_id {unique_ids[counts > 1][0]} appears {counts.max()} times.")
    values = np.column_stack([table.column(name).to_numpy().astype(np.float32) for name in expected])
    if not np.isfinite(values).all():
        bad_row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise ValueError(f"{path}: customer {customer_ids[bad_row]} has a missing or non-finite embedding value.")
    return CustomerFeatures(customer_ids, values, expected)


def select_customers(features: CustomerFeatures, customer_ids: np.ndarray, source: str) -> CustomerFeatures:
    """The rows of `features` for `customer_ids`, in that order; customers that `features` lacks raise, naming
    them and `source`."""
    customer_ids = np.asarray(customer_ids, dtype=np.int64)
    order = np.argsort(features.customer_ids)
    position = np.clip(np.searchsorted(features.customer_ids[order], customer_ids), 0, len(order) - 1)
    rows = order[position]
    missing = features.customer_ids[rows] != customer_ids
    if missing.any():
        raise ValueError(
            f"{source} has no row for {int(missing.sum())} customer(s), e.g. customer_id "
            f"{customer_ids[missing][:5].tolist()}: write embeddings for every customer (labelled or not)."
        )
    return CustomerFeatures(customer_ids, features.values[rows], features.names)


def build_features(
    dataset: datasets.Dataset,
    feature_set: FeatureSet,
    featurizer: AggregateFeaturizer | None,
    embeddings: CustomerFeatures | None,
    embeddings_source: str = "the embeddings",
) -> CustomerFeatures:
    """The features of the customers of `dataset`: aggregates, embeddings joined on customer_id, or both side by
    side."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"features must be one of {FEATURE_SETS}, got {feature_set!r}.")
    parts = []
    if feature_set in ("aggregates", "both"):
        parts.append(featurizer.transform(dataset))
    if feature_set in ("embeddings", "both"):
        if embeddings is None:
            raise ValueError(f"features={feature_set!r} needs customer embeddings (--embeddings FILE.parquet).")
        customer_ids = np.asarray(dataset["customer_id"], dtype=np.int64)
        parts.append(select_customers(embeddings, customer_ids, embeddings_source))
    return CustomerFeatures(
        parts[0].customer_ids,
        np.hstack([part.values for part in parts]),
        [name for part in parts for name in part.names],
    )


@dataclass
class LightGBMArguments:
    """The gradient-boosting model: binary LightGBM with early stopping on a validation part of the training
    customers (names as in LightGBM's parameters)."""

    num_boost_round: int = field(default=2000, metadata={"help": "Most boosting rounds (early stopping picks fewer)."})
    learning_rate: float = field(default=0.03, metadata={"help": "Shrinkage per round."})
    num_leaves: int = field(default=31, metadata={"help": "Leaves per tree."})
    min_data_in_leaf: int = field(default=50, metadata={"help": "Fewest customers in a leaf."})
    bagging_fraction: float = field(default=0.8, metadata={"help": "Share of customers drawn for each round."})
    feature_fraction: float = field(default=0.5, metadata={"help": "Share of features drawn for each tree."})
    lambda_l2: float = field(default=1.0, metadata={"help": "L2 penalty on leaf values."})
    early_stopping_rounds: int = field(default=100, metadata={"help": "Stop after so many rounds without gain."})
    num_threads: int = field(
        default=1,
        metadata={
            "help": "LightGBM threads (0 = all cores). One by default: LightGBM's threads spin while they wait, "
            "which is slow on busy cores (docs/baseline.md)."
        },
    )

    def params(self, seed: int) -> dict:
        """The `lightgbm.train` parameters: binary objective, AUROC monitored, deterministic given the seed."""
        return {
            "objective": "binary",
            "metric": "auc",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "num_threads": self.num_threads,
            "seed": seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }


@dataclass
class BaselineResult:
    """A fitted baseline and its held-out evaluation."""

    model: lightgbm.Booster
    featurizer: AggregateFeaturizer | None
    feature_names: list[str]
    metrics: dict
    held_out_ids: np.ndarray
    held_out_probabilities: np.ndarray


def train_baseline(
    train: datasets.Dataset,
    held_out: datasets.Dataset,
    seed: int = 42,
    feature_set: FeatureSet = "aggregates",
    embeddings: CustomerFeatures | None = None,
    max_events: int | None = None,
    lightgbm_args: LightGBMArguments | None = None,
    embeddings_source: str = "the embeddings",
    validation_fraction: float = 0.1,
) -> BaselineResult:
    """Fits the features on `train`, carves a stratified validation part out of `train` for early stopping (the
    held-out customers never steer training), trains LightGBM and scores `held_out` with the model's metrics."""
    lightgbm_args = lightgbm_args or LightGBMArguments()
    started = time.perf_counter()
    featurizer = AggregateFeaturizer.fit(train, max_events) if feature_set != "embeddings" else None
    fit_part, validation = stratified_split(train, test_size=validation_fraction, seed=seed)
    fit_features, validation_features, held_out_features = (
        build_features(part, feature_set, featurizer, embeddings, embeddings_source)
        for part in (fit_part, validation, held_out)
    )
    features_seconds = time.perf_counter() - started

    started = time.perf_counter()
    model = lightgbm.train(
        lightgbm_args.params(seed),
        lightgbm.Dataset(fit_features.values, np.asarray(fit_part["labels"])),
        num_boost_round=lightgbm_args.num_boost_round,
        valid_sets=[lightgbm.Dataset(validation_features.values, np.asarray(validation["labels"]))],
        valid_names=["validation"],
        callbacks=[lightgbm.early_stopping(lightgbm_args.early_stopping_rounds, verbose=False)],
    )
    train_seconds = time.perf_counter() - started
    probabilities = model.predict(held_out_features.values, num_iteration=model.best_iteration)
    metrics = {
        **{
            f"eval_{name}": value
            for name, value in classification_metrics(np.asarray(held_out["labels"]), probabilities).items()
        },
        "validation_auroc": float(model.best_score["validation"]["auc"]),
        "best_iteration": int(model.best_iteration),
        "num_features": len(fit_features.names),
        "train_samples": len(fit_part),
        "validation_samples": len(validation),
        "eval_samples": len(held_out),
        "features_seconds": features_seconds,
        "train_seconds": train_seconds,
    }
    return BaselineResult(
        model, featurizer, fit_features.names, metrics, held_out_features.customer_ids, probabilities
    )


def top_features(result: BaselineResult, count: int = 20) -> list[tuple[str, float]]:
    """The `count` features with the largest total split gain."""
    gains = result.model.feature_importance(importance_type="gain")
    return [(result.feature_names[index], float(gains[index])) for index in np.argsort(-gains)[:count]]


@dataclass
class BaselineDataArguments(DataArguments):
    """The model's data arguments (same data, same held-out split), aggregating whole histories by default."""

    max_length: int | None = field(
        default=0, metadata={"help": "Aggregate only the most recent events of each customer; 0 = whole histories."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.streaming:
            raise ValueError("--streaming is for scripts/train.py: the baseline reads the prepared customers at once.")


@dataclass
class BaselineArguments:
    """What the baseline trains on and where it writes."""

    features: FeatureSet = field(
        default="aggregates", metadata={"help": "Aggregates, embeddings (--embeddings) or both side by side."}
    )
    embeddings: str | None = field(
        default=None, metadata={"help": "Parquet file: customer_id plus emb_0 … emb_{d-1} (docs/baseline.md)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the early-stopping split and of LightGBM."})
    output_dir: str = field(default="outputs/baseline", metadata={"help": "Output folder."})


def load_labelled_customers(data_args: DataArguments) -> tuple[datasets.Dataset, Path | None]:
    """The labelled customers of the data flags (real files, or the synthetic data that training uses), prepared once
    into the cache as training prepares them, and the synthetic folder (None for real data)."""
    transactions, labels, synthetic_dir = data_files(data_args)
    return prepare_customers(transactions, labels, cache_dir=data_args.data_cache_dir), synthetic_dir


def run_baseline(data_args: DataArguments, baseline_args: BaselineArguments, lightgbm_args: LightGBMArguments) -> dict:
    """Reads the data, splits it as training does, trains and evaluates the baseline and writes the results JSON
    and the held-out predictions to `output_dir`."""
    started = time.perf_counter()
    if (baseline_args.features == "aggregates") != (baseline_args.embeddings is None):
        raise ValueError(
            f"--features {baseline_args.features} with --embeddings {baseline_args.embeddings}: embeddings go with "
            "--features embeddings or both, and only there."
        )
    output_dir = check_writable_folder(baseline_args.output_dir, "--output_dir")
    embeddings = None if baseline_args.embeddings is None else read_customer_embeddings(baseline_args.embeddings)
    customers, synthetic_dir = load_labelled_customers(data_args)
    train, held_out = split_for_evaluation(
        customers, data_args.eval_fraction, data_args.split_seed, data_args.max_train_customers
    )
    read_seconds = time.perf_counter() - started
    result = train_baseline(
        train,
        held_out,
        seed=baseline_args.seed,
        feature_set=baseline_args.features,
        embeddings=embeddings,
        max_events=data_args.max_length,
        lightgbm_args=lightgbm_args,
        embeddings_source=str(baseline_args.embeddings),
        validation_fraction=data_args.validation_fraction,
    )
    metrics = {**result.metrics, "read_seconds": read_seconds}
    if synthetic_dir is not None:
        metrics["oracle_auroc_all"] = oracle_auroc(synthetic_dir, result.held_out_ids)
        if data_args.max_length is not None:
            metrics["oracle_auroc_last_max_length"] = oracle_auroc(
                synthetic_dir, result.held_out_ids, last_n=data_args.max_length
            )
    metrics["total_seconds"] = time.perf_counter() - started

    output_dir = Path(baseline_args.output_dir)

    write_evaluated_predictions(
        output_dir / BASELINE_PREDICTIONS_FILE, result.held_out_ids, held_out["labels"], result.held_out_probabilities
    )
    atomic_write_json(
        output_dir / BASELINE_RESULTS_FILE,
        {
            "metrics": metrics,
            "top_features_by_gain": top_features(result),
            "data_args": asdict(data_args),
            "baseline_args": asdict(baseline_args),
            "lightgbm_args": asdict(lightgbm_args),
            "versions": {"lightgbm": lightgbm.__version__},
        },
    )
    return metrics


def format_baseline_result(metrics: dict, feature_set: str) -> str:
    """The baseline's closing table: its held-out AUROC next to the oracle AUROCs of synthetic data."""
    rows = [
        (f"LightGBM on {feature_set}, {metrics['num_features']} features (held-out)", metrics["eval_auroc"]),
        *(
            (text, metrics[key])
            for key, text in (
                ("oracle_auroc_all", "oracle, all events"),
                ("oracle_auroc_last_max_length", "oracle, same window"),
            )
            if key in metrics
        ),
    ]
    lines = ["| | AUROC |", "|---|---|", *(f"| {name} | {auroc:.4f} |" for name, auroc in rows)]
    lines.append(
        f"\naccuracy {metrics['eval_accuracy']:.4f}, log loss {metrics['eval_log_loss']:.4f}, "
        f"{metrics['best_iteration']} rounds, {metrics['total_seconds']:.1f} s in all"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line: `python scripts/baseline.py [--transactions ... --labels ...] [--features both --embeddings F]`."""
    parser = HfArgumentParser((BaselineDataArguments, BaselineArguments, LightGBMArguments))
    data_args, baseline_args, lightgbm_args = parser.parse_args_into_dataclasses(args=argv)
    configure_logging()
    metrics = run_baseline(data_args, baseline_args, lightgbm_args)
    print(f"\nBaseline held-out results ({baseline_args.output_dir}):")
    print(format_baseline_result(metrics, baseline_args.features))
    print(json.dumps({key: value for key, value in metrics.items() if "auroc" in key}, indent=2))
    return metrics


__all__ = [
    "AggregateFeaturizer",
    "BaselineArguments",
    "BaselineDataArguments",
    "BaselineResult",
    "CustomerFeatures",
    "LightGBMArguments",
    "build_features",
    "customer_aggregates",
    "load_labelled_customers",
    "main",
    "read_customer_embeddings",
    "run_baseline",
    "train_baseline",
]
