"""EventVocabulary: fitting on training customers, vectorised encoding, unknown and missing codes, JSON round trip."""

import json

import datasets
import pyarrow as pa
import pytest

from txformer.data import VOCABULARY_FILE, EventVocabulary


def customers(rows: list[dict]) -> datasets.Dataset:
    """A customer dataset shaped like `build_customer_dataset`'s output."""
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    types = {
        "customer_id": pa.int64(),
        "event_time": pa.list_(pa.float64()),
        "mcc_code": pa.list_(pa.int64()),
        "tr_type": pa.list_(pa.int64()),
        "term_id": pa.list_(pa.string()),
        "amount": pa.list_(pa.float64()),
        "labels": pa.int64(),
    }
    return datasets.Dataset(pa.table({name: pa.array(values, types[name]) for name, values in columns.items()}))


def customer(customer_id: int, mcc: list[int], tr_type: list[int], term: list, label: int = 0) -> dict:
    return {
        "customer_id": customer_id,
        "event_time": [float(index) for index in range(len(mcc))],
        "mcc_code": mcc,
        "tr_type": tr_type,
        "term_id": term,
        "amount": [-1.0] * len(mcc),
        "labels": label,
    }


@pytest.fixture
def train():
    return customers(
        [
            customer(1, [5411, 5411, 6011], [1010, 1010, 1030], ["A", "B", None]),
            customer(2, [5411, 4814, 6011], [1010, 2010, 1010], ["A", "", "C"], label=1),
        ]
    )


def test_fit_orders_codes_by_frequency_with_special_indices(train):
    vocabulary = EventVocabulary.fit(train, min_count=1)
    assert vocabulary.categorical_fields == ["mcc_code", "tr_type", "term_id"]
    assert vocabulary.numeric_fields == ["amount"]
    by_name = {field.name: field for field in vocabulary.fields}
    assert by_name["mcc_code"].codes == [5411, 6011, 4814]  # 3, 2, 1 occurrences
    assert by_name["tr_type"].codes == [1010, 1030, 2010]  # ties: smaller code first
    assert by_name["term_id"].codes == ["A", "B", "C"]  # null and "" are missing, not codes
    # pad + unknown (+ missing for the string field) + codes
    assert vocabulary.vocab_sizes == [2 + 3, 2 + 3, 3 + 3]


def test_min_count_and_max_size_per_field(train):
    vocabulary = EventVocabulary.fit(train, min_count={"mcc_code": 2, "term_id": 2}, max_size={"tr_type": 1})
    by_name = {field.name: field.codes for field in vocabulary.fields}
    assert by_name == {"mcc_code": [5411, 6011], "tr_type": [1010], "term_id": ["A"]}


def test_encode_maps_unknown_and_missing_and_keeps_other_columns(train):
    vocabulary = EventVocabulary.fit(train, min_count=1)
    unseen = customers([customer(9, [5411, 9999, 4814], [7777, 1010, 1030], [None, "Z", "C"], label=1)])
    encoded = vocabulary.encode(unseen)
    row = encoded[0]
    assert row["mcc_code"] == [2, 1, 4]
    assert row["tr_type"] == [1, 2, 3]
    assert row["term_id"] == [2, 1, 5]  # missing = 2, unseen = 1, known from 3
    assert row["num_events"] == 3 and row["labels"] == 1 and row["customer_id"] == 9
    assert row["amount"] == [-1.0, -1.0, -1.0] and row["event_time"] == [0.0, 1.0, 2.0]
    assert encoded.features["mcc_code"].feature.dtype == "int32"
    assert encoded.column_names == [*unseen.column_names, "num_events"]


def test_encode_after_select_and_in_parallel(train):
    vocabulary = EventVocabulary.fit(train, min_count=1)
    second_only = train.select([1])
    assert vocabulary.encode(second_only)["mcc_code"] == [[2, 4, 3]]
    many = customers([customer(index, [5411, 6011], [1010, 1010], ["A", None]) for index in range(40)])
    assert vocabulary.encode(many, num_proc=2)["term_id"] == [[3, 2]] * 40


def test_fit_only_sees_the_given_customers(train):
    vocabulary = EventVocabulary.fit(train.select([0]), min_count=1)
    assert {field.name: field.codes for field in vocabulary.fields}["mcc_code"] == [5411, 6011]


def test_save_and_load_round_trip(train, tmp_path):
    vocabulary = EventVocabulary.fit(train, min_count=1)
    path = vocabulary.save_pretrained(tmp_path / "model")
    assert path.name == VOCABULARY_FILE
    assert json.loads(path.read_text())["categorical_fields"][2]["codes"] == ["A", "B", "C"]
    loaded = EventVocabulary.from_pretrained(tmp_path / "model")
    assert loaded.vocab_sizes == vocabulary.vocab_sizes
    assert loaded.categorical_fields == vocabulary.categorical_fields
    assert loaded.encode(train)[:] == vocabulary.encode(train)[:]


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=VOCABULARY_FILE):
        EventVocabulary.from_pretrained(tmp_path)
    (tmp_path / VOCABULARY_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        EventVocabulary.from_pretrained(tmp_path)


def test_bad_datasets(train):
    with pytest.raises(ValueError, match=r"no column\(s\) \['term_id'\]"):
        EventVocabulary.fit(train.remove_columns("term_id"))
    vocabulary = EventVocabulary.fit(train, min_count=1)
    ragged = customers([customer(5, [5411, 6011], [1010], ["A", "B"])])
    with pytest.raises(ValueError, match="Customer 5: tr_type has 1 values but 2 events"):
        vocabulary.encode(ragged)


def test_fit_over_many_tables_is_fit_over_their_concatenation():
    rows = [
        customer(
            index,
            [index % 7, 3, 3][: 1 + index % 3],
            [1, index % 4, 2][: 1 + index % 3],
            ["A", None, ""][: 1 + index % 3],
        )
        for index in range(40)
    ]
    whole = EventVocabulary.fit(customers(rows), min_count=2, max_size={"mcc_code": 4})
    # 40 one-customer tables: the counts are merged on the way (every COUNTS_TO_MERGE tables).
    parts = [pa.Table.from_pylist([row], schema=customers(rows).data.schema) for row in rows]
    assert EventVocabulary.fit_tables(parts, min_count=2, max_size={"mcc_code": 4}).to_dict() == whole.to_dict()
    assert whole.fields[0].codes == [3, 0, 1, 2] and whole.fields[2].codes == ["A"]
    with pytest.raises(ValueError, match="No customers"):
        EventVocabulary.fit_tables([])
