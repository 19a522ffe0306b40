"""The LightGBM baseline: aggregate features against a plain per-customer computation, unknown codes, the held-out
split shared with training, the embeddings join and the command line end to end."""

import csv
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from txformer.baseline import (
    AMOUNT_QUANTILES,
    AggregateFeaturizer,
    build_features,
    customer_aggregates,
    main,
    read_customer_embeddings,
)
from txformer.data import build_customer_dataset, generate_synthetic_data, split_for_evaluation
from txformer.embedding import embeddings_table
from txformer.training import DataArguments, TxFormerTrainingArguments, prepare_datasets


def hand_made_customers(customers: dict[int, list[tuple]]) -> datasets.Dataset:
    """A customer dataset from `{customer_id: [(event_time, mcc_code, tr_type, term_id, amount), ...]}`."""
    columns = {"customer_id": [], "event_time": [], "mcc_code": [], "tr_type": [], "term_id": [], "amount": []}
    for customer, events in customers.items():
        columns["customer_id"].append(customer)
        for name, values in zip(list(columns)[1:], zip(*events, strict=True), strict=True):
            columns[name].append(list(values))
    columns["labels"] = [customer % 2 for customer in customers]
    return datasets.Dataset.from_dict(columns)


TRAIN_CUSTOMERS = {
    11: [
        (0.25, 5411, 1010, "T1", -120.5),
        (0.5, 5411, 1010, None, -30.0),
        (3.75, 6011, 7070, "T2", 5000.0),
        (9.0, 5912, 1010, "T1", -0.75),
    ],
    12: [
        (1.5, 6011, 7070, None, 250.0),
        (1.9, 5411, 2020, "T3", -99.99),
        (20.0, 5411, 1010, "T3", 0.0),
    ],
}
# Customer 21 has an MCC code (4814) and a type (9999) that the training customers never showed.
TEST_CUSTOMERS = {
    21: [
        (2.0, 4814, 1010, "T9", -15.0),
        (2.5, 5411, 9999, None, 70.0),
        (2.51, 4814, 9999, None, -1.0),
        (8.0, 5411, 1010, "T9", -2_000_000.0),
        (15.999, 6011, 7070, "T1", 1e9),
    ]
}


def plain_features(events: list[tuple], mcc_codes: list[int], tr_types: list[int]) -> dict[str, float]:
    """The aggregates of one customer, computed event by event (the reference)."""
    time, mcc, tr_type, terminal, amount = (np.array(values) for values in zip(*events, strict=True))
    n = len(events)
    features = {}
    for name, codes, values in (("mcc_code", mcc_codes, mcc), ("tr_type", tr_types, tr_type)):
        for code in ["other", *codes]:
            chosen = ~np.isin(values, codes) if code == "other" else values == code
            features[f"{name}={code}:count"] = chosen.sum()
            features[f"{name}={code}:share"] = chosen.sum() / n
            features[f"{name}={code}:amount_sum"] = amount[chosen].sum()
            features[f"{name}={code}:amount_mean"] = amount[chosen].mean() if chosen.any() else np.nan
    hours = [int(round((t % 1) * 86400)) // 3600 for t in time]
    weekdays = [int(t // 1) % 7 for t in time]
    for hour in range(24):
        features[f"hour={hour}:share"] = hours.count(hour) / n
    for weekday in range(7):
        features[f"weekday={weekday}:share"] = weekdays.count(weekday) / n
    for decade in range(-2, 9):
        low, high = (0.0 if decade == -2 else 10.0**decade), (np.inf if decade == 8 else 10.0 ** (decade + 1))
        features[f"debit_decade={decade}:share"] = ((amount < 0) & (-amount >= low) & (-amount < high)).sum() / n
        features[f"credit_decade={decade}:share"] = ((amount > 0) & (amount >= low) & (amount < high)).sum() / n
    for group, chosen in (("amount", amount == amount), ("debit", amount < 0), ("credit", amount > 0)):
        values = amount[chosen]
        empty = values.size == 0
        features[f"{group}:count"] = values.size
        features[f"{group}:sum"] = values.sum()
        for statistic, function in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
            features[f"{group}:{statistic}"] = np.nan if empty else function(values)
        for quantile in AMOUNT_QUANTILES:
            features[f"{group}:q{round(100 * quantile)}"] = np.nan if empty else np.quantile(values, quantile)
    features["debit:share"] = (amount < 0).sum() / n
    gaps = np.diff(time)
    features.update(
        {
            "num_events": n,
            "first_day": time[0],
            "last_day": time[-1],
            "span_days": time[-1] - time[0],
            "active_days": len({int(t // 1) for t in time}),
            "events_per_day": n / (time[-1] - time[0] + 1),
            "events_per_active_day": n / len({int(t // 1) for t in time}),
            "gap_days:mean": gaps.mean() if n > 1 else np.nan,
            "gap_days:std": gaps.std() if n > 1 else np.nan,
            "gap_days:max": gaps.max() if n > 1 else np.nan,
            "mcc_code:distinct": len(set(mcc)),
            "tr_type:distinct": len(set(tr_type)),
            "term_id:distinct": len({value for value in terminal if value is not None}),
            "term_id:missing_share": sum(value is None for value in terminal) / n,
        }
    )
    return features


@pytest.fixture(scope="module")
def featurizer() -> AggregateFeaturizer:
    return AggregateFeaturizer.fit(hand_made_customers(TRAIN_CUSTOMERS), min_count=1)


def test_aggregates_match_a_plain_computation(featurizer):
    """Every feature of training and unseen customers equals the event-by-event reference, codes included."""
    mcc_codes, tr_types = (field.codes for field in featurizer.vocabulary.fields)
    assert sorted(mcc_codes) == [5411, 5912, 6011] and sorted(tr_types) == [1010, 2020, 7070]
    for customers in (TRAIN_CUSTOMERS, TEST_CUSTOMERS):
        features = featurizer.transform(hand_made_customers(customers))
        assert features.customer_ids.tolist() == list(customers)
        assert len(set(features.names)) == len(features.names) == features.values.shape[1]
        for row, events in enumerate(customers.values()):
            expected = plain_features(events, mcc_codes, tr_types)
            assert sorted(expected) == sorted(features.names)
            got = dict(zip(features.names, features.values[row].tolist(), strict=True))
            for name, value in expected.items():
                assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6, nan_ok=True), name


def test_unknown_codes_go_to_the_other_columns(featurizer):
    """Codes unseen in training get no column of their own (same columns as on training) and count as "other"."""
    train_names = featurizer.transform(hand_made_customers(TRAIN_CUSTOMERS)).names
    features = featurizer.transform(hand_made_customers(TEST_CUSTOMERS))
    assert features.names == train_names
    assert not any("4814" in name or "9999" in name for name in features.names)
    got = dict(zip(features.names, features.values[0].tolist(), strict=True))
    assert got["mcc_code=other:count"] == 2 and got["mcc_code=other:amount_sum"] == pytest.approx(-16.0)
    assert got["tr_type=other:count"] == 2 and got["tr_type=other:share"] == pytest.approx(0.4)


def test_max_events_aggregates_only_the_most_recent_events():
    customers = hand_made_customers({**TRAIN_CUSTOMERS, **TEST_CUSTOMERS})
    windowed = AggregateFeaturizer.fit(customers, max_events=2).transform(customers)
    last_two = hand_made_customers(
        {customer: events[-2:] for customer, events in {**TRAIN_CUSTOMERS, **TEST_CUSTOMERS}.items()}
    )
    featurizer = AggregateFeaturizer.fit(customers)
    np.testing.assert_allclose(windowed.values, featurizer.transform(last_two).values, equal_nan=True)
    assert windowed.values[:, windowed.names.index("num_events")].tolist() == [2, 2, 2]


def test_customer_aggregates_fits_on_the_dataset_when_no_featurizer_is_given():
    customers = hand_made_customers(TRAIN_CUSTOMERS)
    customer_ids, values, names = customer_aggregates(customers)
    assert customer_ids.tolist() == [11, 12] and values.shape == (2, len(names))


def write_embeddings(path, customer_ids, values) -> None:
    """A Parquet file as `scripts/embed.py` writes it."""
    pq.write_table(embeddings_table(np.asarray(customer_ids), np.asarray(values, dtype=np.float32)), path)


def test_embeddings_join_on_customer_id(tmp_path, featurizer):
    """Rows are matched by customer_id whatever the file order; a customer missing from the file is named."""
    customers = hand_made_customers({**TRAIN_CUSTOMERS, **TEST_CUSTOMERS})
    path = tmp_path / "embeddings.parquet"
    file_ids = [21, 99, 12, 11]
    write_embeddings(path, file_ids, np.array([[2.1, -2.1], [9.9, 9.9], [1.2, -1.2], [1.1, -1.1]]))
    embeddings = read_customer_embeddings(path)
    assert embeddings.names == ["emb_0", "emb_1"]

    only = build_features(customers, "embeddings", None, embeddings)
    np.testing.assert_allclose(only.values, [[1.1, -1.1], [1.2, -1.2], [2.1, -2.1]], rtol=1e-6)
    both = build_features(customers, "both", featurizer, embeddings)
    aggregates = featurizer.transform(customers)
    assert both.names == [*aggregates.names, "emb_0", "emb_1"]
    np.testing.assert_allclose(both.values[:, -2:], only.values)
    np.testing.assert_allclose(both.values[:, :-2], aggregates.values, equal_nan=True)

    write_embeddings(path, [11, 21], np.zeros((2, 2)))
    with pytest.raises(ValueError, match=rf"{path.name} has no row for 1 customer.*\[12\]"):
        build_features(customers, "both", featurizer, read_customer_embeddings(path), str(path))


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"customer_id": [1, 2], "vector": [0.1, 0.2]}, "expected embedding columns"),
        ({"customer_id": [1, 2], "emb_0": [0.1, 0.2], "emb_2": [0.1, 0.2]}, "expected embedding columns"),
        ({"customer_id": [1, 1], "emb_0": [0.1, 0.2]}, "customer_id 1 appears 2 times"),
        ({"customer_id": [1, 2], "emb_0": [0.1, float("nan")]}, "customer 2 has a missing or non-finite"),
        ({"customer": [1, 2], "emb_0": [0.1, 0.2]}, "integer `customer_id` column"),
    ],
)
def test_bad_embeddings_files_are_errors_naming_the_file(tmp_path, columns, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(ValueError, match=message) as error:
        read_customer_embeddings(path)
    assert str(path) in str(error.value)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """Small synthetic data, in the cache layout that training and the baseline share."""
    cache = tmp_path_factory.mktemp("cache")
    generate_synthetic_data(cache / "synthetic-independent-n300-seed0", num_customers=300, seed=0)
    return cache


def test_held_out_customers_are_those_of_training(synthetic_dir, tmp_path):
    data_args = DataArguments(data_cache_dir=str(synthetic_dir), synthetic_num_customers=300, eval_fraction=0.3)
    training = prepare_datasets(data_args, TxFormerTrainingArguments(output_dir=str(tmp_path)))
    customers = build_customer_dataset(
        synthetic_dir / "synthetic-independent-n300-seed0" / "transactions.csv",
        synthetic_dir / "synthetic-independent-n300-seed0" / "gender_train.csv",
    )
    train, held_out = split_for_evaluation(customers, data_args.eval_fraction, data_args.split_seed)
    assert list(held_out["customer_id"]) == list(training["eval"]["customer_id"])
    # The model carves its validation split out of the same training customers.
    model_train = [*training["train"]["customer_id"], *training["validation"]["customer_id"]]
    assert sorted(train["customer_id"]) == sorted(model_train)


def test_command_line_end_to_end(synthetic_dir, tmp_path):
    """The CLI writes the results and the held-out predictions (the training split's held-out customers) and learns
    the synthetic signal; with embeddings it trains on them."""
    common = ["--data_cache_dir", str(synthetic_dir), "--synthetic_num_customers", "300", "--eval_fraction", "0.3"]
    output_dir = tmp_path / "aggregates"
    metrics = main([*common, "--output_dir", str(output_dir)])
    results = json.loads((output_dir / "baseline_results.json").read_text())
    assert results["metrics"]["eval_auroc"] == metrics["eval_auroc"] > 0.62
    assert 0.5 < results["metrics"]["oracle_auroc_all"] <= 1
    assert results["metrics"]["num_features"] > 300
    with open(output_dir / "baseline_predictions.csv") as file:
        rows = list(csv.DictReader(file))
    training = prepare_datasets(
        DataArguments(data_cache_dir=str(synthetic_dir), synthetic_num_customers=300, eval_fraction=0.3),
        TxFormerTrainingArguments(output_dir=str(tmp_path)),
    )
    assert [int(row["customer_id"]) for row in rows] == list(training["eval"]["customer_id"])
    assert all(0 < float(row["probability"]) < 1 for row in rows)

    # Embeddings that hold the label (plus noise) for every customer: LightGBM on them alone finds it.
    oracle = json.loads((synthetic_dir / "synthetic-independent-n300-seed0" / "oracle.json").read_text())
    labels = np.array(oracle["labels"], dtype=np.float64)
    noise = np.random.default_rng(0).normal(size=(len(labels), 3))
    path = tmp_path / "embeddings.parquet"
    write_embeddings(path, oracle["customer_ids"], np.column_stack([2 * labels + noise[:, 0], noise[:, 1:]]))
    output_dir = tmp_path / "embeddings"
    metrics = main(
        [*common, "--features", "embeddings", "--embeddings", str(path), "--output_dir", str(output_dir)]
        + ["--max_length", "50"]
    )
    assert metrics["num_features"] == 3 and metrics["eval_auroc"] > 0.7
    assert 0.5 < metrics["oracle_auroc_last_max_length"] <= 1


def test_embeddings_go_with_their_feature_sets():
    with pytest.raises(ValueError, match="embeddings go with"):
        main(["--features", "both"])
    with pytest.raises(ValueError, match="embeddings go with"):
        main(["--embeddings", "file.parquet"])


def test_streaming_is_refused():
    with pytest.raises(ValueError, match="--streaming is for scripts/train.py"):
        main(["--streaming"])
