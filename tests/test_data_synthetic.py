"""Synthetic data of every family: real file formats, determinism, label scarcity, and the oracle checked against
the documented formula recomputed from the raw files."""

import bisect
import csv
import functools
import json
import math
from collections import defaultdict
from decimal import Decimal
from itertools import pairwise

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from txformer.data import (
    LONG_HISTORY_CONFIG,
    SYNTHETIC_FAMILIES,
    OrderSyntheticConfig,
    SyntheticConfig,
    SyntheticOracle,
    build_customer_dataset,
    generate_synthetic_data,
    oracle_auroc,
)
from txformer.data.synthetic import _window_features
from txformer.data.synthetic_order import (
    OrderPosterior,
    TransitionCountClassifier,
    increasing_event_seconds,
    stationary_distribution,
)


# Short histories and frequent quirks, so a tiny file shows every one of them.
TINY = SyntheticConfig(
    median_length=30.0,
    heavy_fraction=0.0,
    second_60_fraction=0.05,
    swapped_pair_fraction=0.05,
    split_customer_fraction=0.1,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic_data(tmp_path_factory.mktemp("tiny"), num_customers=150, seed=3, config=TINY)


@pytest.fixture(scope="module")
def default_sized(tmp_path_factory):
    return generate_synthetic_data(tmp_path_factory.mktemp("default"), num_customers=600, seed=1)


def log_sum_exp(values: list[float]) -> float:
    largest = max(values)
    return largest + math.log(sum(math.exp(value - largest) for value in values))


@functools.cache
def scored_histories(data_dir) -> dict[int, list[tuple[float, float]]]:
    """(time in days, score g) of every customer's events from the raw CSV strings, sorted by time (stable: ties keep
    the file order, as the reader does)."""
    parameters = json.loads((data_dir / "oracle.json").read_text())
    mcc_weight = dict(zip(parameters["mcc_codes"], parameters["mcc_weights"], strict=True))
    tr_type_weight = dict(zip(parameters["tr_types"], parameters["tr_type_weights"], strict=True))
    edges = parameters["amount_bucket_edges_cents"]
    events = defaultdict(list)
    with open(data_dir / "transactions.csv", newline="") as file:
        for row in csv.DictReader(file):
            day, clock = row["tr_datetime"].split(" ")
            hour, minute, second = (int(part) for part in clock.split(":"))
            cents = int(abs(Decimal(row["amount"])) * 100)
            score = (
                mcc_weight[int(row["mcc_code"])]
                + tr_type_weight[int(row["tr_type"])]
                + parameters["amount_bucket_weights"][bisect.bisect_right(edges, cents) - 1]
                + parameters["hour_weights"][hour]
            )
            events[int(row["customer_id"])].append((int(day) + (3600 * hour + 60 * minute + second) / 86400, score))
    return {customer: sorted(history, key=lambda event: event[0]) for customer, history in events.items()}


def independent_log_odds(data_dir, last_n: int | None) -> dict[int, float]:
    """The posterior of docs/data.md, recomputed from the raw CSV strings with the standard library only."""
    parameters = json.loads((data_dir / "oracle.json").read_text())
    prior = parameters["label_prior"]
    log_odds = {}
    for customer, history in scored_histories(data_dir).items():
        window = history if last_n is None else history[-last_n:]
        score_sum, count = sum(score for _, score in window), len(window)
        per_label = [
            log_sum_exp(
                [
                    log_q + theta * score_sum - count * log_partition
                    for log_q, theta, log_partition in zip(
                        parameters["log_latent_prior"][label],
                        parameters["latent_values"],
                        parameters["log_partition"],
                        strict=True,
                    )
                ]
            )
            for label in (0, 1)
        ]
        log_odds[customer] = math.log(prior / (1 - prior)) + per_label[1] - per_label[0]
    return log_odds


def test_files_have_the_real_formats_and_quirks(tiny):
    lines = tiny.transactions_path.read_text().splitlines()
    assert lines[0] == "customer_id,tr_datetime,mcc_code,tr_type,amount,term_id"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == tiny.num_events and all(len(row) == 6 for row in rows)
    assert any(row[1].endswith(":60") for row in rows)
    terms = [row[5] for row in rows]
    assert "" in terms and any(term.startswith("RU") for term in terms) and any(term.startswith("0") for term in terms)
    assert all(row[4].split(".")[1].isdigit() and len(row[4].split(".")[1]) == 2 for row in rows)
    assert {float(row[4]) < 0 for row in rows} == {True, False}
    customer_ids = [int(row[0]) for row in rows]
    assert len(set(customer_ids)) == tiny.num_customers
    blocks = 1 + sum(first != second for first, second in zip(customer_ids, customer_ids[1:], strict=False))
    assert blocks > tiny.num_customers  # some histories are split in two blocks of rows
    assert tiny.train_labels_path.read_text().startswith("customer_id,gender\n")
    assert tiny.test_ids_path.read_text().startswith("customer_id,probability\n")
    train_ids = {int(line.split(",")[0]) for line in tiny.train_labels_path.read_text().splitlines()[1:]}
    test_ids = {int(line.split(",")[0]) for line in tiny.test_ids_path.read_text().splitlines()[1:]}
    assert len(train_ids) == tiny.num_labelled and train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == set(customer_ids)


def test_generation_is_deterministic(tiny, tmp_path):
    again = generate_synthetic_data(tmp_path / "again", num_customers=150, seed=3, config=TINY)
    for name in ("transactions.csv", "gender_train.csv", "oracle.json"):
        assert (again.output_dir / name).read_bytes() == (tiny.output_dir / name).read_bytes(), name
    other = generate_synthetic_data(tmp_path / "other", num_customers=150, seed=4, config=TINY)
    assert other.transactions_path.read_bytes() != tiny.transactions_path.read_bytes()


def test_round_trip_through_the_reader(tiny):
    customers = build_customer_dataset(tiny.transactions_path, tiny.train_labels_path)
    assert len(customers) == tiny.num_labelled
    everyone = build_customer_dataset(tiny.transactions_path)
    assert sum(len(times) for times in everyone["event_time"]) == tiny.num_events
    oracle = SyntheticOracle.load(tiny.output_dir)
    assert customers["labels"] == oracle.true_labels(customers["customer_id"]).tolist()


@pytest.mark.parametrize("last_n", [None, 5, 20])
def test_oracle_matches_the_documented_formula(tiny, last_n):
    expected = independent_log_odds(tiny.output_dir, last_n)
    customer_ids = sorted(expected)
    oracle = SyntheticOracle.load(tiny.output_dir)
    np.testing.assert_allclose(oracle.log_odds(customer_ids, last_n), [expected[c] for c in customer_ids], atol=1e-8)
    labels = oracle.true_labels(customer_ids)
    expected_auroc = roc_auc_score(labels, [expected[c] for c in customer_ids])
    assert oracle_auroc(tiny.output_dir, customer_ids, last_n=last_n) == pytest.approx(expected_auroc, abs=1e-12)


def test_long_context_pays_and_the_posterior_is_calibrated(default_sized):
    oracle = SyntheticOracle.load(default_sized.output_dir)
    lengths = np.diff(oracle.offsets)
    assert 200 < np.median(lengths) < 420 and lengths.max() <= 90_000
    whole, last_64 = oracle.auroc(), oracle.auroc(last_n=64)
    assert whole > last_64 + 0.05, (whole, last_64)
    probability = 1 / (1 + np.exp(-oracle.log_odds()))
    labels = oracle.true_labels()
    # Calibration: the expected number of positives matches the observed one within three standard deviations.
    assert abs(probability.sum() - labels.sum()) < 3 * np.sqrt(np.sum(probability * (1 - probability)))


def test_oracle_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="oracle.json"):
        oracle_auroc(tmp_path)
    with pytest.raises(KeyError, match="not in the synthetic data"):
        oracle_auroc(tiny.output_dir, [1])


# The order family with short histories, frequent quirks and amounts of a few cents (1 cent, the lowest amount,
# included); a stronger signal where a test needs a clear effect.
ORDER_TINY = OrderSyntheticConfig(
    median_length=40.0,
    amount_median=0.1,
    heavy_fraction=0.0,
    second_60_fraction=0.05,
    swapped_pair_fraction=0.05,
    split_customer_fraction=0.1,
)
ORDER_STRONG = OrderSyntheticConfig(median_length=150.0, heavy_fraction=0.0, transition_strength=0.3)


@pytest.fixture(scope="module")
def order_tiny(tmp_path_factory):
    return generate_synthetic_data(
        tmp_path_factory.mktemp("order"), num_customers=120, seed=5, config=ORDER_TINY, family="order"
    )


@pytest.fixture(scope="module")
def order_strong(tmp_path_factory):
    return generate_synthetic_data(
        tmp_path_factory.mktemp("order_strong"), num_customers=400, seed=6, config=ORDER_STRONG, family="order"
    )


@pytest.fixture(scope="module")
def long_histories(tmp_path_factory):
    return generate_synthetic_data(tmp_path_factory.mktemp("long"), num_customers=120, seed=7, family="long")


def normal_interval_log_mass(lower: float, upper: float) -> float:
    """log(Phi(upper) - Phi(lower)) with the standard library, from the tail where the difference is precise."""
    if lower > 0:
        return math.log(0.5 * math.erfc(lower / math.sqrt(2)) - 0.5 * math.erfc(upper / math.sqrt(2)))
    return math.log(0.5 * math.erfc(-upper / math.sqrt(2)) - 0.5 * math.erfc(-lower / math.sqrt(2)))


@functools.cache
def order_histories(data_dir) -> dict[int, list[tuple[int, int, int]]]:
    """(integer seconds, MCC index, cents) of every customer's events from the raw CSV strings, sorted by time."""
    parameters = json.loads((data_dir / "oracle.json").read_text())
    code_index = {code: index for index, code in enumerate(parameters["mcc_codes"])}
    events = defaultdict(list)
    with open(data_dir / "transactions.csv", newline="") as file:
        for row in csv.DictReader(file):
            day, clock = row["tr_datetime"].split(" ")
            hour, minute, second = (int(part) for part in clock.split(":"))
            seconds = 86400 * int(day) + 3600 * hour + 60 * minute + second
            cents = int(abs(Decimal(row["amount"])) * 100)
            events[int(row["customer_id"])].append((seconds, code_index[int(row["mcc_code"])], cents))
    return {customer: sorted(history) for customer, history in events.items()}


def order_log_odds_by_hand(data_dir, last_n: int | None) -> dict[int, float]:
    """The order family's posterior of docs/data.md, in plain loops over each window, label by label."""
    parameters = json.loads((data_dir / "oracle.json").read_text())
    prior = parameters["label_prior"]
    log_odds = {}
    for customer, history in order_histories(data_dir).items():
        window = history if last_n is None else history[-last_n:]
        log_likelihood = []
        for label in (0, 1):
            total, previous = 0.0, None
            for _, code, cents in window:
                if previous is not None:
                    total += parameters["log_transition"][label][previous][code]
                mean = parameters["amount_log_median"][code] + (label - 0.5) * parameters["amount_label_shift"][code]
                std = parameters["amount_log_std"][code]
                lower = -math.inf if cents == 1 else (math.log((cents - 0.5) / 100) - mean) / std
                total += normal_interval_log_mass(lower, (math.log((cents + 0.5) / 100) - mean) / std)
                previous = code
            log_likelihood.append(total)
        log_odds[customer] = math.log(prior / (1 - prior)) + log_likelihood[1] - log_likelihood[0]
    return log_odds


@pytest.mark.parametrize("last_n", [None, 1, 7])
def test_order_oracle_matches_a_loop_over_the_raw_file(order_tiny, last_n):
    expected = order_log_odds_by_hand(order_tiny.output_dir, last_n)
    customer_ids = sorted(expected)
    oracle = SyntheticOracle.load(order_tiny.output_dir)
    assert oracle.parameters["family"] == "order"
    np.testing.assert_allclose(oracle.log_odds(customer_ids, last_n), [expected[c] for c in customer_ids], atol=1e-8)


def test_order_events_keep_the_generated_order(order_tiny):
    rows = [line.split(",") for line in order_tiny.transactions_path.read_text().splitlines()[1:]]
    assert any(row[1].endswith(":60") for row in rows)
    assert {"0.01", "-0.01"} & {row[4] for row in rows}
    histories = order_histories(order_tiny.output_dir)
    assert len(histories) == order_tiny.num_customers
    # Strictly increasing times: no tie the reader could order differently from the chain.
    assert all(len({seconds for seconds, _, _ in history}) == len(history) for history in histories.values())
    customers = build_customer_dataset(order_tiny.transactions_path)
    for customer_id, mcc_codes in zip(customers["customer_id"], customers["mcc_code"], strict=True):
        expected = [
            SyntheticOracle.load(order_tiny.output_dir).parameters["mcc_codes"][code]
            for _, code, _ in histories[customer_id]
        ]
        assert mcc_codes == expected


def test_event_times_are_strictly_increasing_even_when_draws_tie():
    # 150,000 events in about 400 days draw the same second hundreds of times.
    lengths = np.array([150_000, 3, 1])
    seconds = increasing_event_seconds(lengths, OrderSyntheticConfig(), np.random.default_rng(0))
    starts = np.r_[0, np.cumsum(lengths)]
    for start, end in pairwise(starts):
        assert (np.diff(seconds[start:end]) > 0).all()
    assert seconds.min() >= 0 and seconds.max() < 86400 * (OrderSyntheticConfig().num_days + 1)


def test_order_chains_share_one_stationary_distribution(order_tiny):
    parameters = SyntheticOracle.load(order_tiny.output_dir).parameters
    for log_transition in parameters["log_transition"]:
        transition = np.exp(np.asarray(log_transition))
        np.testing.assert_allclose(transition.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(stationary_distribution(transition), parameters["stationary"], atol=1e-10)
    assert not np.allclose(*parameters["log_transition"])


def test_order_signal_is_in_the_order(order_strong):
    """Shuffling each customer's events keeps the amounts and the codes' counts but destroys the transition signal."""
    oracle = SyntheticOracle.load(order_strong.output_dir)
    parameters = oracle.parameters
    transitions_only = parameters | {"amount_label_shift": [0.0] * len(parameters["amount_label_shift"])}
    customers = build_customer_dataset(order_strong.transactions_path)
    offsets = np.r_[0, np.cumsum([len(codes) for codes in customers["mcc_code"]])]
    events = {name: np.concatenate(customers[name]) for name in ("mcc_code", "amount")}
    rng = np.random.default_rng(0)
    shuffled_order = np.concatenate([start + rng.permutation(end - start) for start, end in pairwise(offsets)])
    shuffled = {name: values[shuffled_order] for name, values in events.items()}
    labels = oracle.true_labels()

    def auroc(parameters, events) -> float:
        return roc_auc_score(labels, OrderPosterior.from_events(parameters, events)(offsets[:-1], offsets[1:]))

    assert auroc(parameters, events) == pytest.approx(oracle.auroc())
    assert auroc(transitions_only, events) > 0.85
    assert abs(auroc(transitions_only, shuffled) - 0.5) < 0.08
    assert auroc(parameters, shuffled) < auroc(parameters, events) - 0.1


@pytest.mark.parametrize("last_n", [None, 256, 1024])
def test_long_family_oracle_matches_the_documented_formula(long_histories, last_n):
    expected = independent_log_odds(long_histories.output_dir, last_n)
    customer_ids = sorted(expected)
    oracle = SyntheticOracle.load(long_histories.output_dir)
    assert oracle.parameters["family"] == "long"
    assert oracle.parameters["config"]["median_length"] == LONG_HISTORY_CONFIG.median_length
    np.testing.assert_allclose(oracle.log_odds(customer_ids, last_n), [expected[c] for c in customer_ids], atol=1e-8)


def test_long_family_has_long_histories_whose_signal_keeps_accruing(long_histories):
    oracle = SyntheticOracle.load(long_histories.output_dir)
    lengths = np.diff(oracle.offsets)
    assert 1000 < np.median(lengths) < 2500 and lengths.max() > 10_000
    aurocs = [oracle.auroc(last_n=last_n) for last_n in (256, 1024, 4096, None)]
    assert aurocs[0] < aurocs[1] - 0.03 and aurocs[1] < aurocs[3] - 0.03 and aurocs[2] <= aurocs[3] + 1e-9, aurocs


@pytest.mark.parametrize("last_n", [None, 16])
def test_window_counts_are_the_window_shares_times_its_length(tiny, last_n):
    """The count features (sums over the window) are the share features times the window length; each of the four
    one-hot fields counts every event once."""
    customers = build_customer_dataset(tiny.output_dir / "transactions.csv")
    lengths = np.array([len(times) for times in customers["event_time"]])
    lengths = lengths if last_n is None else np.minimum(lengths, last_n)
    counts = _window_features(customers, last_n, as_counts=True)
    np.testing.assert_allclose(counts, _window_features(customers, last_n) * lengths[:, None])
    np.testing.assert_array_equal(counts.sum(axis=1), 4 * lengths)


def test_window_longer_than_every_history_is_the_whole_history(order_tiny):
    oracle = SyntheticOracle.load(order_tiny.output_dir)
    np.testing.assert_array_equal(oracle.log_odds(last_n=10**6), oracle.log_odds())
    with pytest.raises(ValueError, match="last_n"):
        oracle.log_odds(last_n=0)


def label_file_ids(path) -> set[int]:
    return {int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]}


@pytest.mark.parametrize("family", SYNTHETIC_FAMILIES)
def test_labelled_fraction_changes_only_the_label_files(family, tmp_path):
    config = OrderSyntheticConfig(median_length=10.0) if family == "order" else SyntheticConfig(median_length=10.0)
    few, many = (
        generate_synthetic_data(
            tmp_path / str(fraction),
            num_customers=300,
            seed=2,
            config=config,
            family=family,
            labelled_fraction=fraction,
        )
        for fraction in (0.1, 0.9)
    )
    assert few.transactions_path.read_bytes() == many.transactions_path.read_bytes()
    few_ids, many_ids = label_file_ids(few.train_labels_path), label_file_ids(many.train_labels_path)
    assert len(few_ids) == few.num_labelled and 10 <= few.num_labelled <= 50 and 250 <= many.num_labelled <= 290
    assert few_ids < many_ids
    assert few_ids.isdisjoint(label_file_ids(few.test_ids_path))
    assert len(few_ids | label_file_ids(few.test_ids_path)) == 300
    assert json.loads(few.oracle_path.read_text())["config"]["labelled_fraction"] == 0.1
    everyone = generate_synthetic_data(
        tmp_path / "all", 300, seed=2, config=config, family=family, labelled_fraction=1
    )
    assert everyone.num_labelled == 300 and everyone.test_ids_path.read_text() == "customer_id,probability\n"


def test_order_generation_is_deterministic(order_tiny, tmp_path):
    again = generate_synthetic_data(tmp_path / "again", num_customers=120, seed=5, config=ORDER_TINY, family="order")
    for name in ("transactions.csv", "gender_train.csv", "gender_test_kaggle_sample_submission.csv", "oracle.json"):
        assert (again.output_dir / name).read_bytes() == (order_tiny.output_dir / name).read_bytes(), name
    other = generate_synthetic_data(tmp_path / "other", num_customers=120, seed=6, config=ORDER_TINY, family="order")
    assert other.transactions_path.read_bytes() != order_tiny.transactions_path.read_bytes()


def test_generation_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown synthetic family"):
        generate_synthetic_data(tmp_path, family="markov")
    with pytest.raises(TypeError, match="OrderSyntheticConfig"):
        generate_synthetic_data(tmp_path, family="order", config=SyntheticConfig())
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="labelled_fraction"):
            generate_synthetic_data(tmp_path, labelled_fraction=fraction)


def test_folders_without_a_family_are_the_independent_family(tiny, tmp_path):
    for name in ("transactions.csv", "oracle.json"):
        (tmp_path / name).write_bytes((tiny.output_dir / name).read_bytes())
    parameters = json.loads((tmp_path / "oracle.json").read_text())
    del parameters["family"]
    (tmp_path / "oracle.json").write_text(json.dumps(parameters))
    np.testing.assert_array_equal(
        SyntheticOracle.load(tmp_path).log_odds(), SyntheticOracle.load(tiny.output_dir).log_odds()
    )
    (tmp_path / "oracle.json").write_text(json.dumps(parameters | {"family": "markov"}))
    with pytest.raises(ValueError, match="unknown family 'markov'"):
        SyntheticOracle.load(tmp_path)


def test_transition_count_classifier_recovers_the_chains(order_strong):
    """Fitted on 300 customers of a strong order signal, the plug-in classifier's log-ratios follow the generator's
    and its held-out AUROC nears the oracle's, where permuted labels give chance; a window scores the sum of its
    known transitions' log-ratios."""
    oracle = SyntheticOracle.load(order_strong.output_dir)
    customers = build_customer_dataset(order_strong.transactions_path)
    codes = [np.asarray(sequence) for sequence in customers["mcc_code"]]
    labels = oracle.true_labels(customers["customer_id"])
    log_transition = np.asarray(oracle.parameters["log_transition"])
    oracle_held_out = oracle.auroc(customers["customer_id"][300:])
    fits = {}
    for name, fit_labels in (("true", labels[:300]), ("permuted", np.random.default_rng(0).permutation(labels[:300]))):
        model = TransitionCountClassifier(smoothing=1.0).fit(codes[:300], fit_labels)
        rows = np.searchsorted(oracle.parameters["mcc_codes"], model.known_codes)
        true_ratio = (log_transition[1] - log_transition[0])[np.ix_(rows, rows)]
        correlation = np.corrcoef(model.log_ratio.ravel(), true_ratio.ravel())[0, 1]
        fits[name] = correlation, roc_auc_score(labels[300:], model.decision_function(codes[300:]))
    assert fits["true"][0] > 0.2 > 0.1 > fits["permuted"][0]
    assert oracle_held_out - 0.1 < fits["true"][1] <= oracle_held_out
    assert abs(fits["permuted"][1] - 0.5) < 0.1
    a, b = model.known_codes[:2]
    unseen = model.known_codes.max() + 1
    scores = model.decision_function([np.array([a, b, a]), np.array([a, unseen, b]), np.array([b])])
    assert scores[0] == pytest.approx(model.log_ratio[0, 1] + model.log_ratio[1, 0])
    assert scores[1:].tolist() == [0.0, 0.0]
