"""Synthetic data: real file formats, determinism, and the oracle checked against the documented formula."""

import bisect
import csv
import json
import math
from collections import defaultdict
from decimal import Decimal

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from txformer.data import (
    SyntheticConfig,
    SyntheticOracle,
    build_customer_dataset,
    generate_synthetic_data,
    oracle_auroc,
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


def independent_log_odds(data_dir, last_n: int | None) -> dict[int, float]:
    """The posterior of docs/data.md, recomputed from the raw CSV strings with the standard library only."""
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
    prior = parameters["label_prior"]
    log_odds = {}
    for customer, history in events.items():
        window = sorted(history, key=lambda event: event[0])  # stable: ties keep file order, as the reader does
        window = window if last_n is None else window[-last_n:]
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
