"""Synthetic bank transactions in the real file format, from a generative process whose exact label posterior is
known, so a model can be compared with the Bayes-optimal AUROC (the "oracle") on the same customers.

Three families (`SYNTHETIC_FAMILIES`): "independent" (the default, below), "long" (the same process with long
histories and a weak per-event signal that keeps accruing, `LONG_HISTORY_CONFIG`) and "order" (the label lives in
which MCC follows which, `synthetic_order.py`). oracle.json names the family; `SyntheticOracle` reads it.

Generative process of the independent family (docs/data.md gives it in full):

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
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from .reader import SECONDS_PER_DAY, build_customer_dataset, customer_table, list_offsets_and_values
from .synthetic_common import (
    HOURS_PER_DAY,
    ORACLE_FILE,
    ORACLE_FORMAT_VERSION,
    TEST_IDS_FILE,
    TRAIN_LABELS_FILE,
    TRANSACTIONS_FILE,
    SampledCustomers,
    SyntheticBaseConfig,
    SyntheticDataInfo,
    activity_days,
    build_code_sets,
    draw_customers,
    history_lengths,
    hour_of_day_probability,
    terminal_indices,
    write_synthetic_files,
)
from .synthetic_order import OrderPosterior, OrderSyntheticConfig, sample_order_family


__all__ = [
    "LONG_HISTORY_CONFIG",
    "ORACLE_FILE",
    "SYNTHETIC_FAMILIES",
    "TEST_IDS_FILE",
    "TRAIN_LABELS_FILE",
    "TRANSACTIONS_FILE",
    "OrderSyntheticConfig",
    "SyntheticConfig",
    "SyntheticDataInfo",
    "SyntheticOracle",
    "aggregate_baseline_auroc",
    "generate_synthetic_data",
    "mean_feature_baseline_auroc",
    "oracle_auroc",
]


# Amount buckets are decades of |amount| in integer cents: bucket b holds cents in [edges[b], edges[b + 1]).
AMOUNT_BUCKET_EDGES_CENTS = (1, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 15_000_000_000)


@dataclass(frozen=True)
class SyntheticConfig(SyntheticBaseConfig):
    """The constants of the independent (and long) family's generative process (all saved in oracle.json)."""

    latent_mean: float = 0.067
    latent_std: float = 0.065
    num_latent_values: int = 41
    evidence_share: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)


# Long histories, a weak per-event signal and a latent spread small against the label shift: the oracle keeps
# gaining up to thousands of events instead of saturating near a thousand.
LONG_HISTORY_CONFIG = SyntheticConfig(latent_mean=0.017, latent_std=0.006, median_length=1500.0, length_log_std=1.1)


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


def _build_event_space(config: SyntheticConfig, rng: np.random.Generator) -> EventSpace:
    """Real-like code sets and base frequencies, and the score weights scaled so that g has mean 0 and variance 1
    under the base distribution, each field carrying its `evidence_share` of that variance."""
    codes = build_code_sets(config, rng)
    tr_type_is_credit = codes.tr_type_is_credit
    pair_mcc, pair_tr_type = np.nonzero(codes.tr_type_given_mcc)
    pair_probability = codes.mcc_probability[pair_mcc] * codes.tr_type_given_mcc[pair_mcc, pair_tr_type]

    # Debits peak at hundreds to thousands, credits an order of magnitude higher.
    bucket_centre = np.where(tr_type_is_credit, 4.2, 3.0)
    bucket_index = np.arange(len(AMOUNT_BUCKET_EDGES_CENTS) - 1)
    bucket_given_type = np.exp(-0.5 * ((bucket_index[None, :] - bucket_centre[:, None]) / 1.2) ** 2)
    bucket_given_type /= bucket_given_type.sum(axis=1, keepdims=True)
    hours = np.arange(HOURS_PER_DAY)
    hour_probability = hour_of_day_probability()

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
        mcc_codes=codes.mcc_codes,
        tr_types=codes.tr_types,
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


def _sample_independent_family(
    num_customers: int, config: SyntheticConfig, rng: np.random.Generator
) -> SampledCustomers:
    """Customers, labels and events of the independent (and long) family, with the parameters its posterior needs."""
    space = _build_event_space(config, rng)
    latent_values, log_latent_prior = latent_grid(config)

    customer_ids, labels = draw_customers(num_customers, config, rng)
    latent_cumulative = np.cumsum(np.exp(log_latent_prior), axis=1)
    latent_index = (rng.random(num_customers)[:, None] > latent_cumulative[labels, :-1]).sum(axis=1)
    lengths = history_lengths(num_customers, config, rng)
    outcome = _sample_events(space, latent_index, lengths, latent_values, rng)

    # Label-independent parts of each event.
    customer_of_event = np.repeat(np.arange(num_customers), lengths)
    num_events = len(customer_of_event)
    first_day, last_day = activity_days(num_customers, config, rng)
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
    term_index = terminal_indices(num_events, config, rng)

    # Within each customer by time (ties in any order: the posterior depends on the set of events only).
    time_of_day = 3600 * hour + 60 * minute + second
    order = np.lexsort((time_of_day, day, customer_of_event))
    columns = {
        "day": day,
        "hour": hour,
        "minute": minute,
        "second": second,
        "mcc_code": space.mcc_codes[space.outcome_mcc[outcome]],
        "tr_type": space.tr_types[tr_type_index],
        "amount_cents": cents,
        "term_index": term_index,
    }
    oracle = {
        "formula": (
            "log_odds = log(label_prior / (1 - label_prior)) + LSE_k[log_latent_prior[1][k] + latent_values[k] * S"
            " - n * log_partition[k]] - LSE_k[log_latent_prior[0][k] + latent_values[k] * S - n * log_partition[k]],"
            " S = sum over the n observed events of mcc_weights[mcc_code] + tr_type_weights[tr_type]"
            " + amount_bucket_weights[bucket(round(100 |amount|))] + hour_weights[floor(seconds of day / 3600)]"
        ),
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
        "latent_index": latent_index.tolist(),
    }
    return SampledCustomers(
        customer_ids, labels, customer_of_event, {name: values[order] for name, values in columns.items()}, oracle
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


@dataclass
class ScoreSumPosterior:
    """Posterior log-odds of any window of a customer's events, from the cumulative score sum."""

    parameters: dict
    # Cumulative sum, with a leading 0, of g(e) over the flat events.
    cumulative_score: np.ndarray

    @classmethod
    def from_events(cls, parameters: dict, events: dict[str, np.ndarray]) -> "ScoreSumPosterior":
        """From flat `event_time`, `mcc_code`, `tr_type` and `amount` arrays of customers' events."""
        scores = event_scores(
            parameters, events["event_time"], events["mcc_code"], events["tr_type"], events["amount"]
        )
        return cls(parameters, np.r_[0.0, np.cumsum(scores)])

    def __call__(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Log-odds of label 1 for the windows of flat events [starts, ends), each within one customer."""
        return posterior_log_odds(
            self.parameters, self.cumulative_score[ends] - self.cumulative_score[starts], ends - starts
        )


@dataclass(frozen=True)
class SyntheticFamily:
    """A generative process: its default constants, its sampler and its exact window posterior."""

    default_config: SyntheticBaseConfig
    sample: Callable[[int, SyntheticBaseConfig, np.random.Generator], SampledCustomers]
    posterior: Callable[[dict, dict[str, np.ndarray]], Callable[[np.ndarray, np.ndarray], np.ndarray]]


FAMILIES = {
    "independent": SyntheticFamily(SyntheticConfig(), _sample_independent_family, ScoreSumPosterior.from_events),
    "order": SyntheticFamily(OrderSyntheticConfig(), sample_order_family, OrderPosterior.from_events),
    "long": SyntheticFamily(LONG_HISTORY_CONFIG, _sample_independent_family, ScoreSumPosterior.from_events),
}
SYNTHETIC_FAMILIES = tuple(FAMILIES)


def generate_synthetic_data(
    output_dir: str | os.PathLike,
    num_customers: int = 8000,
    seed: int = 0,
    config: SyntheticBaseConfig | None = None,
    family: str = "independent",
    labelled_fraction: float | None = None,
) -> SyntheticDataInfo:
    """Writes `transactions.csv`, `gender_train.csv`, `gender_test_kaggle_sample_submission.csv` (real formats and
    quirks) and `oracle.json` (the family and everything its exact posterior needs) to `output_dir`.

    `family` is one of `SYNTHETIC_FAMILIES`; `config` (the family's default when None) must be of the type of that
    default. `labelled_fraction` (default: the config's, 0.7) is the share of customers in `gender_train.csv`, the
    others going to the test ids file. Deterministic given the seed; with one seed, `labelled_fraction` changes only
    the two label files, and a smaller fraction labels a subset of the customers a larger one labels.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown synthetic family {family!r}; choose one of {SYNTHETIC_FAMILIES}.")
    default_config = FAMILIES[family].default_config
    config = config or default_config
    if type(config) is not type(default_config):
        raise TypeError(
            f"The {family!r} family takes a {type(default_config).__name__}, got a {type(config).__name__}."
        )
    if labelled_fraction is not None:
        config = replace(config, labelled_fraction=labelled_fraction)
    if not 0 < config.labelled_fraction <= 1:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {config.labelled_fraction}.")
    if num_customers < 2:
        raise ValueError(f"num_customers must be at least 2, got {num_customers}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sampled = FAMILIES[family].sample(num_customers, config, rng)
    sampled.oracle |= {"family": family, "config": asdict(config), "seed": seed, "label_prior": config.label_prior}
    return write_synthetic_files(output_dir, sampled, config, rng)


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
    # (flat starts, flat ends) of windows -> posterior log-odds of label 1
    window_log_odds: Callable[[np.ndarray, np.ndarray], np.ndarray]

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
        if last_n is not None and last_n < 1:
            raise ValueError(f"last_n must be at least 1 (or None for all events), got {last_n}.")
        starts, ends = _last_n_window(self.offsets, last_n)
        rows = self._rows(customer_ids)
        return self.window_log_odds(starts[rows], ends[rows])

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
    # Folders written before there were several families hold the independent one.
    family = parameters.get("family", "independent")
    if family not in FAMILIES:
        raise ValueError(f"{data_dir}/{ORACLE_FILE} names an unknown family {family!r}; known: {SYNTHETIC_FAMILIES}.")
    customers = build_customer_dataset(Path(data_dir) / TRANSACTIONS_FILE)
    offsets, events = _flat_events(customers)
    customer_ids = np.asarray(customers["customer_id"], dtype=np.int64)
    labels = dict(zip(parameters["customer_ids"], parameters["labels"], strict=True))
    return SyntheticOracle(
        parameters=parameters,
        customer_ids=customer_ids,
        labels=np.array([labels[customer] for customer in customer_ids.tolist()], dtype=np.int64),
        offsets=offsets,
        window_log_odds=FAMILIES[family].posterior(parameters, events),
    )


def oracle_auroc(data_dir: str | os.PathLike, customer_ids=None, last_n: int | None = None) -> float:
    """Bayes-optimal AUROC of a generated data folder on `customer_ids` (all when None), each customer showing its
    last `last_n` events (all when None)."""
    return SyntheticOracle.load(data_dir).auroc(customer_ids, last_n)


def _window_features(dataset, last_n: int | None, amounts_by_mcc: bool = False, as_counts: bool = False) -> np.ndarray:
    """Per customer, the mean over its last `last_n` events (all when None) of one-hot mcc_code, tr_type, hour of day
    and signed decade of the amount; with `amounts_by_mcc`, also the mean of one-hot mcc_code times log(1 + |amount|)
    (so a linear model can weigh each code's amounts) and the log of the window's length. `as_counts` gives sums over
    the window instead of means (evidence that accrues with the number of events)."""
    offsets, events = _flat_events(dataset)
    seconds_of_day = np.rint((events["event_time"] - np.floor(events["event_time"])) * SECONDS_PER_DAY)
    amount = events["amount"]
    fields = [
        events["mcc_code"],
        events["tr_type"],
        (seconds_of_day // 3600).astype(np.int64),
        (np.sign(amount) * (1 + np.floor(np.log10(np.abs(amount) + 1e-3)))).astype(np.int64),
    ]
    weights = [None] * len(fields)
    if amounts_by_mcc:
        fields.append(events["mcc_code"])
        weights.append(np.log1p(np.abs(amount)))
    starts, ends = _last_n_window(offsets, last_n)
    lengths = ends - starts
    in_window = np.repeat(starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    customer_row = np.repeat(np.arange(len(lengths)), lengths)
    blocks = []
    for values, weight in zip(fields, weights, strict=True):
        codes, column = np.unique(values[in_window], return_inverse=True)
        counts = np.zeros((len(lengths), len(codes)))
        np.add.at(counts, (customer_row, column), 1.0 if weight is None else weight[in_window])
        blocks.append(counts if as_counts else counts / lengths[:, None])
    if amounts_by_mcc:
        blocks.append(np.log(lengths)[:, None])
    return np.hstack(blocks)


def _baseline_data(
    data_dir: str | os.PathLike, train_ids, test_ids, last_n: int | None, amounts_by_mcc: bool, as_counts: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window features, true labels and a training mask of the train and test customers."""
    train_ids, test_ids = np.asarray(train_ids, dtype=np.int64), np.asarray(test_ids, dtype=np.int64)
    oracle = SyntheticOracle.load(data_dir)
    customers = build_customer_dataset(Path(data_dir) / TRANSACTIONS_FILE, customer_ids=np.r_[train_ids, test_ids])
    customer_ids = np.asarray(customers["customer_id"], dtype=np.int64)
    features = _window_features(customers, last_n, amounts_by_mcc, as_counts)
    return features, oracle.true_labels(customer_ids), np.isin(customer_ids, train_ids)


def _logistic_regression_auroc(features: np.ndarray, labels: np.ndarray, is_train: np.ndarray, seed: int) -> float:
    """Test AUROC of a logistic regression on standardised features, C by 5-fold CV on the training rows."""
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


def mean_feature_baseline_auroc(
    data_dir: str | os.PathLike, train_ids, test_ids, last_n: int = 256, seed: int = 0
) -> float:
    """Test AUROC of a logistic regression on window-mean one-hot event features (`_window_features`): how close
    a learner that only sees means over the last `last_n` events gets to the oracle on the same window."""
    features, labels, is_train = _baseline_data(data_dir, train_ids, test_ids, last_n, amounts_by_mcc=False)
    return _logistic_regression_auroc(features, labels, is_train, seed)


def aggregate_baseline_auroc(
    data_dir: str | os.PathLike, train_ids, test_ids, last_n: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Test AUROCs of a logistic regression and of gradient-boosted trees on order-free aggregates of the last
    `last_n` events (all when None): code, type, hour and amount-decade shares, each code's log(1 + |amount|) summed
    over the window and divided by its length, and the log length. What a model blind to the order of events gets.
    `logistic_regression_counts`: the logistic regression on the window's code, type, hour and amount-decade counts
    (sums, not shares), the sufficient statistics of the independent and long families' posteriors: what a sum readout
    can learn from these training customers."""
    features, labels, is_train = _baseline_data(data_dir, train_ids, test_ids, last_n, amounts_by_mcc=True)
    count_features, _, _ = _baseline_data(data_dir, train_ids, test_ids, last_n, amounts_by_mcc=False, as_counts=True)
    trees = HistGradientBoostingClassifier(learning_rate=0.05, max_iter=500, early_stopping=True, random_state=seed)
    trees.fit(features[is_train], labels[is_train])
    return {
        "logistic_regression": _logistic_regression_auroc(features, labels, is_train, seed),
        "logistic_regression_counts": _logistic_regression_auroc(count_features, labels, is_train, seed),
        "gradient_boosting": float(roc_auc_score(labels[~is_train], trees.decision_function(features[~is_train]))),
    }
