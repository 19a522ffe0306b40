"""Bad input on the paths users take (training data preparation, prediction, the model), beyond the reader's own
tests (tests/test_data_reader.py): each gets a clear error naming the file, line or customer, or a documented
handling (docs/reliability.md lists every case and its test)."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from conftest import random_batch, select_rows, tiny_config
from transformers import TrainingArguments

from txformer import TxFormerForSequenceClassification
from txformer.data import (
    VOCABULARY_FILE,
    EventVocabulary,
    TransactionDataError,
    build_customer_dataset,
    read_customer_ids,
    read_labels,
)
from txformer.prediction import PREPROCESSING_FILE, PredictionArguments, predict
from txformer.training import DataArguments, prepare_datasets


HEADER = "customer_id,tr_datetime,mcc_code,tr_type,amount,term_id"
MAX_LENGTH = 16
LABEL_PRIOR = 0.45
# Training customers of the model folder: known codes 5411, 6011, 4814 / 1010, 1030 / A, B.
TRAINING_ROWS = [
    f"{customer},{day} {hour:02d}:00:00,{mcc},{tr_type},{amount},{term}"
    for customer in range(1, 7)
    for day, hour, mcc, tr_type, amount, term in (
        (1, 9, 5411, 1010, -120.5, "A"),
        (2, 13, 6011, 1030, 5000.0, ""),
        (3, 18, 4814, 1010, -35.0, "B"),
        (5, 11, 5411, 1010, -99.9, "A"),
    )
]


def write_csv(path, lines: list[str], header: str = HEADER):
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def event_line(customer: int, seconds: int, mcc: int = 5411, tr_type: int = 1010, term: str = "A") -> str:
    """One transaction `seconds` after day 0, 00:00:00 (its amount a function of the time too)."""
    day, rest = divmod(seconds, 86400)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    amount = -(1 + seconds % 997) - 0.25
    return f"{customer},{day} {hour:02d}:{minute:02d}:{second:02d},{mcc},{tr_type},{amount},{term}"


# Transactions.


def test_shuffled_rows_give_the_customers_of_the_sorted_file(tmp_path):
    rng = np.random.default_rng(0)
    lines = [event_line(customer, int(second)) for customer in (3, 1, 2) for second in np.arange(300) * 7919]
    in_order = build_customer_dataset(write_csv(tmp_path / "sorted.csv", lines))
    shuffled = build_customer_dataset(write_csv(tmp_path / "shuffled.csv", list(rng.permutation(lines))))
    assert shuffled.to_dict() == in_order.to_dict()
    assert in_order["customer_id"] == [1, 2, 3]
    assert all(np.all(np.diff(times) > 0) for times in in_order["event_time"])


def test_a_one_event_history_scores_alone_as_in_a_batch(attention_type):
    config = tiny_config(attention_type)
    torch.manual_seed(0)
    model = TxFormerForSequenceClassification(config).eval()
    batch = random_batch(config, [1, 9, 1])
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**select_rows(batch, [0], 1)).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(alone, logits[:1], rtol=1e-5, atol=1e-5)


# Labels.


def test_labels_of_customers_absent_from_the_transactions_are_an_error_when_none_matches(tmp_path):
    transactions = write_csv(tmp_path / "transactions.csv", TRAINING_ROWS)
    labels = write_csv(tmp_path / "gender_train.csv", ["101,0", "102,1"], header="customer_id,gender")
    with pytest.raises(TransactionDataError, match=r"none of the 2 customers of .*gender_train.csv has transactions"):
        build_customer_dataset(transactions, labels)


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1"), ("0.5", "0.5"), ("inf", "inf"), ("1e3", "1000")])
def test_labels_outside_zero_and_one_name_the_line(tmp_path, value, shown):
    labels = write_csv(tmp_path / "gender_train.csv", ["1,0", "2,1", f"3,{value}"], header="customer_id,gender")
    with pytest.raises(TransactionDataError, match=rf"gender_train.csv line 4: gender {shown} is not 0 or 1"):
        read_labels(labels)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["1,1", "2,1", "3,1", "4,1", "5,1", "6,1"], r"Only one class \(\[1\]\) among 6 customers"),
        (["1,1", "2,1", "3,1", "4,1", "5,1", "6,0"], "Class 0 has a single customer"),
    ],
)
def test_training_on_a_single_class_stops_before_any_model_is_built(tmp_path, labels, message):
    transactions = write_csv(tmp_path / "transactions.csv", TRAINING_ROWS)
    label_file = write_csv(tmp_path / "gender_train.csv", labels, header="customer_id,gender")
    data_args = DataArguments(transactions=str(transactions), labels=str(label_file))
    with pytest.raises(ValueError, match=message):
        prepare_datasets(data_args, TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[]))


# Prediction.


def save_model_folder(folder, older_layout: bool = False):
    """A trained folder (untrained tiny model) fitted on `TRAINING_ROWS`: weights, config and the processor, or in
    the older layout the vocabulary and `preprocessing.json`."""
    vocabulary = EventVocabulary.fit(
        build_customer_dataset(write_csv(folder.parent / f"{folder.name}_training.csv", TRAINING_ROWS)), min_count=1
    )
    config = tiny_config(
        categorical_fields=vocabulary.categorical_fields,
        categorical_vocab_sizes=vocabulary.vocab_sizes,
        numeric_fields=vocabulary.numeric_fields,
    )
    torch.manual_seed(0)
    TxFormerForSequenceClassification(config).save_pretrained(folder)
    if older_layout:
        vocabulary.save_pretrained(folder)
        (folder / PREPROCESSING_FILE).write_text(json.dumps({"max_length": MAX_LENGTH, "label_prior": LABEL_PRIOR}))
    else:
        vocabulary.to_processor(max_length=MAX_LENGTH, label_prior=LABEL_PRIOR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A trained-folder layout of an older version: weights, config, vocabulary, preprocessing."""
    return save_model_folder(tmp_path_factory.mktemp("model"), older_layout=True)


def run_predict(model_dir, transactions, output_file, customer_ids=None) -> tuple[dict[int, float], dict]:
    """The probabilities written (by customer) and the report."""
    arguments = PredictionArguments(
        model_dir=str(model_dir),
        transactions=str(transactions),
        output_file=str(output_file),
        customer_ids=None if customer_ids is None else str(customer_ids),
        device="cpu",
    )
    written = predict(arguments)
    rows = [line.split(",") for line in written.read_text().splitlines()]
    assert rows[0] == ["customer_id", "probability"]
    report = json.loads(written.with_name(written.name + ".report.json").read_text())
    return {int(customer): float(probability) for customer, probability in rows[1:]}, report


def test_unseen_codes_count_as_unknown_and_are_reported(model_dir, tmp_path, caplog):
    lines = [
        event_line(1, 100, mcc=5411, tr_type=1010, term="A"),
        event_line(1, 200, mcc=7777, tr_type=9999, term="Z1"),  # unseen codes ...
        event_line(2, 100, mcc=5411, tr_type=1010, term="A"),
        event_line(2, 200, mcc=8888, tr_type=4242, term="Z2"),  # ... other unseen codes: the same input
        event_line(3, 100, mcc=5411, tr_type=1010, term="A"),
        event_line(3, 200, mcc=6011, tr_type=1030, term="B"),
    ]
    with caplog.at_level(logging.WARNING, logger="txformer.prediction"):
        probabilities, report = run_predict(model_dir, write_csv(tmp_path / "t.csv", lines), tmp_path / "p.csv")
    assert probabilities[1] == probabilities[2] != probabilities[3]
    assert report["unknown_code_share"] == {"mcc_code": 2 / 6, "tr_type": 2 / 6, "term_id": 2 / 6}
    assert "in the vocabulary" not in caplog.text

    recoded = [event_line(customer, 100 * step, mcc=100 + step) for customer in (1, 2) for step in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="txformer.prediction"):
        _, report = run_predict(model_dir, write_csv(tmp_path / "recoded.csv", recoded), tmp_path / "p2.csv")
    assert report["unknown_code_share"]["mcc_code"] == 1.0
    assert "No mcc_code code of" in caplog.text and "coded as in training" in caplog.text


def test_customers_without_transactions_get_the_prior_and_are_listed(model_dir, tmp_path, caplog):
    transactions = write_csv(tmp_path / "t.csv", [event_line(1, 60), event_line(2, 120)])
    wanted = write_csv(tmp_path / "ids.csv", ["2,0.5", "77,0.5", "1,0.5", "78,0.5"], header="customer_id,probability")
    with caplog.at_level(logging.WARNING, logger="txformer.prediction"):
        probabilities, report = run_predict(model_dir, transactions, tmp_path / "p.csv", customer_ids=wanted)
    assert list(probabilities) == [2, 77, 1, 78]  # the order of the id file
    assert probabilities[77] == probabilities[78] == LABEL_PRIOR
    assert report["customers_without_transactions"] == [77, 78]
    assert report["default_probability"] == LABEL_PRIOR and report["num_scored"] == 2
    assert "2 customers have no transactions" in caplog.text

    nobody = write_csv(tmp_path / "nobody.csv", ["77", "78"], header="customer_id")
    with pytest.raises(TransactionDataError, match="no transactions left for the requested customers"):
        run_predict(model_dir, transactions, tmp_path / "p2.csv", customer_ids=nobody)


def test_one_event_and_one_hundred_thousand_event_customers(model_dir, tmp_path):
    """The long history is cut to the training window: it scores as its last `max_length` events alone."""
    rng = np.random.default_rng(1)
    seconds = np.arange(100_000) * 394  # ~456 days, strictly increasing
    mcc = rng.choice([5411, 6011, 4814], size=seconds.size)
    heavy = [event_line(2, int(second), mcc=int(code)) for second, code in zip(seconds, mcc, strict=True)]
    lines = [event_line(1, 3600), *rng.permutation(heavy)]
    probabilities, report = run_predict(model_dir, write_csv(tmp_path / "t.csv", lines), tmp_path / "p.csv")
    assert report["max_length"] == MAX_LENGTH and report["num_scored"] == 2
    assert all(0 < probability < 1 for probability in probabilities.values())
    window = heavy[-MAX_LENGTH:]
    alone, _ = run_predict(model_dir, write_csv(tmp_path / "window.csv", window[::-1]), tmp_path / "window_p.csv")
    assert abs(alone[2] - probabilities[2]) <= 2e-6
    other_window = heavy[-MAX_LENGTH - 1 : -1]
    shifted, _ = run_predict(model_dir, write_csv(tmp_path / "other.csv", other_window), tmp_path / "other_p.csv")
    assert shifted[2] != probabilities[2]


def test_an_amount_beyond_float32_stops_prediction_before_anything_is_written(model_dir, tmp_path):
    """Such an amount used to be scored as NaN probabilities, with exit status 0."""
    lines = [event_line(1, 60), event_line(2, 60), "2,0 00:02:00,5411,1010,1e39,A"]
    with pytest.raises(TransactionDataError, match=r"t.csv line 4: amount 1e\+39 is beyond"):
        run_predict(model_dir, write_csv(tmp_path / "t.csv", lines), tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("missing", [VOCABULARY_FILE, PREPROCESSING_FILE])
def test_a_model_folder_missing_its_vocabulary_or_preprocessing_is_refused_by_name(model_dir, tmp_path, missing):
    folder = tmp_path / "incomplete"
    folder.mkdir()
    for path in model_dir.iterdir():
        if path.name != missing:
            (folder / path.name).write_bytes(path.read_bytes())
    transactions = write_csv(tmp_path / "t.csv", [event_line(1, 60)])
    with pytest.raises(FileNotFoundError, match=missing):
        run_predict(folder, transactions, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_a_vocabulary_of_another_run_is_refused(model_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    other = json.loads((folder / VOCABULARY_FILE).read_text())
    other["categorical_fields"][0]["codes"].append(9999)  # one more known code: every later index shifts
    (folder / VOCABULARY_FILE).write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not match the model's config.json.*different training runs"):
        run_predict(folder, write_csv(tmp_path / "t.csv", [event_line(1, 60)]), tmp_path / "p.csv")


@pytest.mark.parametrize(
    ("lines", "header", "message"),
    [
        (["1", "2", "1"], "customer_id", "ids.csv line 4: customer_id 1 appears more than once"),
        (["1", "abc"], "customer_id", "ids.csv line 3: customer_id 'abc' is not a number"),
        (["1,0.5", "2"], "customer_id,probability", "ids.csv line 3: expected 2 fields"),
        (["1,0.5", ",0.5"], "customer_id,probability", "ids.csv line 3: customer_id is missing"),
        ([], "customer_id", "ids.csv: the file has a header but no customer ids"),
        (["1"], "id", r"ids.csv line 1: missing column\(s\) \['customer_id'\]"),
    ],
)
def test_a_bad_customer_id_file_names_the_line_before_any_scoring(model_dir, tmp_path, lines, header, message):
    ids = write_csv(tmp_path / "ids.csv", lines, header=header)
    with pytest.raises(TransactionDataError, match=message):
        read_customer_ids(ids)
    # In `predict` the ids are read first: a folder whose weights are gone still fails on the ids.
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for name in (VOCABULARY_FILE, PREPROCESSING_FILE):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    transactions = write_csv(tmp_path / "t.csv", [event_line(1, 60)])
    with pytest.raises(TransactionDataError, match=message):
        run_predict(folder, transactions, tmp_path / "p.csv", customer_ids=ids)


class OpensAFileWhenUnpickled:
    """A booby-trapped pickle: loading it runs `open(marker, "w")`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_prediction_never_unpickles_and_takes_only_safetensors_weights(model_dir, tmp_path):
    """Pickles that run code when loaded, under the names transformers and the Trainer use, are never opened; a folder
    whose only weights are pickled is refused."""
    folder = tmp_path / "trapped"
    folder.mkdir()
    for path in model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
        (folder / name).write_bytes(pickle.dumps(OpensAFileWhenUnpickled(marker)))
    transactions = write_csv(tmp_path / "t.csv", [event_line(1, 60), event_line(2, 120)])
    probabilities, _ = run_predict(folder, transactions, tmp_path / "p.csv")
    assert len(probabilities) == 2 and not marker.exists()

    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        run_predict(folder, transactions, tmp_path / "p2.csv")
    assert not marker.exists()
