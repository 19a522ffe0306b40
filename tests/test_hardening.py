"""Second round of bad input: values that were read into silent wrong answers (amounts beyond float32, ids that
differ only by leading zeros), messages that named no line or the wrong one, one-line command-line errors, config
overrides and the permissions of atomically written files (docs/reliability.md lists each case)."""

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_bad_input import HEADER, write_csv
from transformers import AutoModelForSequenceClassification, HfArgumentParser, TrainingArguments

from benchmarks.compare import CompareConfig
from txformer import TxFormerForSequenceClassification
from txformer.cli import ConfigOverrideError, is_expected_failure, parse_config_overrides, run_cli
from txformer.data import (
    TransactionCollator,
    TransactionDataError,
    build_customer_dataset,
    read_customer_ids,
    read_labels,
    read_transactions,
)
from txformer.data.collator import MAX_NUMERIC_MAGNITUDE
from txformer.io_utils import atomic_write, atomic_write_json


REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD_ROW = "1,0 10:00:00,5411,1010,-1.5,A"
FIELDS = dict(categorical_fields=["mcc_code", "tr_type", "term_id"], numeric_fields=["amount"])


def transactions_with(tmp_path, line: str, name: str = "t.csv") -> Path:
    """A transactions file whose line 3 is `line` (line 2 is a good row)."""
    return write_csv(tmp_path / name, [GOOD_ROW, line])


# Amounts beyond the float32 range the model computes in.


@pytest.mark.parametrize("amount", ["1e39", "-1e308", "3.5e38"])
def test_amounts_beyond_float32_are_refused_with_their_line(tmp_path, amount):
    path = transactions_with(tmp_path, f"1,1 10:00:00,5411,1010,{amount},A")
    with pytest.raises(TransactionDataError, match=r"t.csv line 3: amount .* is beyond ±3.40282e\+38, the float32"):
        build_customer_dataset(path)


def feature(customer_id: int, amount: float, event_time: float = 100.0) -> dict:
    return {
        "customer_id": customer_id,
        "event_time": [event_time - 1, event_time],
        "mcc_code": [2, 3],
        "tr_type": [2, 2],
        "term_id": [3, 4],
        "amount": [-12.5, amount],
    }


def test_the_amount_bound_is_where_the_model_stops_being_finite():
    """At the largest float32 the model's outputs are finite; beyond, an amount becomes infinite in float32 and the
    outputs NaN, so the collator refuses anything larger than the largest float32, naming the customer."""
    collator = TransactionCollator(**FIELDS)
    config = tiny_config(categorical_vocab_sizes=[5, 5, 5])
    torch.manual_seed(0)
    model = TxFormerForSequenceClassification(config).eval()
    batch = collator([feature(1, MAX_NUMERIC_MAGNITUDE), feature(2, -MAX_NUMERIC_MAGNITUDE)])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    with torch.no_grad():
        batch["numeric_values"][0, 1, 0] = torch.tensor(1e39, dtype=torch.float64).float()
        assert torch.isnan(model(**batch).logits[0]).all()
    beyond = float(np.nextafter(MAX_NUMERIC_MAGNITUDE, np.inf))
    with pytest.raises(ValueError, match=r"Customer 7: numeric value 1e\+39 is beyond ±3.40282e\+38"):
        collator([feature(1, 5.0), feature(7, 1e39)])
    with pytest.raises(ValueError, match="Customer 8: numeric value .* is beyond"):
        collator([feature(8, -beyond)])
    with pytest.raises(ValueError, match=r"Customer 9: event_time 1e\+39 is beyond"):
        collator([feature(9, 5.0, event_time=1e39)])


# Ids that differ only by how they are written.


def test_two_spellings_of_one_transaction_id_are_refused_naming_both_lines(tmp_path):
    path = write_csv(
        tmp_path / "t.csv",
        [
            GOOD_ROW,
            "073598595,0 10:00:00,5411,1010,-1.5,A",
            "2,0 10:00:00,5411,1010,-1.5,A",
            "73598595,1 10:00:00,1,1,2,B",
        ],
    )
    message = r"t.csv line 3: customer_id '073598595' and line 5: '73598595' are the same integer 73598595"
    with pytest.raises(TransactionDataError, match=message):
        read_transactions(path)


@pytest.mark.parametrize("reader", [read_labels, read_customer_ids])
def test_two_spellings_of_one_label_or_requested_id_are_refused_naming_both_lines(tmp_path, reader):
    path = write_csv(tmp_path / "ids.csv", ["5,1", "0005,0", "6,1"], header="customer_id,gender")
    with pytest.raises(TransactionDataError, match=r"ids.csv line 2: customer_id '5' and line 3: '0005' are the same"):
        reader(path)


def test_leading_zeros_alone_are_read_as_integers_with_a_warning(tmp_path, caplog):
    path = write_csv(tmp_path / "t.csv", ["0042,0 10:00:00,5411,1010,-1.5,A", " 7 ,0 10:00:00,5411,1010,-1.5,A"])
    with caplog.at_level(logging.WARNING, logger="txformer.data.reader"):
        assert read_transactions(path).column("customer_id").to_pylist() == [42, 7]
    assert "1 customer ids are written with leading zeros (e.g. '0042')" in caplog.text


@pytest.mark.parametrize("reader", [read_transactions, read_labels, read_customer_ids])
def test_an_id_beyond_64_bits_names_its_line(tmp_path, reader):
    lines = {
        read_transactions: [GOOD_ROW, "12345678901234567890,0 10:00:00,5411,1010,-1.5,A"],
        read_labels: ["1,0", "12345678901234567890,1"],
        read_customer_ids: ["1,0", "12345678901234567890,1"],
    }[reader]
    header = HEADER if reader is read_transactions else "customer_id,gender"
    path = write_csv(tmp_path / "f.csv", lines, header=header)
    with pytest.raises(TransactionDataError, match="f.csv line 3: customer_id '12345678901234567890' does not fit"):
        reader(path)
    largest = write_csv(tmp_path / "largest.csv", ["9223372036854775807,1", "-3,0"], header="customer_id,gender")
    assert read_labels(largest).column("customer_id").to_pylist() == [9223372036854775807, -3]


# Messages that named no line, the wrong line or the wrong problem.


def test_a_twenty_digit_day_index_names_its_line(tmp_path):
    path = transactions_with(tmp_path, "1,12345678901234567890 10:00:00,5411,1010,-1.5,A")
    with pytest.raises(TransactionDataError, match="t.csv line 3: tr_datetime '12345678901234567890 10:00:00' has a"):
        read_transactions(path)
    assert read_transactions(transactions_with(tmp_path, "1,999999999 10:00:00,1,1,1,A")).num_rows == 2


def test_header_names_with_spaces_around_them_are_read(tmp_path):
    header = " customer_id , tr_datetime,mcc_code ,tr_type,amount,term_id "
    path = write_csv(tmp_path / "t.csv", [GOOD_ROW, "2,1 10:00:00,6011,1030,7.0,B"], header=header)
    table = read_transactions(path)
    assert table.column("mcc_code").to_pylist() == [5411, 6011] and table.column("customer_id").to_pylist() == [1, 2]
    labels = write_csv(tmp_path / "g.csv", ["1,0", "2,1"], header="customer_id , gender")
    assert read_labels(labels).column("labels").to_pylist() == [0, 1]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("5411.0", r"line 3: mcc_code '5411.0' is not an integer"),
        ("+5411", r"line 3: mcc_code '\+5411' is not an integer"),
        ("99999999999999999999", r"line 3: mcc_code '99999999999999999999' does not fit in a 64-bit integer"),
        ("54x1", r"line 3: mcc_code '54x1' is not a number"),
    ],
)
def test_a_code_that_is_not_an_integer_is_quoted_as_written(tmp_path, code, message):
    path = transactions_with(tmp_path, f"1,1 10:00:00,{code},1010,-1.5,A")
    with pytest.raises(TransactionDataError, match=message):
        read_transactions(path)


def test_a_quoted_newline_keeps_the_line_numbers_of_later_rows(tmp_path):
    quoted = '1,0 11:00:00,5411,1010,-1.5,"RU\n12"'
    path = write_csv(tmp_path / "t.csv", [GOOD_ROW, quoted, "", "1,0 12:00:00,abc,1010,-1.5,A"])
    with pytest.raises(TransactionDataError, match="t.csv line 6: mcc_code 'abc' is not a number"):
        read_transactions(path)
    path = write_csv(tmp_path / "t.csv", [GOOD_ROW, quoted, "1,0 12:00:00,5411,1010"])
    with pytest.raises(TransactionDataError, match="t.csv line 5: expected 6 fields"):
        read_transactions(path)
    path = write_csv(tmp_path / "t.csv", [GOOD_ROW, quoted, "1,0 12:00:00,5411,1010,inf,A"])
    with pytest.raises(TransactionDataError, match="t.csv line 5: amount is not finite"):
        read_transactions(path)
    path = write_csv(tmp_path / "t.csv", [GOOD_ROW, quoted])
    assert read_transactions(path).column("term_id").to_pylist() == ["A", "RU\n12"]


# One-line command-line errors.


def raise_data_error():
    read_transactions(Path(__file__))  # this file is no transactions file


def load_a_folder_without_weights():
    with tempfile.TemporaryDirectory() as folder:
        tiny_config().save_pretrained(folder)
        AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)


def parse_conflicting_trainer_flags():
    flags = ["--output_dir", "x", "--load_best_model_at_end", "--eval_strategy", "steps", "--save_strategy", "epoch"]
    HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (raise_data_error, True),
        (lambda: TransactionCollator(**FIELDS, max_length=0), True),  # txformer's own checks
        (lambda: tiny_config(attention_type="linear"), True),
        (lambda: CompareConfig(families=["order"]).specs(), True),  # the benchmarks' own checks, next to txformer
        (parse_conflicting_trainer_flags, True),  # the Trainer's own check of its flags
        (lambda: open("/nonexistent/folder/file.csv"), True),  # an OS error about a named path
        (load_a_folder_without_weights, True),  # transformers' error for a folder it cannot load
        (lambda: np.zeros(2).reshape(3), False),  # a ValueError inside numpy: a bug
        (lambda: torch.zeros(2) + torch.zeros(3), False),
        (lambda: {}["key"], False),
    ],
)
def test_expected_failures_are_told_from_bugs(failure, expected):
    with pytest.raises(Exception) as caught:
        failure()
    assert is_expected_failure(caught.value) is expected


def test_run_cli_prints_one_line_for_an_expected_failure_and_the_traceback_of_a_bug(monkeypatch, capsys):
    monkeypatch.delenv("TXFORMER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", "x"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(raise_data_error)
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {Path(__file__)} line 1: missing column(s)")
    with pytest.raises(RuntimeError):
        run_cli(lambda: torch.zeros(2) + torch.zeros(3))


def test_run_cli_flushes_subnormal_numbers():
    """Scripts run with subnormal numbers flushed to zero (products that underflow into them are many times slower)."""
    subnormal = torch.tensor([1e-39])
    assert subnormal.item() != 0
    run_cli(lambda: None)
    assert (subnormal * 1.0).item() == 0


@pytest.mark.parametrize(
    ("argv", "environment", "left"),
    [
        (["predict.py", "--debug", "--model_dir", "m"], "", ["predict.py", "--model_dir", "m"]),
        (["predict.py", "--model_dir", "m", "--debug"], "", ["predict.py", "--model_dir", "m"]),
        (["train.py", "--model_dir", "m"], "1", ["train.py", "--model_dir", "m"]),
    ],
)
def test_debug_shows_the_traceback(monkeypatch, argv, environment, left):
    monkeypatch.setenv("TXFORMER_DEBUG", environment)
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(TransactionDataError):
        run_cli(raise_data_error)
    assert sys.argv == left


def test_the_trainer_debug_option_is_left_to_the_trainer(monkeypatch):
    monkeypatch.setenv("TXFORMER_DEBUG", "0")
    argv = ["train.py", "--debug", "underflow_overflow", "--max_steps", "1"]
    monkeypatch.setattr(sys, "argv", list(argv))
    seen = []
    run_cli(lambda: seen.append(list(sys.argv)))
    assert seen == [argv]


@pytest.mark.parametrize("debug", [False, True])
def test_a_script_failing_on_bad_data_ends_with_one_line_or_with_the_traceback_in_debug(tmp_path, debug):
    """scripts/train.py on a broken file: it fails in the reader, before any model is built."""
    transactions = write_csv(tmp_path / "t.csv", [GOOD_ROW, "1,0 11:00:00,5411.0,1010,-1.5,A"])
    labels = write_csv(tmp_path / "g.csv", ["1,0"], header="customer_id,gender")
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "TXFORMER_DEBUG": "1" if debug else "0",
    }
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--transactions", str(transactions)]
    command += ["--labels", str(labels), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    message = f"{transactions} line 3: mcc_code '5411.0' is not an integer"
    if debug:
        assert "Traceback (most recent call last)" in result.stderr and message in result.stderr
    else:
        assert "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"error: {message}")


# Config overrides.


def test_config_overrides_are_typed_by_the_config_fields():
    overrides = parse_config_overrides(
        "hidden_size=128, attention_type=performer,classifier_dropout=none,time_periods_days=[1,7.5],"
        "ltm_gating=false,layer_norm_eps=1e-6,",
        tiny_config(),
    )
    assert overrides == {
        "hidden_size": 128,
        "attention_type": "performer",
        "classifier_dropout": None,
        "time_periods_days": [1.0, 7.5],
        "ltm_gating": False,
        "layer_norm_eps": 1e-6,
    }
    assert isinstance(overrides["hidden_size"], int) and isinstance(overrides["time_periods_days"][0], float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hidden_size=abc", r"hidden_size='abc': expected an integer"),
        ("hidden_size=1.5", r"hidden_size='1.5': expected an integer"),
        ("layer_norm_eps=nan", r"layer_norm_eps='nan': expected a finite number"),
        ("ltm_gating=maybe", r"ltm_gating='maybe': expected true or false"),
        ("classifier_dropout=high", r"classifier_dropout='high': expected none or a finite number"),
        ("time_periods_days=7", r"time_periods_days='7': expected none or a list in brackets"),
        ("hiden_size=16", r"'hiden_size' is not a field of TxFormerConfig; did you mean 'hidden_size'\?"),
        ("hidden_size", r"'hidden_size' is not key=value"),
        ("hidden_size=16,hidden_size=32", r"'hidden_size' is given twice"),
    ],
)
def test_a_bad_config_override_names_the_key_and_the_expected_type(text, message):
    config = tiny_config()
    with pytest.raises(ConfigOverrideError, match=message):
        parse_config_overrides(text, config)
    assert config.hidden_size == 16


# Permissions of atomically written files.


def test_atomic_writes_keep_the_umask_and_the_mode_of_the_file_they_replace(tmp_path):
    previous = os.umask(0o022)
    try:
        written = atomic_write_json(tmp_path / "all_results.json", {"eval_auroc": 0.5})
        assert written.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write(tmp_path / "private.csv", lambda file: file.write("x")).stat().st_mode & 0o777 == 0o600
        written.chmod(0o640)
        atomic_write_json(written, {"eval_auroc": 0.7})
        assert written.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["all_results.json", "private.csv"]
