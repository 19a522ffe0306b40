"""The "order" synthetic family: the label lives in which MCC code follows which, and weakly in amounts.

Generative process (docs/data.md gives it in full), for each customer:

1. label `y ~ Bernoulli(label_prior)` and a history length `n` independent of `y` (as in the independent family);
2. MCC codes `m_1 .. m_n` from a first-order Markov chain with a label-specific transition matrix
   `P_y = row-softmax(B + (y - 1/2) strength D + c_y)`: `B` label-free base logits, `D` a random perturbation, and
   column offsets `c_y` solved so that both chains have the same stationary distribution `pi` (Zipf-like code
   popularity); `m_1 ~ pi`, so every window of consecutive events is a stationary stretch of the chain;
3. per event: `tr_type ~ p(tr_type | mcc)` (label-free), integer cents `max(1, rint(100 exp(x)))` with
   `x ~ N(mu[mcc] + (y - 1/2) shift[mcc], sigma[mcc]^2)`, the sign given by the type (credit or debit);
4. strictly increasing times (a day-shaped hour profile, label-free), so the reader's time order is the chain order.

So for a window `e_1 .. e_n` of consecutive events, `log p(window | y) = log pi(m_1) + sum_t log P_y(m_{t-1}, m_t)
+ sum_t log p(cents_t | m_t, y) + (label-free terms)`, and the posterior log-odds is the prior log-odds plus the
difference of these between `y = 1` and `y = 0` (`log pi(m_1)` cancels).
"""

from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr, log_softmax

from .reader import SECONDS_PER_DAY
from .synthetic_common import (
    SampledCustomers,
    SyntheticBaseConfig,
    activity_days,
    build_code_sets,
    clock_fields,
    draw_customers,
    history_lengths,
    hour_of_day_probability,
    terminal_indices,
)


STATIONARY_TOLERANCE = 1e-12
MAX_STATIONARY_ITERATIONS = 10_000


@dataclass(frozen=True)
class OrderSyntheticConfig(SyntheticBaseConfig):
    """The constants of the order family's generative process (all saved in oracle.json)."""

    num_mcc_codes: int = 60
    num_tr_types: int = 30
    mcc_zipf_exponent: float = 1.1
    # Row-to-row spread of the label-free transition logits: which code follows which, for both labels.
    base_logit_std: float = 1.0
    # Scale of the label perturbation of the transition logits, half of it added for y = 1 and removed for y = 0.
    transition_strength: float = 0.08
    # Per-MCC amount in currency units: log-normal, median `amount_median` times a spread across codes.
    amount_median: float = 500.0
    amount_median_log_std: float = 1.0
    amount_log_std_range: tuple[float, float] = (0.6, 1.0)
    # Standard deviation across codes of the shift of the mean log amount between the labels.
    amount_label_shift: float = 0.03


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution `pi = pi P` of an irreducible row-stochastic matrix."""
    size = len(transition)
    system = transition.T - np.eye(size)
    system[-1] = 1.0
    return np.linalg.solve(system, np.eye(size)[-1])


def _with_stationary(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Log of `row-softmax(logits + c)`, the column offsets `c` found (multiplicative updates, each raising the
    mass flowing into the codes that have too little) so that its stationary distribution is `target`."""
    offsets = np.zeros(len(target))
    for _ in range(MAX_STATIONARY_ITERATIONS):
        log_transition = log_softmax(logits + offsets, axis=1)
        gap = np.log(target) - np.log(stationary_distribution(np.exp(log_transition)))
        if np.abs(gap).max() < STATIONARY_TOLERANCE:
            return log_transition
        offsets += gap
    raise RuntimeError("The transition matrix did not reach the target stationary distribution.")


def label_chains(config: OrderSyntheticConfig, stationary: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """log P_y for y = 0, 1 ([2, codes, codes]), both with stationary distribution `stationary`."""
    size = config.num_mcc_codes
    base = np.log(stationary)[None, :] + config.base_logit_std * rng.normal(size=(size, size))
    direction = rng.normal(size=(size, size))
    return np.stack(
        [
            _with_stationary(base + (label - 0.5) * config.transition_strength * direction, stationary)
            for label in (0, 1)
        ]
    )


def _draw_categorical(cumulative: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: row i of `cumulative` ([n, k], increasing rows) with uniform `uniforms[i]`."""
    return np.minimum((uniforms[:, None] > cumulative).sum(axis=1), cumulative.shape[1] - 1)


def _sample_chains(
    log_transition: np.ndarray,
    stationary: np.ndarray,
    labels: np.ndarray,
    lengths: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """The state of every event (customers in order, `lengths[c]` each): the first from `stationary`, each next one
    from the row of its label's chain. One vectorised step per position, over the customers still that long."""
    cumulative = np.cumsum(np.exp(log_transition), axis=2)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    uniforms = rng.random(int(lengths.sum()))
    states = np.empty(len(uniforms), dtype=np.int64)
    states[starts] = _draw_categorical(np.cumsum(stationary)[None, :], uniforms[starts])
    by_length = np.argsort(-lengths, kind="stable")
    sorted_lengths, sorted_starts, sorted_labels = lengths[by_length], starts[by_length], labels[by_length]
    current = states[sorted_starts]
    for position in range(1, int(sorted_lengths[0])):
        num_active = int(np.searchsorted(-sorted_lengths, -position, side="left"))
        rows = sorted_starts[:num_active] + position
        current = _draw_categorical(cumulative[sorted_labels[:num_active], current[:num_active]], uniforms[rows])
        states[rows] = current
    return states


def increasing_event_seconds(lengths: np.ndarray, config: SyntheticBaseConfig, rng: np.random.Generator) -> np.ndarray:
    """Event times in integer seconds, strictly increasing within each customer: a uniform day in the customer's
    active days, an hour from the day profile and a uniform minute and second, sorted, and each tie moved on by a
    second (so the reader's stable time sort can never reorder events)."""
    first_day, last_day = activity_days(len(lengths), config, rng)
    customer_of_event = np.repeat(np.arange(len(lengths)), lengths)
    num_events = len(customer_of_event)
    day = first_day[customer_of_event] + np.floor(
        rng.random(num_events) * (last_day - first_day + 1)[customer_of_event]
    ).astype(np.int64)
    hour_probability = hour_of_day_probability()
    hour = rng.choice(len(hour_probability), num_events, p=hour_probability)
    seconds = SECONDS_PER_DAY * day + 3600 * hour + rng.integers(0, 3600, num_events)
    seconds = seconds[np.lexsort((seconds, customer_of_event))]
    # t_i = i + max_{j <= i} (t_j - j) within a customer: strictly increasing, and equal to t where t already is.
    rank = np.arange(num_events) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stride = SECONDS_PER_DAY * (config.num_days + 1) + int(lengths.max())
    shifted = seconds - rank + customer_of_event * stride
    return np.maximum.accumulate(shifted) - customer_of_event * stride + rank


def amount_log_probability(parameters: dict, mcc_index: np.ndarray, cents: np.ndarray, label: int) -> np.ndarray:
    """log p(|amount| = cents | mcc, y): the mass of the normal log amount on the interval that rounds to `cents`
    (everything below 1.5 cents for 1 cent)."""
    mean = (
        np.asarray(parameters["amount_log_median"])[mcc_index]
        + (label - 0.5) * np.asarray(parameters["amount_label_shift"])[mcc_index]
    )
    std = np.asarray(parameters["amount_log_std"])[mcc_index]
    # The generator writes every draw below 1.5 cents as 1 cent.
    lower = np.where(cents > 1, (np.log(np.maximum(cents, 1.5) - 0.5) - np.log(100) - mean) / std, -np.inf)
    upper = (np.log((cents + 0.5) / 100) - mean) / std
    # Phi(b) - Phi(a) from the tail that keeps precision: the upper one when the interval lies above the mean.
    flip = lower > 0
    near, far = np.where(flip, -lower, upper), np.where(flip, -upper, lower)
    log_near = log_ndtr(near)
    return log_near + np.log(-np.expm1(log_ndtr(far) - log_near))


def sample_order_family(
    num_customers: int, config: OrderSyntheticConfig, rng: np.random.Generator
) -> SampledCustomers:
    """Customers, labels and events of the order family, with the parameters its posterior needs."""
    codes = build_code_sets(config, rng)
    log_transition = label_chains(config, codes.mcc_probability, rng)
    amount_log_median = np.log(config.amount_median) + config.amount_median_log_std * rng.normal(
        size=config.num_mcc_codes
    )
    amount_log_std = rng.uniform(*config.amount_log_std_range, size=config.num_mcc_codes)
    amount_label_shift = config.amount_label_shift * rng.normal(size=config.num_mcc_codes)

    customer_ids, labels = draw_customers(num_customers, config, rng)
    lengths = history_lengths(num_customers, config, rng)
    customer_of_event = np.repeat(np.arange(num_customers), lengths)
    num_events = len(customer_of_event)
    mcc_index = _sample_chains(log_transition, codes.mcc_probability, labels, lengths, rng)
    tr_type_index = _draw_categorical(np.cumsum(codes.tr_type_given_mcc, axis=1)[mcc_index], rng.random(num_events))
    event_label = labels[customer_of_event]
    log_amount = (
        amount_log_median[mcc_index]
        + (event_label - 0.5) * amount_label_shift[mcc_index]
        + amount_log_std[mcc_index] * rng.normal(size=num_events)
    )
    cents = np.maximum(np.rint(100 * np.exp(log_amount)), 1).astype(np.int64)
    cents = np.where(codes.tr_type_is_credit[tr_type_index], cents, -cents)
    clock = clock_fields(increasing_event_seconds(lengths, config, rng))
    # Seconds = 60 as in the real data, written only for a whole minute, so the time read back is the same second.
    leap = (clock["second"] == 0) & (clock["minute"] > 0) & (rng.random(num_events) < 60 * config.second_60_fraction)
    clock["minute"][leap] -= 1
    clock["second"][leap] = 60
    columns = {
        **clock,
        "mcc_code": codes.mcc_codes[mcc_index],
        "tr_type": codes.tr_types[tr_type_index],
        "amount_cents": cents,
        "term_index": terminal_indices(num_events, config, rng),
    }
    oracle = {
        "formula": (
            "log_odds = log(label_prior / (1 - label_prior)) + sum_{t >= 2} (log_transition[1][m_{t-1}][m_t]"
            " - log_transition[0][m_{t-1}][m_t]) + sum_t (log p(cents_t | m_t, 1) - log p(cents_t | m_t, 0)) over"
            " the window's events in the reader's order, m = index of mcc_code in mcc_codes, cents = round(100"
            " |amount|), log p(c | m, y) = log of the N(amount_log_median[m] + (y - 1/2) amount_label_shift[m],"
            " amount_log_std[m]^2) mass of log(currency amount) on [log((c - 1/2) / 100), log((c + 1/2) / 100))"
            " (from -inf for c = 1); the first event's log stationary[m_1] is the same for both labels"
        ),
        "mcc_codes": codes.mcc_codes.tolist(),
        "tr_types": codes.tr_types.tolist(),
        "tr_type_is_credit": codes.tr_type_is_credit.tolist(),
        "stationary": codes.mcc_probability.tolist(),
        "log_transition": log_transition.tolist(),
        "tr_type_given_mcc": codes.tr_type_given_mcc.tolist(),
        "amount_log_median": amount_log_median.tolist(),
        "amount_log_std": amount_log_std.tolist(),
        "amount_label_shift": amount_label_shift.tolist(),
    }
    return SampledCustomers(customer_ids, labels, customer_of_event, columns, oracle)


@dataclass
class OrderPosterior:
    """Posterior log-odds of any window of consecutive events, from per-event log-likelihood ratios."""

    prior_log_odds: float
    # Per event: its log-likelihood ratio when it opens a window (its code's stationary probability cancels).
    opening: np.ndarray
    # Cumulative sum, with a leading 0, of each event's log-likelihood ratio given the event before it.
    cumulative: np.ndarray

    @classmethod
    def from_events(cls, parameters: dict, events: dict[str, np.ndarray]) -> "OrderPosterior":
        """From flat `mcc_code` and `amount` arrays of customers' events in the reader's order, one after another."""
        mcc_codes = np.asarray(parameters["mcc_codes"])
        mcc_index = np.searchsorted(mcc_codes, events["mcc_code"])
        if (mcc_codes[np.minimum(mcc_index, len(mcc_codes) - 1)] != events["mcc_code"]).any():
            raise ValueError("Events with codes that the synthetic process never generates: not synthetic data.")
        cents = np.rint(np.abs(events["amount"]) * 100)
        amount = amount_log_probability(parameters, mcc_index, cents, 1) - amount_log_probability(
            parameters, mcc_index, cents, 0
        )
        log_transition = np.asarray(parameters["log_transition"])
        previous = np.r_[mcc_index[:1], mcc_index[:-1]]
        transition = log_transition[1, previous, mcc_index] - log_transition[0, previous, mcc_index]
        prior = parameters["label_prior"]
        return cls(
            prior_log_odds=float(np.log(prior / (1 - prior))),
            opening=amount,
            cumulative=np.r_[0.0, np.cumsum(transition + amount)],
        )

    def __call__(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Log-odds of label 1 for the windows of flat events [starts, ends), each within one customer and not empty."""
        return self.prior_log_odds + self.opening[starts] + self.cumulative[ends] - self.cumulative[starts + 1]


@dataclass
class TransitionCountClassifier:
    """The plug-in Bayes classifier of the order family's model class: per label, a first-order Markov chain over
    codes estimated from transition counts (plus `smoothing` in every cell); a window scores the sum over its
    transitions of the log-ratio of the two chains. What a learner that knows the family's form reaches from the
    labelled customers it has, to set a model's gap to the oracle against."""

    smoothing: float = 4.0

    def fit(self, codes: list[np.ndarray], labels: np.ndarray) -> "TransitionCountClassifier":
        """`codes`: each customer's code sequence in time order (any integer or string codes); `labels`: 0 or 1."""
        self.known_codes = np.unique(np.concatenate(codes))
        size = len(self.known_codes)
        counts = np.zeros((2, size, size))
        for sequence, label in zip(codes, labels, strict=True):
            index = np.searchsorted(self.known_codes, sequence)
            np.add.at(counts[int(label)], (index[:-1], index[1:]), 1.0)
        log_transition = np.log(counts + self.smoothing) - np.log(
            counts.sum(axis=2, keepdims=True) + size * self.smoothing
        )
        self.log_ratio = log_transition[1] - log_transition[0]
        return self

    def decision_function(self, codes: list[np.ndarray]) -> np.ndarray:
        """Log-likelihood ratio of label 1 of each sequence (transitions from or to an unseen code count 0)."""
        scores = np.empty(len(codes))
        for row, sequence in enumerate(codes):
            index = np.clip(np.searchsorted(self.known_codes, sequence), 0, len(self.known_codes) - 1)
            known = self.known_codes[index] == sequence
            pairs = known[:-1] & known[1:]
            scores[row] = self.log_ratio[index[:-1][pairs], index[1:][pairs]].sum()
        return scores
