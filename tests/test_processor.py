"""TxFormerProcessor: raw rows give exactly the inputs of the training path (reader, vocabulary, collator), bad rows
are named, it saves and loads with the Auto classes, folders of the older layout still load, and the remote-code
files import only what remote code may."""

import ast
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoProcessor

from txformer import TxFormerProcessor
from txformer.data import EventVocabulary, TransactionCollator, build_customer_dataset, generate_synthetic_data
from txformer.pipeline_txformer import read_csv_rows
from txformer.prediction import PREPROCESSING_FILE, load_processor, upgrade_model_folder


REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER = "customer_id,tr_datetime,mcc_code,tr_type,amount,term_id"
MAX_LENGTH = 16
# Every quirk the reader handles: shuffled and split customers, ties in time (file order), seconds = 60, the
# spellings of a missing terminal, spaces around a terminal, codes unseen in training.
QUIRKS = [
    "5,3 10:00:00,5411,1010,-5.5,A",
    "5,1 10:00:60,6011,1030,100,",
    "9,2 23:00:00,5411,1010,-7,nan",
    "5,3 10:00:00,4814,1010,-1.25, B ",
    "9,2 23:00:00,7777,2020,1e6,NULL",
    "9,0 00:00:00,5411,1010,-0.5,ZZ",
    "5,3 09:59:59,6011,1030,3,N/A",
    "9,2 22:00:00,5411,1010,2.5,   ",
]


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


def training_path_batch(transactions: Path, vocabulary: EventVocabulary, max_length: int | None) -> dict:
    """What training and `scripts/predict.py` feed the model: pyarrow reader, vectorised encoding, collator."""
    encoded = vocabulary.encode(build_customer_dataset(transactions))
    collator = TransactionCollator(vocabulary.categorical_fields, vocabulary.numeric_fields, max_length=max_length)
    return {**collator([encoded[row] for row in range(len(encoded))]), "customer_id": encoded["customer_id"]}


def assert_same_batch(batch, expected) -> None:
    assert set(batch) == set(expected)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(batch[name], value), name
        else:
            assert list(batch[name]) == list(value), name


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_data(folder, num_customers=40, seed=0)
    return folder / "transactions.csv"


@pytest.fixture(scope="module")
def vocabulary(synthetic_csv) -> EventVocabulary:
    # A small vocabulary, so that unknown codes occur.
    return EventVocabulary.fit(build_customer_dataset(synthetic_csv), min_count=3, max_size={"term_id": 25})


@pytest.mark.parametrize("max_length", [MAX_LENGTH, None])
def test_raw_rows_give_the_inputs_of_the_training_path(synthetic_csv, vocabulary, max_length):
    processor = vocabulary.to_processor(max_length=max_length, label_prior=0.4)
    expected = training_path_batch(synthetic_csv, vocabulary, max_length)
    rows, line_numbers = read_csv_rows(synthetic_csv)
    assert (expected["input_ids"] == 1).any()  # unknown codes are in play
    batch = processor(rows, return_customer_ids=True, source=str(synthetic_csv), line_numbers=line_numbers)
    assert_same_batch(batch, expected)


def test_quirks_parsed_rows_columns_and_dataframes_give_the_same_inputs(tmp_path, synthetic_csv, vocabulary):
    processor = vocabulary.to_processor(max_length=3, label_prior=0.4)
    transactions = write_csv(tmp_path / "quirks.csv", QUIRKS)
    expected = training_path_batch(transactions, vocabulary, 3)
    rows, _ = read_csv_rows(transactions)
    assert_same_batch(processor(rows, return_customer_ids=True), expected)
    assert expected["customer_id"] == [5, 9]
    assert expected["input_ids"][:, :, 2].tolist() == [[2, 1, 1], [2, 2, 2]]  # missing terminal = 2, unseen = 1

    frame = pd.read_csv(transactions, dtype={"term_id": str})  # pandas: ints, floats and NaN for missing terminals
    assert_same_batch(processor(frame, return_customer_ids=True), expected)
    columns = {name: frame[name].tolist() for name in frame.columns}
    assert_same_batch(processor(columns, return_customer_ids=True), expected)
    # Times already in days (the reader's `event_time`) instead of `tr_datetime`.
    customers = build_customer_dataset(transactions)
    parsed = [
        {
            "customer_id": customer["customer_id"],
            **{name: customer[name][event] for name in columns if name != "tr_datetime" and name != "customer_id"},
            "event_time": customer["event_time"][event],
        }
        for customer in customers
        for event in range(len(customer["event_time"]))
    ]
    assert_same_batch(processor(parsed, return_customer_ids=True), expected)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"tr_datetime": "2021-01-01 10:00:00"},
            r"transactions\[1\]: tr_datetime '2021-01-01 10:00:00' is not 'D HH:MM:SS'",
        ),
        ({"tr_datetime": "3 25:00:00"}, "out of range"),
        ({"mcc_code": "5411.0"}, r"transactions\[1\]: mcc_code '5411.0' is not a number"),
        ({"mcc_code": 5411.5}, "mcc_code 5411.5 is not an integer"),
        ({"amount": ""}, r"transactions\[1\]: amount is missing"),
        ({"amount": "inf"}, "amount is not finite"),
        ({"amount": float("nan")}, "amount is missing"),
        ({"term_id": 22915}, "term_id 22915 is a int, not a string.*leading zeros"),
        ({"customer_id": "07"}, r"customer_id '07' and '7' \(transactions\[0\]\) are the same number"),
        ({"tr_type": None}, "tr_type is missing"),
        ({"customer_id": "+7"}, r"customer_id '\+7' is not a number"),
    ],
)
def test_bad_rows_are_named(vocabulary, row, message):
    processor = vocabulary.to_processor(max_length=MAX_LENGTH, label_prior=0.4)
    good = {"customer_id": "7", "tr_datetime": "3 10:00:00", "mcc_code": "5411", "tr_type": "1010", "amount": "-1"}
    good["term_id"] = "A"
    with pytest.raises(ValueError, match=message):
        processor([good, {**good, **row}])


def test_missing_column_amounts_beyond_float32_and_bad_containers(vocabulary):
    processor = vocabulary.to_processor(max_length=MAX_LENGTH, label_prior=0.4)
    row = {"customer_id": 7, "tr_datetime": "3 10:00:00", "mcc_code": 5411, "tr_type": 1010, "amount": -1.0}
    with pytest.raises(ValueError, match=r"transactions\[0\]: no column 'term_id'"):
        processor([row])
    with pytest.raises(
        ValueError, match=r"Customer 7: numeric value 1e\+39 is beyond ±3.40282e\+38, the float32 range"
    ):
        processor([{**row, "term_id": None, "amount": 1e39}])
    with pytest.raises(ValueError, match="not a dict"):
        processor([("7", "3 10:00:00")])
    with pytest.raises(ValueError, match="different lengths"):
        processor({"customer_id": [1, 2], "amount": [1.0]})


def test_csv_errors_name_the_file_and_line(tmp_path, vocabulary):
    processor = vocabulary.to_processor(max_length=MAX_LENGTH, label_prior=0.4)
    transactions = write_csv(tmp_path / "t.csv", [QUIRKS[0], "", "5,4 10:00:00,abc,1010,-1,A"])
    rows, line_numbers = read_csv_rows(transactions)
    with pytest.raises(ValueError, match=r"t.csv line 4: mcc_code 'abc' is not a number"):
        processor(rows, source=str(transactions), line_numbers=line_numbers)
    with pytest.raises(ValueError, match=r"t.csv line 3: expected 6 fields"):
        read_csv_rows(write_csv(tmp_path / "short.csv", [QUIRKS[0], "5,4 10:00:00,5411"]))


def test_save_and_load_with_the_auto_classes(tmp_path, vocabulary):
    processor = vocabulary.to_processor(max_length=MAX_LENGTH, label_prior=0.4)
    processor.save_pretrained(tmp_path)
    AutoConfig.for_model("txformer").save_pretrained(tmp_path)  # a model folder: the Auto classes read its type
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {
        "AutoFeatureExtractor": "processing_txformer.TxFormerProcessor",
        "AutoProcessor": "processing_txformer.TxFormerProcessor",
    }
    assert saved["event_vocabulary"] == vocabulary.to_dict()
    assert (saved["max_length"], saved["label_prior"]) == (MAX_LENGTH, 0.4)
    assert not any(key.startswith("_") for key in saved)
    assert {"processing_txformer.py", "pipeline_txformer.py"} <= {path.name for path in tmp_path.glob("*.py")}
    for auto_class in (AutoProcessor, AutoFeatureExtractor):
        loaded = auto_class.from_pretrained(tmp_path)
        assert type(loaded) is TxFormerProcessor
        assert loaded.to_dict() == processor.to_dict()
    assert EventVocabulary.from_pretrained(tmp_path).to_dict() == vocabulary.to_dict()
    assert EventVocabulary.from_processor(processor).to_dict() == vocabulary.to_dict()


def test_invalid_settings_are_refused(vocabulary):
    with pytest.raises(ValueError, match="needs the event_vocabulary"):
        TxFormerProcessor()
    with pytest.raises(ValueError, match="max_length"):
        vocabulary.to_processor(max_length=0, label_prior=0.4)
    with pytest.raises(ValueError, match="label_prior"):
        vocabulary.to_processor(max_length=None, label_prior=1.5)
    with pytest.raises(ValueError, match="format_version"):
        TxFormerProcessor(event_vocabulary={**vocabulary.to_dict(), "format_version": 99})


def test_folders_of_the_older_layout_load_and_upgrade(tmp_path, vocabulary):
    vocabulary.save_pretrained(tmp_path)
    (tmp_path / PREPROCESSING_FILE).write_text(json.dumps({"max_length": MAX_LENGTH, "label_prior": 0.4}))
    AutoConfig.for_model("txformer", architectures=["TxFormerForSequenceClassification"]).save_pretrained(tmp_path)
    processor = load_processor(str(tmp_path))
    assert processor.to_dict() == vocabulary.to_processor(max_length=MAX_LENGTH, label_prior=0.4).to_dict()
    assert not (tmp_path / "preprocessor_config.json").exists()

    upgrade_model_folder(tmp_path)
    upgraded = TxFormerProcessor.from_pretrained(tmp_path).to_dict()
    assert upgraded.pop("auto_map") and upgraded == processor.to_dict()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"]["transaction-classification"]["impl"] == (
        "pipeline_txformer.TransactionClassificationPipeline"
    )
    assert (tmp_path / "pipeline_txformer.py").is_file()
    # A pretraining folder is no classifier: it gets the processor but no pipeline entry.
    pretraining = tmp_path / "pretraining"
    AutoConfig.for_model("txformer", architectures=["TxFormerForMaskedEventModeling"]).save_pretrained(pretraining)
    processor.save_pretrained(pretraining)
    upgrade_model_folder(pretraining)
    assert "custom_pipelines" not in json.loads((pretraining / "config.json").read_text())

    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / PREPROCESSING_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing, and so is preprocessing.json"):
        load_processor(str(tmp_path))


REMOTE_CODE_FILES = [
    "configuration_txformer.py",
    "modeling_txformer.py",
    "processing_txformer.py",
    "pipeline_txformer.py",
]
ALLOWED_TOP_LEVEL = {"torch", "transformers"}


@pytest.mark.parametrize(
    "name", [*REMOTE_CODE_FILES, *(path.name for path in (REPO_ROOT / "txformer").glob("attention_*.py"))]
)
def test_remote_code_files_import_only_the_standard_library_torch_and_transformers(name):
    tree = ast.parse((REPO_ROOT / "txformer" / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported - ALLOWED_TOP_LEVEL - set(sys.stdlib_module_names) == set()
