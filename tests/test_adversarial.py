"""The command lines against adversarial input, as a new user would give it: broken data files, flags and model
folders for `scripts/train.py`, `predict.py`, `prepare_data.py`, `baseline.py`, `embed.py` and `pretrain.py`. Each
case ends with one line `error: <file> line <n>: <what>` (or naming the flag or folder) on stderr and exit status 1,
through `run_cli` as the scripts run; a flag value outside its choices gets argparse's usage error and status 2.
Quirks that the reader handles read as the clean file. docs/reliability.md tabulates every case."""

import bz2
import gzip
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_bad_input import HEADER, TRAINING_ROWS, save_model_folder, write_csv

from txformer import baseline, embedding, prediction, pretraining, training
from txformer.cli import run_cli
from txformer.data import prepare, read_labels, read_transactions


COMMANDS = {
    "train": training.main,
    "predict": prediction.main,
    "prepare_data": prepare.main,
    "baseline": baseline.main,
    "embed": embedding.main,
    "pretrain": pretraining.main,
}
LABEL_HEADER = "customer_id,gender"
LABELS = [f"{customer},{customer % 2}" for customer in range(1, 7)]
# A path that no process can create, not even as root (so that the check holds in containers that run as root).
UNWRITABLE = Path("/proc/txformer-unwritable")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good transactions and labels, and model folders: whole, and damaged in each way a user meets."""
    root = tmp_path_factory.mktemp("adversarial")
    good = save_model_folder(root / "model")
    folders = {}
    for damage in ("truncated_weights", "no_config", "bert_config", "broken_config", "no_processor"):
        folder = folders[damage] = root / damage
        folder.mkdir()
        for path in good.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    os.truncate(folders["truncated_weights"] / "model.safetensors", 1000)
    (folders["no_config"] / "config.json").unlink()
    (folders["bert_config"] / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folders["broken_config"] / "config.json").write_text('{"model_type": "txformer",')
    (folders["no_processor"] / "preprocessor_config.json").unlink()
    a_file = root / "a_file"
    a_file.write_text("")
    return {
        "root": root,
        "transactions": write_csv(root / "t.csv", TRAINING_ROWS),
        "labels": write_csv(root / "g.csv", LABELS, header=LABEL_HEADER),
        "model": good,
        "a_file": a_file,
        **folders,
    }


def run_command(command: str, argv: list, monkeypatch, capsys) -> tuple[int, list[str]]:
    """Runs a script's `main` as its command line does (`run_cli`); returns the exit status and the lines of stderr.
    An exception that `run_cli` lets through (a bug) fails the test with its traceback."""
    monkeypatch.setenv("TXFORMER_DEBUG", "0")
    monkeypatch.setattr(sys, "argv", [f"{command}.py", *map(str, argv)])
    try:
        run_cli(COMMANDS[command])
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    return status, capsys.readouterr().err.splitlines()


def assert_one_error_line(status: int, stderr: list[str], message: str) -> None:
    """Exit status 1 and, last on stderr, one `error: ` line matching `message` (no traceback)."""
    assert status == 1, stderr
    assert not any("Traceback" in line for line in stderr)
    assert stderr[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in stderr) == 1
    assert message in stderr[-1]


def command_line(command: str, files: dict, transactions, labels=None, output=None) -> list:
    """The arguments of `command` on the given files, into a fresh output below the test folder."""
    labels = files["labels"] if labels is None else labels
    output = output or files["root"] / f"out-{command}-{Path(str(transactions)).name}"
    return {
        "train": ["--transactions", transactions, "--labels", labels, "--output_dir", output, "--report_to", "none"],
        "predict": [
            "--model",
            files["model"],
            "--transactions",
            transactions,
            "--output_file",
            Path(output) / "p.csv",
        ],
        "prepare_data": ["--transactions", transactions, "--labels", labels, "--data_cache_dir", output],
        "baseline": ["--transactions", transactions, "--labels", labels, "--output_dir", output],
        "embed": [
            "--model_dir",
            files["model"],
            "--transactions",
            transactions,
            "--output_file",
            Path(output) / "e.pq",
        ],
        "pretrain": ["--transactions", transactions, "--output_dir", output, "--report_to", "none"],
    }[command]


# Broken transaction files, through every command that reads them. Line 3 is the broken one (line 2 is good).
BROKEN_LINES = {
    "nan_amount": ("1,3 10:00:00,5411,1010,nan,A", "line 3: amount is missing"),
    "inf_amount": ("1,3 10:00:00,5411,1010,-inf,A", "line 3: amount is not finite"),
    "1e39_amount": ("1,3 10:00:00,5411,1010,1e39,A", "line 3: amount 1e+39 is beyond ±3.40282e+38"),
    "decimal_comma": ('1,3 10:00:00,5411,1010,"12,5",A', "line 3: amount '12,5' is not a number"),
    "negative_day": ("1,-3 10:00:00,5411,1010,1.0,A", "line 3: tr_datetime '-3 10:00:00' is not 'D HH:MM:SS'"),
    "huge_day": ("1,99999999999 10:00:00,5411,1010,1.0,A", "has a day index beyond 999,999,999"),
    "time_without_seconds": ("1,3 10:00,5411,1010,1.0,A", "line 3: tr_datetime '3 10:00' is not 'D HH:MM:SS'"),
    "hour_25": ("1,3 25:00:00,5411,1010,1.0,A", "line 3: tr_datetime '3 25:00:00' has an hour, minute or second"),
    "iso_time": ("1,2024-01-01 10:00:00,5411,1010,1.0,A", "tr_datetime '2024-01-01 10:00:00' is not 'D HH:MM:SS'"),
    "id_with_letters": ("a12,3 10:00:00,5411,1010,1.0,A", "line 3: customer_id 'a12' is not a number"),
    "id_with_inner_space": ("1 2,3 10:00:00,5411,1010,1.0,A", "line 3: customer_id '1 2' is not a number"),
    "id_of_20_digits": ("12345678901234567890,3 10:00:00,5411,1010,1.0,A", "does not fit in a 64-bit integer"),
    "mcc_with_decimals": ("1,3 10:00:00,5411.0,1010,1.0,A", "line 3: mcc_code '5411.0' is not an integer"),
    "extra_field": ("1,3 10:00:00,5411,1010,1.0,A,x", "line 3: expected 6 fields"),
    "missing_field": ("1,3 10:00:00,5411,1010", "line 3: expected 6 fields"),
    "unclosed_quote": ('1,3 10:00:00,5411,1010,1.0,"A', "line 3: a quote opened in term_id runs over the following"),
}
READING_COMMANDS = ["train", "predict", "prepare_data", "baseline", "embed", "pretrain"]


@pytest.mark.parametrize("command", READING_COMMANDS)
@pytest.mark.parametrize("case", list(BROKEN_LINES))
def test_a_broken_line_is_named_by_every_command(files, command, case, monkeypatch, capsys):
    line, message = BROKEN_LINES[case]
    transactions = write_csv(files["root"] / f"{case}.csv", [TRAINING_ROWS[0], line, *TRAINING_ROWS[1:]])
    status, stderr = run_command(command, command_line(command, files, transactions), monkeypatch, capsys)
    assert_one_error_line(status, stderr, f"{transactions} {message}" if message.startswith("line") else message)


def gzip_cut_short(path: Path) -> Path:
    data = gzip.compress("\n".join([HEADER, *TRAINING_ROWS * 50]).encode())
    path.write_bytes(data[: len(data) // 2])
    return path


BROKEN_FILES = {
    "empty": (lambda path: path.write_bytes(b"") and path, "the file is empty (no header line)"),
    "header_only": (lambda path: write_csv(path, []), "the file has a header but no transactions"),
    "semicolons": (
        lambda path: path.write_text("\n".join(line.replace(",", ";") for line in [HEADER, *TRAINING_ROWS])),
        "(separated by semicolons? files must be comma-separated)",
    ),
    "missing_column": (
        lambda path: write_csv(path, [row.rsplit(",", 1)[0] for row in TRAINING_ROWS], header=HEADER[:-8]),
        "line 1: missing column(s) ['term_id']",
    ),
    "duplicated_column": (
        lambda path: write_csv(path, [row + ",1" for row in TRAINING_ROWS], header=HEADER + ",amount"),
        "line 1: duplicated column names ['amount']",
    ),
    "not_utf8": (
        lambda path: path.write_bytes("\n".join([HEADER, *TRAINING_ROWS, "1,3 10:00:00,1,1,1,банк"]).encode("cp1251")),
        "line 26: not UTF-8 text",
    ),
    "binary": (lambda path: path.write_bytes(bytes(range(256)) * 4), "not UTF-8 text"),
    "gzip_cut_short": (gzip_cut_short, "cannot be decompressed"),
    "gzip_that_is_plain_text": (
        lambda path: path.write_text("\n".join([HEADER, *TRAINING_ROWS])),
        "cannot be decompressed (Not a gzipped file",
    ),
    "bz2_cut_short": (
        lambda path: path.write_bytes(bz2.compress("\n".join([HEADER, *TRAINING_ROWS * 50]).encode())[:200]),
        "cannot be decompressed",
    ),
    "a_folder": (lambda path: path.mkdir(), "no such file"),
    "missing": (lambda path: None, "no such file"),
}
SUFFIXES = {"gzip_cut_short": ".csv.gz", "gzip_that_is_plain_text": ".csv.gz", "bz2_cut_short": ".csv.bz2"}


@pytest.mark.parametrize("command", READING_COMMANDS)
@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_a_broken_file_is_named_by_every_command(files, command, case, monkeypatch, capsys):
    write, message = BROKEN_FILES[case]
    path = files["root"] / f"{case}-{command}{SUFFIXES.get(case, '.csv')}"
    write(path)
    status, stderr = run_command(command, command_line(command, files, path), monkeypatch, capsys)
    assert_one_error_line(status, stderr, message)
    assert str(path) in stderr[-1]


def parquet_file(path: Path, **columns) -> Path:
    table = {
        "customer_id": [1, 1, 2],
        "tr_datetime": ["0 10:00:00", "1 11:00:00", "0 12:00:00"],
        "mcc_code": [5411, 6011, 5411],
        "tr_type": [1010, 1030, 1010],
        "amount": [-1.5, 20.0, -3.0],
        "term_id": ["A", None, "B"],
    }
    pq.write_table(pa.table({**table, **columns}), path)
    return path


def test_a_parquet_file_of_the_wrong_types_names_its_row(files, monkeypatch, capsys):
    path = parquet_file(files["root"] / "wrong.parquet", mcc_code=[1.5, 2.0, 3.0])
    status, stderr = run_command("prepare_data", command_line("prepare_data", files, path), monkeypatch, capsys)
    assert_one_error_line(status, stderr, f"{path} line 2: mcc_code '1.5' is not an integer")


# Label files, through every command that reads them.
BROKEN_LABELS = {
    "label_2": ([*LABELS, "7,2"], "g.csv line 8: gender 2 is not 0 or 1"),
    "label_missing": ([*LABELS[:-1], "6,"], "g.csv line 7: gender is missing"),
    "label_as_text": ([*LABELS[:-1], "6,female"], "g.csv line 7: gender 'female' is not a number"),
    "conflicting_duplicate": ([*LABELS, "1,0"], "g.csv line 8: customer_id 1 appears more than once"),
    "same_id_spelled_twice": ([*LABELS, "0001,1"], "customer_id '1' and line 8: '0001' are the same integer"),
    "one_class": ([f"{customer},1" for customer in range(1, 7)], "Only one class ([1]) among 6 customers"),
    "no_match": (["100,0", "101,1"], "none of the 2 customers of"),
}


@pytest.mark.parametrize("command", ["train", "prepare_data", "baseline"])
@pytest.mark.parametrize("case", list(BROKEN_LABELS))
def test_a_broken_label_file_is_named(files, command, case, monkeypatch, capsys):
    lines, message = BROKEN_LABELS[case]
    folder = files["root"] / f"labels-{case}-{command}"
    folder.mkdir()
    labels = write_csv(folder / "g.csv", lines, header=LABEL_HEADER)
    argv = command_line(command, files, files["transactions"], labels=labels, output=folder / "out")
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    assert_one_error_line(status, stderr, message)


# Flags: refused before any data is read (the data file named here does not exist, so a check that came after the
# reading would report the missing file instead).
BAD_FLAGS = [
    ("train", ["--config_overrides", "hidden_size=abc"], "--config_overrides hidden_size='abc': expected an integer"),
    ("train", ["--config_overrides", "hiden_size=16"], "did you mean 'hidden_size'?"),
    ("train", ["--config_overrides", "hidden_size=15"], "hidden_size (15) is not a multiple of num_attention_heads"),
    ("pretrain", ["--config_overrides", "segment_length=0"], "segment_length"),
    ("train", ["--max_length", "-5"], "--max_length must be positive, or 0 for whole histories, got -5"),
    ("train", ["--eval_fraction", "1.5"], "--eval_fraction must be in (0, 1), got 1.5"),
    ("train", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size (0)"),
    ("train", ["--learning_rate", "nan"], "--learning_rate must be a finite number, 0 or more, got nan"),
    ("train", ["--num_train_epochs", "-1"], "--num_train_epochs must be a finite number, 0 or more, got -1.0"),
    ("train", ["--resume_from_checkpoint", "/nonexistent/checkpoint-9"], "is not a complete checkpoint"),
    ("pretrain", ["--labels", "g.csv"], "Pretraining uses no labels"),
    ("predict", ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    ("predict", ["--max_length", "-3"], "--max_length must be positive, or 0 for whole histories, got -3"),
    ("predict", ["--device", "tpu9"], "--device 'tpu9' is not a device name"),
    ("embed", ["--device", "cuda:7"], "--device cuda:7: this machine has no such device"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append(("train", ["--attn_implementation", "flex_attention"], "flex_attention trains on CUDA only"))


@pytest.mark.parametrize(("command", "flags", "message"), BAD_FLAGS, ids=lambda value: str(value)[:40])
def test_a_bad_flag_is_refused_before_the_data_is_read(files, command, flags, message, monkeypatch, capsys):
    argv = [*command_line(command, files, files["root"] / "not-read.csv"), *flags]
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    assert_one_error_line(status, stderr, message)


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("train", ["--attention_type", "linear"]),
        ("pretrain", ["--attention_type", "linear"]),
        ("pretrain", ["--objective", "mlm"]),
        ("embed", ["--embedding", "cls"]),
        ("baseline", ["--features", "everything"]),
    ],
)
def test_a_flag_value_outside_its_choices_is_a_usage_error(files, command, flags, monkeypatch, capsys):
    argv = [*command_line(command, files, files["root"] / "not-read.csv"), *flags]
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    assert status == 2
    assert f"error: argument {flags[0]}" in stderr[-1] and "invalid choice" in stderr[-1]


# Outputs that cannot be written: refused before the data is read (the data file named does not exist).
@pytest.mark.parametrize("command", ["train", "predict", "prepare_data", "baseline", "embed", "pretrain"])
@pytest.mark.parametrize("case", ["unwritable", "under_a_file"])
def test_an_output_that_cannot_be_written_is_refused_first(files, command, case, monkeypatch, capsys):
    if case == "unwritable" and not Path("/proc/self").exists():
        pytest.skip("needs /proc")
    output = UNWRITABLE / "out" if case == "unwritable" else files["a_file"] / "out"
    argv = command_line(command, files, files["root"] / "not-read.csv", output=output)
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    message = "cannot write there" if case == "unwritable" else f"{files['a_file']} is a file, not a folder"
    assert_one_error_line(status, stderr, message)


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_an_output_file_that_is_a_folder_is_refused_first(files, command, monkeypatch, capsys):
    argv = command_line(command, files, files["root"] / "not-read.csv")
    argv[argv.index("--output_file") + 1] = files["root"]
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    assert_one_error_line(status, stderr, f"--output_file {files['root']} is a folder; give the path of a file")


# Model folders that cannot be used, given to prediction, embedding and fine-tuning.


def with_model_folder(command: str, argv: list, folder: Path) -> list:
    """`argv` of `command` with `folder` as the model to score with, or (training) to start from."""
    if command == "train":
        return [*argv, "--model_name_or_path", folder]
    flag = {"predict": "--model", "embed": "--model_dir"}[command]
    return [folder if argv[index - 1] == flag else value for index, value in enumerate(argv)]


FOLDERS = {
    "truncated_weights": "model.safetensors: the file is incomplete (1,000 bytes",
    "no_config": "no config.json, so it is not a trained model folder",
    "bert_config": "its config.json describes a 'bert' model, not a 'txformer' one",
    "broken_config": "config.json' is not a valid JSON file",
    "a_file": "is a file, not a model folder",
    "missing": "no such model folder (nor a Hub repository id)",
}


@pytest.mark.parametrize("command", ["predict", "embed", "train"])
@pytest.mark.parametrize("case", list(FOLDERS))
def test_a_model_folder_that_cannot_be_used_is_named(files, command, case, monkeypatch, capsys):
    folder = files["root"] / "missing-folder" if case == "missing" else files[case]
    argv = with_model_folder(command, command_line(command, files, files["transactions"]), folder)
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    assert_one_error_line(status, stderr, FOLDERS[case])
    assert str(folder) in stderr[-1]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("predict", "preprocessor_config.json is missing"),
        ("embed", "preprocessor_config.json is missing"),
        # Fine-tuning with a newly fitted vocabulary would index the pretrained embeddings with other codes.
        ("train", "holds no saved EventVocabulary"),
    ],
)
def test_a_folder_without_its_processor_is_named(files, command, message, monkeypatch, capsys):
    argv = command_line(command, files, files["root"] / "not-read.csv")
    argv = with_model_folder(command, argv, files["no_processor"])
    status, stderr = run_command(command, argv, monkeypatch, capsys)
    assert_one_error_line(status, stderr, message)
    assert str(files["no_processor"]) in stderr[-1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config_overrides", "hidden_size=32"], "--model_name_or_path {model} keeps its own config"),
        (["--attention_type", "performer"], "--model_name_or_path {model} is a 'full' model"),
    ],
)
def test_flags_that_a_model_folder_would_silently_ignore_are_refused(files, flags, message, monkeypatch, capsys):
    argv = [*command_line("train", files, files["root"] / "not-read.csv"), "--model_name_or_path", files["model"]]
    status, stderr = run_command("train", [*argv, *flags], monkeypatch, capsys)
    assert_one_error_line(status, stderr, message.format(model=files["model"]))


# Quirks that the reader handles: the file reads as the clean one.
QUIRKS = {
    "byte_order_mark": lambda text: "\ufeff" + text,
    "crlf_line_ends": lambda text: text.replace("\n", "\r\n"),
    "extra_column": lambda text: "\n".join(line + ",note" for line in text.splitlines()) + "\n",
    "spaces_around_ids": lambda text: "\n".join(
        [text.splitlines()[0], *(f" {line.replace(',', ' ,', 1)}" for line in text.splitlines()[1:])]
    ),
    "blank_lines": lambda text: text.replace("\n", "\n\n"),
    "gzip": gzip.compress,
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_quirks_read_as_the_clean_file(files, quirk):
    clean = files["transactions"].read_text()
    path = files["root"] / f"quirk-{quirk}.csv{'.gz' if quirk == 'gzip' else ''}"
    written = QUIRKS[quirk](clean.encode() if quirk == "gzip" else clean)
    path.write_bytes(written if isinstance(written, bytes) else written.encode())
    assert read_transactions(path).equals(read_transactions(files["transactions"]))
    labels = files["root"] / f"quirk-{quirk}-labels.csv"
    labels.write_bytes(
        ("\ufeff" + files["labels"].read_text().replace("\n", "\r\n")).encode() if quirk != "gzip" else b""
    )
    if quirk != "gzip":
        assert read_labels(labels).equals(read_labels(files["labels"]))
