"""The transaction reader on every quirk of the real files and on bad input; the stratified split."""

import logging
import math

import numpy as np
import pyarrow as pa
import pytest

from txformer.data import (
    TransactionDataError,
    build_customer_dataset,
    read_labels,
    read_transactions,
    stratified_split,
)


HEADER = "customer_id,tr_datetime,mcc_code,tr_type,amount,term_id"


def write_file(tmp_path, lines: list[str], name: str = "transactions.csv", header: str | None = HEADER):
    path = tmp_path / name
    path.write_text("\n".join(([header] if header is not None else []) + lines) + "\n")
    return path


def days(day: int, hour: int, minute: int, second: int) -> float:
    return day + (3600 * hour + 60 * minute + second) / 86400


def test_real_format_quirks(tmp_path):
    path = write_file(
        tmp_path,
        [
            "39026145,454 10:54:60,4814,1030,-2245.92,",
            "39026145,0 10:23:26,4814,1030,-2245.92,RU570124",
            "10001,2 00:00:00,6011,2010,4491.83,022915",
            "39026145,1 10:19:29,6011,7010,56147.89,nan",
            "10001,1 23:59:59,5411,1010,-0.01,  ",
        ],
    )
    customers = build_customer_dataset(path)
    assert customers.column_names == ["customer_id", "event_time", "mcc_code", "tr_type", "term_id", "amount"]
    assert customers["customer_id"] == [10001, 39026145]
    first, second = customers[0], customers[1]
    assert first["event_time"] == [days(1, 23, 59, 59), days(2, 0, 0, 0)]
    assert first["term_id"] == [None, "022915"]  # blank after trimming = missing; leading zeros kept
    assert first["amount"] == [-0.01, 4491.83]
    # Unsorted rows come back sorted by time; seconds = 60 is the next minute.
    assert second["event_time"] == [days(0, 10, 23, 26), days(1, 10, 19, 29), days(454, 10, 55, 0)]
    assert second["term_id"] == ["RU570124", None, None]
    assert second["mcc_code"] == [4814, 6011, 4814]
    assert second["tr_type"] == [1030, 7010, 1030]
    assert customers.features["amount"].feature.dtype == "float64"
    assert customers.features["mcc_code"].feature.dtype == "int64"


def test_read_transactions_is_flat_and_in_file_order(tmp_path):
    path = write_file(tmp_path, ["2,1 00:00:00,1,1,5,A", "1,0 00:00:00,1,1,-5,"])
    table = read_transactions(path)
    assert isinstance(table, pa.Table)
    assert table.column_names == ["customer_id", "event_time", "mcc_code", "tr_type", "amount", "term_id"]
    assert table.column("customer_id").to_pylist() == [2, 1]


def test_ties_keep_file_order(tmp_path):
    path = write_file(tmp_path, ["7,3 12:00:00,1,1,1.0,", "7,3 12:00:00,2,1,2.0,", "7,1 12:00:00,3,1,3.0,"])
    assert build_customer_dataset(path)[0]["mcc_code"] == [3, 1, 2]


def test_extra_columns_are_ignored(tmp_path):
    path = write_file(tmp_path, ["1,0 00:00:00,1,1,5,A,x"], header=HEADER + ",comment")
    assert build_customer_dataset(path)[0]["term_id"] == ["A"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("customer_id,tr_datetime,mcc,tr_type,amount,term_id", r"missing column\(s\) \['mcc_code'\]"),
        ("customer_id,tr_datetime,mcc_code,tr_type,term_id", r"missing column\(s\) \['amount'\]"),
        ("customer_id,tr_datetime,mcc_code,tr_type,amount,amount,term_id", "duplicated column names"),
    ],
)
def test_missing_or_renamed_columns(tmp_path, header, message):
    path = write_file(tmp_path, ["1,0 00:00:00,1,1,5,A"], header=header)
    with pytest.raises(TransactionDataError, match=message):
        read_transactions(path)


def test_wrong_field_count_names_the_line(tmp_path):
    path = write_file(tmp_path, ["1,0 00:00:00,1,1,5,A", "1,0 00:00:01,1,1,5", "1,0 00:00:02,1,1,5,A"])
    with pytest.raises(TransactionDataError, match=r"transactions.csv line 3: expected 6 fields .* found 5"):
        read_transactions(path)


def test_bad_line_deep_in_a_large_file(tmp_path):
    lines = [f"{i % 50},{i % 400} 10:00:00,5411,1010,-1.5,RU{i}" for i in range(30_000)]
    lines[25_000] = "1,2,3"
    path = write_file(tmp_path, lines)
    with pytest.raises(TransactionDataError, match="line 25002: expected 6 fields"):
        read_transactions(path)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("abc", r"line 3: amount 'abc' is not a number"),
        ("1,5", "line 3: expected 6 fields"),
        ("nan", "line 3: amount is missing"),
        ("", "line 3: amount is missing"),
        ("inf", "line 3: amount is not finite"),
        ("-inf", "line 3: amount is not finite"),
    ],
)
def test_bad_amounts(tmp_path, amount, message):
    path = write_file(tmp_path, ["1,0 00:00:00,1,1,5,A", f"1,0 00:00:01,1,1,{amount},A"])
    with pytest.raises(TransactionDataError, match=message):
        read_transactions(path)


def test_non_integer_code_names_the_line(tmp_path):
    path = write_file(tmp_path, ["1,0 00:00:00,1,1,5,A", "1,0 00:00:00,54x1,1,5,A"])
    with pytest.raises(TransactionDataError, match=r"line 3: mcc_code '54x1' is not a number"):
        read_transactions(path)


def test_line_numbers_count_skipped_blank_lines(tmp_path):
    path = tmp_path / "transactions.csv"
    path.write_text(f"{HEADER}\n1,0 00:00:00,1,1,5,A\n\n1,0 00:00:00,1,1,inf,A\n")
    with pytest.raises(TransactionDataError, match="line 4: amount is not finite"):
        read_transactions(path)


@pytest.mark.parametrize(
    "bad_time", ["2021-01-01 10:00:00", "12 10:00", "12 24:00:00", "12 10:60:00", "12 10:00:61", "-1 10:00:00", ""]
)
def test_unparseable_datetime_names_the_line(tmp_path, bad_time):
    path = write_file(tmp_path, ["1,0 00:00:00,1,1,5,A", f"1,{bad_time},1,1,5,A"])
    with pytest.raises(TransactionDataError, match="line 3: tr_datetime"):
        read_transactions(path)


def test_empty_file_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TransactionDataError, match="empty.csv: the file is empty"):
        read_transactions(empty)
    with pytest.raises(TransactionDataError, match="header but no transactions"):
        read_transactions(write_file(tmp_path, []))
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_transactions(tmp_path / "nowhere.csv")


def test_duplicate_rows_are_kept_and_reported(tmp_path, caplog):
    row = "5,3 10:00:00,5411,1010,-100.00,RU1"
    other = "5,3 10:00:00,5411,1010,-100.00,RU2"
    path = write_file(tmp_path, [row, other, row, "5,1 10:00:00,5411,1010,-100.00,RU1", row])
    with caplog.at_level(logging.WARNING, logger="txformer.data.reader"):
        kept = build_customer_dataset(path)
    assert len(kept[0]["event_time"]) == 5
    assert "2 exact duplicate rows" in caplog.text and "kept" in caplog.text
    dropped = build_customer_dataset(path, drop_duplicates=True)
    assert dropped[0]["term_id"] == ["RU1", "RU1", "RU2"]


def test_missing_terminal_is_not_a_duplicate_of_a_present_one(tmp_path, caplog):
    path = write_file(tmp_path, ["5,3 10:00:00,1,1,1.0,", "5,3 10:00:00,1,1,1.0,A"])
    with caplog.at_level(logging.WARNING, logger="txformer.data.reader"):
        build_customer_dataset(path)
    assert "duplicate" not in caplog.text


def test_one_event_and_one_hundred_thousand_events(tmp_path):
    num_events = 100_000
    rng = np.random.default_rng(0)
    day = rng.integers(0, 457, num_events)
    lines = [f"2,{d} 12:{i % 60:02d}:{i % 61:02d},5411,1010,-{i}.5,T{i % 7}" for i, d in enumerate(day.tolist())]
    path = write_file(tmp_path, ["1,5 01:02:03,6011,2010,10.00,"] + lines)
    customers = build_customer_dataset(path)
    assert customers[0]["event_time"] == [days(5, 1, 2, 3)]
    heavy = customers[1]
    assert len(heavy["event_time"]) == num_events
    assert np.all(np.diff(heavy["event_time"]) >= 0)


def write_labels(tmp_path, lines: list[str], header: str = "customer_id,gender"):
    return write_file(tmp_path, lines, name="gender_train.csv", header=header)


@pytest.fixture
def three_customers(tmp_path):
    return write_file(tmp_path, ["1,0 00:00:00,1,1,5,A", "2,0 00:00:00,1,1,5,A", "3,0 00:00:00,1,1,5,A"])


def test_labels_join_and_unknown_ids_are_reported(tmp_path, three_customers, caplog):
    labels = write_labels(tmp_path, ["2,1", "1,0", "99,1"])
    with caplog.at_level(logging.INFO, logger="txformer.data.reader"):
        customers = build_customer_dataset(three_customers, labels)
    assert customers["customer_id"] == [1, 2] and customers["labels"] == [0, 1]
    assert customers.features["labels"].dtype == "int64"
    assert "1 labelled customers" in caplog.text and "[99]" in caplog.text
    assert "1 customers of" in caplog.text  # customer 3 has no label


def test_keep_unlabelled_and_customer_ids(tmp_path, three_customers):
    labels = write_labels(tmp_path, ["2,1", "1,0"])
    customers = build_customer_dataset(three_customers, labels, keep_unlabelled=True)
    assert customers["labels"] == [0, 1, None]
    assert build_customer_dataset(three_customers, customer_ids=[3, 1])["customer_id"] == [1, 3]
    with pytest.raises(TransactionDataError, match="no transactions left"):
        build_customer_dataset(three_customers, customer_ids=[42])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["1,0", "2,1", "1,1"], "line 4: customer_id 1 appears more than once"),
        (["1,0", "2,2"], "line 3: gender 2 is not 0 or 1"),
        (["1,0", "2,"], "line 3: gender is missing"),
        (["1,0", "2,male"], "line 3: gender 'male' is not a number"),
        ([], "header but no labels"),
    ],
)
def test_bad_labels(tmp_path, lines, message):
    with pytest.raises(TransactionDataError, match=message):
        read_labels(write_labels(tmp_path, lines))


def test_label_file_with_other_column_names(tmp_path):
    with pytest.raises(TransactionDataError, match=r"missing column\(s\) \['gender'\]"):
        read_labels(write_labels(tmp_path, ["1,0"], header="customer_id,target"))
    table = read_labels(write_labels(tmp_path, ["1,0", "2,1.0"], header="customer_id,target"), label_column="target")
    assert table.column("labels").to_pylist() == [0, 1]


def test_stratified_split_is_seeded_and_stratified(tmp_path):
    num_customers = 200
    lines = [f"{customer},{customer % 400} 10:00:00,1,1,5,A" for customer in range(num_customers)]
    transactions = write_file(tmp_path, lines)
    labels = write_labels(tmp_path, [f"{customer},{int(customer % 10 < 3)}" for customer in range(num_customers)])
    customers = build_customer_dataset(transactions, labels)
    train, test = stratified_split(customers, test_size=0.25, seed=3)
    again_train, _ = stratified_split(customers, test_size=0.25, seed=3)
    other_train, _ = stratified_split(customers, test_size=0.25, seed=4)
    assert len(test) == 50 and len(train) == 150
    assert train["customer_id"] == again_train["customer_id"] != other_train["customer_id"]
    assert set(train["customer_id"]).isdisjoint(test["customer_id"])
    assert math.isclose(np.mean(test["labels"]), 0.3) and math.isclose(np.mean(train["labels"]), 0.3)


def test_split_with_a_single_class_or_no_labels(tmp_path, three_customers):
    labels = write_labels(tmp_path, ["1,1", "2,1", "3,1"])
    with pytest.raises(ValueError, match="Only one class"):
        stratified_split(build_customer_dataset(three_customers, labels), test_size=0.3, seed=0)
    with pytest.raises(ValueError, match="no 'labels' column"):
        stratified_split(build_customer_dataset(three_customers), test_size=0.3, seed=0)
    partly = write_labels(tmp_path, ["1,1", "2,0"])
    with pytest.raises(ValueError, match="have no label"):
        stratified_split(build_customer_dataset(three_customers, partly, keep_unlabelled=True), test_size=0.3, seed=0)
