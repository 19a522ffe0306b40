"""TransactionCollator: truncation keeps the most recent events, right padding, mask, time shift, errors."""

import math

import numpy as np
import pytest
import torch

from txformer.data import EventVocabulary, TransactionCollator, build_customer_dataset


FIELDS = dict(categorical_fields=["mcc_code", "tr_type"], numeric_fields=["amount"])


def history(customer_id: int, num_events: int, label: int | None = 0, start_day: float = 100.0) -> dict:
    """Encoded customer with events numbered 1..num_events (mcc = position, tr_type = 2 * position)."""
    positions = np.arange(1, num_events + 1)
    feature = {
        "customer_id": customer_id,
        "event_time": (start_day + positions / 24).tolist(),
        "mcc_code": positions.tolist(),
        "tr_type": (2 * positions).tolist(),
        "amount": (-10.0 * positions).tolist(),
        "num_events": num_events,
    }
    if label is not None:
        feature["labels"] = label
    return feature


def test_shapes_padding_and_mask():
    batch = TransactionCollator(**FIELDS, max_length=None)([history(1, 5), history(2, 2, label=1)])
    assert set(batch) == {"input_ids", "numeric_values", "event_time", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 5, 2) and batch["input_ids"].dtype == torch.long
    assert batch["numeric_values"].shape == (2, 5, 1) and batch["numeric_values"].dtype == torch.float32
    assert batch["event_time"].shape == (2, 5) and batch["event_time"].dtype == torch.float32
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.long
    assert batch["input_ids"][1, :, 0].tolist() == [1, 2, 0, 0, 0]
    assert batch["input_ids"][1, :, 1].tolist() == [2, 4, 0, 0, 0]
    assert batch["numeric_values"][1, :, 0].tolist() == [-10.0, -20.0, 0.0, 0.0, 0.0]
    assert batch["event_time"][1, 2:].tolist() == [0.0, 0.0, 0.0]


def test_truncation_keeps_the_most_recent_events():
    batch = TransactionCollator(**FIELDS, max_length=3)([history(1, 10), history(2, 2)])
    assert batch["input_ids"].shape == (2, 3, 2)
    assert batch["input_ids"][0, :, 0].tolist() == [8, 9, 10]
    assert batch["numeric_values"][0, :, 0].tolist() == [-80.0, -90.0, -100.0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_pad_to_multiple_of():
    batch = TransactionCollator(**FIELDS, max_length=6, pad_to_multiple_of=4)([history(1, 10), history(2, 1)])
    assert batch["input_ids"].shape == (2, 8, 2)
    assert batch["attention_mask"].sum(dim=1).tolist() == [6, 1]


def test_event_time_is_shifted_by_whole_weeks():
    start_day = 456.0
    feature = history(1, 30, start_day=start_day)
    event_time = TransactionCollator(**FIELDS, max_length=20)([feature])["event_time"][0].double()
    original = torch.tensor(feature["event_time"][-20:], dtype=torch.float64)
    shift = original - event_time
    # One shift per row, a multiple of 7 days no larger than the first kept event: hour and weekday survive.
    assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-4)
    weeks = shift[0].item() / 7
    assert math.isclose(weeks, round(weeks), abs_tol=1e-4)
    assert 0 <= event_time[0].item() < 7
    assert torch.allclose(event_time[1:] - event_time[:-1], original[1:] - original[:-1], atol=1e-5)


def test_no_labels_key_without_labels():
    batch = TransactionCollator(**FIELDS)([history(1, 3, label=None), history(2, 2, label=None)])
    assert "labels" not in batch


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"event_time": [], "mcc_code": [], "tr_type": [], "amount": []}, "Customer 7 has no events"),
        ({"amount": [-1.0, float("nan"), 2.0]}, "Customer 7 has a NaN or infinite numeric value"),
        ({"amount": [-1.0, float("inf"), 2.0]}, "Customer 7 has a NaN or infinite numeric value"),
        ({"tr_type": [1, 2]}, "Customer 7: tr_type has 2 values, 3 events"),
        ({"labels": None}, "Customer 7 has no label while others have"),
    ],
)
def test_errors_name_the_customer(broken, message):
    bad = {**history(7, 3), **broken}
    with pytest.raises(ValueError, match=message):
        TransactionCollator(**FIELDS)([history(1, 3), bad])


def test_invalid_settings():
    with pytest.raises(ValueError, match="max_length"):
        TransactionCollator(**FIELDS, max_length=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        TransactionCollator(**FIELDS, pad_to_multiple_of=0)


def test_numpy_features_and_the_trainer_path(tmp_path):
    transactions = tmp_path / "transactions.csv"
    transactions.write_text(
        "customer_id,tr_datetime,mcc_code,tr_type,amount,term_id\n"
        "1,3 10:00:00,5411,1010,-5.5,A\n1,1 10:00:60,6011,1030,100,\n2,2 23:00:00,5411,1010,-7,A\n"
    )
    labels = tmp_path / "gender_train.csv"
    labels.write_text("customer_id,gender\n1,1\n2,0\n")
    customers = build_customer_dataset(transactions, labels)
    vocabulary = EventVocabulary.fit(customers, min_count=1)
    encoded = vocabulary.encode(customers)
    collator = TransactionCollator(vocabulary.categorical_fields, vocabulary.numeric_fields, max_length=4)
    from_lists = collator([encoded[0], encoded[1]])
    from_numpy = collator([encoded.with_format("numpy")[index] for index in range(2)])
    for name, value in from_lists.items():
        assert torch.equal(value, from_numpy[name]), name
    assert from_lists["input_ids"][0].tolist() == [[3, 3, 2], [2, 2, 3]]  # 6011/1030/missing, then 5411/1010/A
    assert from_lists["numeric_values"][0, :, 0].tolist() == [100.0, -5.5]
    assert from_lists["labels"].tolist() == [1, 0]
