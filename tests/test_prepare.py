"""Sharded, cached preparation of many transaction files: the same customers and training data as the in-memory
reader, whatever the number of shards; the cache and its invalidation; one preparation for the two processes of an
`accelerate launch`; errors naming the input file and line; the stream split across ranks and grouped by length.

Run as a script (`accelerate launch ... tests/test_prepare.py CACHE OUTPUT FILES... LABELS`), this file is the launched
program: each rank prepares the training data inside `main_process_first`, as training does.
"""

import gzip
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from txformer.benchmark.data_scale import scaled_data
from txformer.data import (
    EventVocabulary,
    TransactionDataError,
    build_customer_dataset,
    customer_table,
    generate_synthetic_data,
    read_labels,
    split_for_evaluation,
    stratified_split,
)
from txformer.data.prepare import (
    main,
    prepare_customers,
    prepare_encoded_customers,
    prepare_training_data,
    transaction_files,
)
from txformer.data.streaming import streaming_dataset


REPO = Path(__file__).resolve().parent.parent
# Parts far smaller than a file, so that every file is read in several parts.
PART_BYTES = 64 << 10
LAUNCH_TIMEOUT_S = 300
HEADER = "customer_id,tr_datetime,mcc_code,tr_type,amount,term_id"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A synthetic file cut into a CSV, a gzipped CSV and a Parquet file, plus that file itself (`whole`). A row
    tying in time with a row of the first file ends the last one: the tie must keep the input order."""
    folder = tmp_path_factory.mktemp("prepare")
    info = generate_synthetic_data(folder / "synthetic", num_customers=160, seed=3)
    header, *rows = info.transactions_path.read_text().splitlines()
    first_row = rows[0].split(",")
    rows.append(",".join([first_row[0], first_row[1], "9999", *first_row[3:]]))
    cut = [0, len(rows) // 3, 2 * len(rows) // 3, len(rows)]
    csv_path, gz_path, parquet_path = folder / "a.csv", folder / "b.csv.gz", folder / "c.parquet"
    csv_path.write_text("\n".join([header, *rows[cut[0] : cut[1]]]) + "\n")
    with gzip.open(gz_path, "wt") as file:
        file.write("\n".join([header, *rows[cut[1] : cut[2]]]) + "\n")
    (folder / "c.csv").write_text("\n".join([header, *rows[cut[2] : cut[3]]]) + "\n")
    text_columns = {"tr_datetime": pa.string(), "term_id": pa.string()}
    parquet_table = pa_csv.read_csv(folder / "c.csv", convert_options=pa_csv.ConvertOptions(column_types=text_columns))
    pq.write_table(parquet_table, parquet_path)
    (folder / "c.csv").unlink()
    whole = folder / "whole.csv"
    whole.write_text("\n".join([header, *rows]) + "\n")
    return {
        "files": [csv_path, gz_path, parquet_path],
        "whole": whole,
        "labels": info.train_labels_path,
        "tied_customer": int(first_row[0]),
    }


def test_many_files_give_the_customers_of_their_concatenation(inputs, tmp_path):
    prepared = prepare_customers(inputs["files"], inputs["labels"], cache_dir=tmp_path, part_bytes=PART_BYTES)
    expected = build_customer_dataset(inputs["whole"], inputs["labels"])
    assert customer_table(prepared).equals(customer_table(expected))


@pytest.mark.parametrize("num_shards", [1, 5])
def test_the_number_of_shards_does_not_change_the_customers(inputs, tmp_path, num_shards):
    prepared = prepare_customers(
        inputs["files"], keep_unlabelled=True, cache_dir=tmp_path, num_shards=num_shards, part_bytes=PART_BYTES
    )
    expected = build_customer_dataset(inputs["whole"])
    assert customer_table(prepared).equals(customer_table(expected))
    tied = expected[expected["customer_id"].index(inputs["tied_customer"])]
    at_tie = np.flatnonzero(np.asarray(tied["event_time"]) == tied["event_time"][tied["mcc_code"].index(9999)])
    assert len(at_tie) == 2 and tied["mcc_code"][at_tie[1]] == 9999, "the row of the last file comes second"


@pytest.mark.parametrize(
    ("num_shards", "max_train_customers", "num_validation"), [(1, None, None), (4, None, None), (4, 60, 7)]
)
def test_training_data_is_the_in_memory_preparation(inputs, tmp_path, num_shards, max_train_customers, num_validation):
    prepared = prepare_training_data(
        inputs["files"],
        inputs["labels"],
        max_train_customers=max_train_customers,
        validation_size=None if num_validation is None else lambda num_train: num_validation,
        min_count=2,
        cache_dir=tmp_path,
        num_shards=num_shards,
        part_bytes=PART_BYTES,
    )
    customers = build_customer_dataset(inputs["whole"], inputs["labels"])
    parts = dict(zip(("train", "eval"), split_for_evaluation(customers, 0.1, 42, max_train_customers), strict=True))
    if num_validation is not None:
        parts["train"], parts["validation"] = stratified_split(parts["train"], test_size=num_validation, seed=42)
    vocabulary = EventVocabulary.fit(parts["train"], min_count=2)
    assert prepared.vocabulary.to_dict() == vocabulary.to_dict()
    assert (prepared.validation is None) == (num_validation is None)
    for name, expected in parts.items():
        got = getattr(prepared, name)
        # The same rows in the same order: ascending ids, but for a subsampled training part (shuffled order).
        assert customer_table(got).equals(customer_table(vocabulary.encode(expected)))
        assert got.cache_files, "memory-mapped from the cache"


def test_a_given_vocabulary_encodes_every_part_unfitted(inputs, prepared, tmp_path):
    customers = build_customer_dataset(inputs["whole"], inputs["labels"])
    train, held_out = split_for_evaluation(customers, 0.1, 42)
    given = EventVocabulary.fit(held_out, min_count=1)
    again = prepare_training_data(
        inputs["files"], inputs["labels"], vocabulary=given, cache_dir=tmp_path, part_bytes=PART_BYTES
    )
    assert again.vocabulary.to_dict() == given.to_dict() != prepared.vocabulary.to_dict()
    assert customer_table(again.train).equals(customer_table(given.encode(train)))


def test_every_customer_encoded_with_a_trained_vocabulary_for_prediction(inputs, prepared, tmp_path):
    encoded = prepare_encoded_customers(
        inputs["files"], prepared.vocabulary, cache_dir=tmp_path, part_bytes=PART_BYTES
    )
    expected = prepared.vocabulary.encode(build_customer_dataset(inputs["whole"]))
    assert customer_table(encoded.customers).equals(customer_table(expected))
    assert encoded.vocabulary.to_dict() == prepared.vocabulary.to_dict()
    prepare_customers(inputs["files"], keep_unlabelled=True, cache_dir=tmp_path, part_bytes=PART_BYTES)
    folders = sorted(path.name.split("-")[0] for path in (tmp_path / "prepared").iterdir())
    assert folders == ["customers", "encoded"], "the customers folder is shared"


def test_every_customer_encoded_with_a_vocabulary_fitted_on_them_all_for_pretraining(inputs, tmp_path):
    encoded = prepare_encoded_customers(inputs["files"], min_count=2, cache_dir=tmp_path, part_bytes=PART_BYTES)
    everyone = build_customer_dataset(inputs["whole"])
    vocabulary = EventVocabulary.fit(everyone, min_count=2)
    assert encoded.vocabulary.to_dict() == vocabulary.to_dict()
    assert customer_table(encoded.customers).equals(customer_table(vocabulary.encode(everyone)))


def test_requested_customers_are_kept_in_id_order_and_absent_ones_reported(inputs, prepared, tmp_path, caplog):
    everyone = prepare_encoded_customers(inputs["files"], prepared.vocabulary, cache_dir=tmp_path).customers
    ids = everyone["customer_id"]
    with caplog.at_level(logging.WARNING, logger="txformer.data.reader"):
        chosen = prepare_encoded_customers(
            inputs["files"], prepared.vocabulary, customer_ids=[ids[7], -5, ids[2]], cache_dir=tmp_path
        ).customers
    assert customer_table(chosen).equals(customer_table(everyone.select([2, 7])))
    assert "1 requested customers have no transactions" in caplog.text and "[-5]" in caplog.text
    with pytest.raises(TransactionDataError, match="no transactions left for the requested customers"):
        prepare_encoded_customers(inputs["files"], prepared.vocabulary, customer_ids=[-5], cache_dir=tmp_path)


def test_a_second_call_loads_the_cache_without_encoding_again(inputs, tmp_path, caplog):
    def encoding_passes() -> int:
        return sum(record.getMessage().startswith("Encoding") for record in caplog.records)

    with caplog.at_level(logging.INFO, logger="txformer.data.prepare"):
        first = prepare_training_data(inputs["files"], inputs["labels"], cache_dir=tmp_path, part_bytes=PART_BYTES)
        assert encoding_passes() == 1
        second = prepare_training_data(inputs["files"], inputs["labels"], cache_dir=tmp_path, part_bytes=PART_BYTES)
    assert encoding_passes() == 1
    assert "Using the prepared data" in caplog.text
    assert second.directory == first.directory
    assert customer_table(second.train).equals(customer_table(first.train))
    assert [path.name for path in tmp_path.joinpath("prepared").iterdir() if path.name.startswith(".")] == []


def test_a_changed_input_or_label_file_is_prepared_again(inputs, tmp_path):
    files = [tmp_path / path.name for path in inputs["files"]]
    labels = tmp_path / "labels.csv"
    for source, copy in zip([*inputs["files"], inputs["labels"]], [*files, labels], strict=True):
        copy.write_bytes(source.read_bytes())
    before = prepare_customers(files, labels, cache_dir=tmp_path / "cache", part_bytes=PART_BYTES)
    first_id = before[0]["customer_id"]
    with open(files[0], "a") as file:
        file.write(f"{first_id},500 00:00:00,1,1,1.0,\n")
    after = prepare_customers(files, labels, cache_dir=tmp_path / "cache", part_bytes=PART_BYTES)
    assert after[0]["event_time"][-1] == 500 and len(after[0]["event_time"]) == len(before[0]["event_time"]) + 1

    labels.write_text(
        "\n".join(line for line in labels.read_text().splitlines() if not line.startswith(f"{first_id},")) + "\n"
    )
    relabelled = prepare_customers(files, labels, cache_dir=tmp_path / "cache", part_bytes=PART_BYTES)
    assert first_id not in relabelled["customer_id"] and len(relabelled) == len(after) - 1
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 3


def write_lines(path, lines: list[str]):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as file:
        file.write("\n".join([HEADER, *lines]) + "\n")
    return path


def prepare_in_launched_process(cache_dir: Path, output_dir: Path, files: list[str], labels: str) -> None:
    """The launched program: this rank prepares the training data inside `main_process_first(local=False)`, then
    reads its share of the training customers, from the stream and from the loader the Trainer trains on, and writes
    what it got to `rank<r>.json`."""
    from conftest import tiny_config

    from txformer import TxFormerForSequenceClassification
    from txformer.training import TxFormerTrainer, TxFormerTrainingArguments, training_stream

    rank = os.environ["RANK"]
    logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(name)s: %(message)s", stream=sys.stdout)
    arguments = TxFormerTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=1, eval_strategy="no", report_to=[]
    )
    with arguments.main_process_first(local=False, desc="preparing the data"):
        prepared = prepare_training_data(files, labels, cache_dir=cache_dir, part_bytes=PART_BYTES)
    stream = training_stream(prepared.train, arguments, seed=0)
    share = [example["customer_id"] for example in stream.stream]
    trainer = TxFormerTrainer(
        model=TxFormerForSequenceClassification(tiny_config()),
        args=arguments,
        train_dataset=stream,
        data_collator=lambda features: [feature["customer_id"] for feature in features],
    )
    loaded = itertools.chain.from_iterable(trainer.get_train_dataloader())
    result = {
        "world_size": arguments.world_size,
        "directory": str(prepared.directory),
        "train": list(prepared.train["customer_id"]),
        "streamed": share,
        "loaded": list(itertools.islice(loaded, len(share))),
    }
    (output_dir / f"rank{rank}.json").write_text(json.dumps(result))


def test_two_launched_processes_prepare_once_then_stream_disjoint_shares(inputs, tmp_path):
    """The Trainer's loader of each rank reads exactly the rank's share: `accelerate` does not split it again."""
    environment = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment["CUDA_VISIBLE_DEVICES"] = ""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu_2proc.yaml"),
        __file__, str(tmp_path / "cache"), str(tmp_path), *map(str, inputs["files"]), str(inputs["labels"]),
    ]  # fmt: skip
    launched = subprocess.run(
        command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert launched.returncode == 0, launched.stdout[-4000:] + launched.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert ranks[0]["directory"] == ranks[1]["directory"] and ranks[0]["train"] == ranks[1]["train"]
    streamed = ranks[0]["streamed"] + ranks[1]["streamed"]
    assert sorted(streamed) == sorted(ranks[0]["train"]), "each training customer streamed once, by one rank"
    assert ranks[0]["streamed"] and ranks[1]["streamed"]
    assert all(rank["loaded"] == rank["streamed"] for rank in ranks)
    log = launched.stdout.splitlines()
    encoding = [line for line in log if "txformer.data.prepare: Encoding" in line]
    assert len(encoding) == 1 and encoding[0].startswith("rank 0"), "\n".join(log)
    assert f"rank 1 txformer.data.prepare: Using the prepared data in {ranks[1]['directory']}." in log


@pytest.mark.parametrize("name", ["late.csv", "late.csv.gz"])
def test_an_error_deep_in_a_file_names_the_file_and_its_line(inputs, tmp_path, name):
    lines = [f"{1000 + row % 50},{row % 400} 10:00:00,5411,1010,-{row}.5,T{row}" for row in range(6000)]
    lines[4500] = "1001,3 10:00:00,5411,1010,abc,T1"
    bad = write_lines(tmp_path / name, lines)
    with pytest.raises(TransactionDataError, match=rf"^{bad} line 4502: amount 'abc' is not a number") as caught:
        prepare_customers([inputs["files"][0], bad], cache_dir=tmp_path / "cache", part_bytes=PART_BYTES)
    assert "line-" not in str(caught.value), "the part file is not named"
    assert not list((tmp_path / "cache" / "prepared").iterdir()), "nothing left in the cache"


def test_errors_of_a_parquet_file_count_rows_as_lines_below_a_header(tmp_path):
    rows = {
        "customer_id": [1, 2, 3],
        "tr_datetime": ["0 10:00:00", "1 25:00:00", "2 10:00:00"],
        "mcc_code": [1, 2, 3],
        "tr_type": [1, 1, 1],
        "amount": [1.0, 2.0, 3.0],
        "term_id": ["A", None, "B"],
    }
    pq.write_table(pa.table(rows), tmp_path / "bad.parquet")
    with pytest.raises(TransactionDataError, match=rf"^{tmp_path / 'bad.parquet'} line 3: tr_datetime '1 25:00:00'"):
        prepare_customers(tmp_path / "bad.parquet", cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(f"{HEADER}\n", "header but no transactions"), ("", "the file is empty")],
)
def test_a_file_without_rows_is_an_error(inputs, tmp_path, content, message):
    (tmp_path / "empty.csv").write_text(content)
    with pytest.raises(TransactionDataError, match=message):
        prepare_customers([inputs["files"][0], tmp_path / "empty.csv"], cache_dir=tmp_path)


def test_a_missing_column_in_a_later_file_names_that_file_on_line_1(inputs, tmp_path):
    (tmp_path / "renamed.csv").write_text("customer_id,tr_datetime,mcc,tr_type,amount,term_id\n1,0 10:00:00,1,1,1,\n")
    with pytest.raises(TransactionDataError, match=rf"^{tmp_path / 'renamed.csv'} line 1: missing column"):
        prepare_customers([inputs["files"][0], tmp_path / "renamed.csv"], cache_dir=tmp_path)


def test_transaction_files_expand_globs_in_order_and_refuse_other_files(inputs, tmp_path):
    folder = inputs["files"][0].parent
    assert transaction_files([str(folder / "*.parquet"), folder / "a.csv"]) == [inputs["files"][2], inputs["files"][0]]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        transaction_files(str(tmp_path / "*.csv"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a transaction file"):
        transaction_files(tmp_path / "notes.txt")


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    return prepare_training_data(
        inputs["files"], inputs["labels"], cache_dir=tmp_path_factory.mktemp("cache"), part_bytes=PART_BYTES
    )


@pytest.mark.parametrize("num_shards", [8, 7])
def test_the_stream_split_across_two_ranks_covers_every_customer_once(prepared, num_shards):
    seen = [
        [
            example["customer_id"]
            for example in streaming_dataset(
                prepared.train, batch_size=4, buffer_batches=3, num_shards=num_shards, rank=rank, world_size=2
            )
        ]
        for rank in range(2)
    ]
    assert sorted(seen[0] + seen[1]) == sorted(prepared.train["customer_id"])
    assert abs(len(seen[0]) - len(seen[1])) <= len(prepared.train) // 2


def test_the_stream_groups_similar_lengths_into_batches_within_a_buffer(prepared):
    batch_size, buffer_batches = 4, 5
    stream = streaming_dataset(prepared.train, batch_size, buffer_batches=buffer_batches)
    lengths = [example["num_events"] for example in stream]
    assert sorted(lengths) == sorted(prepared.train["num_events"])
    buffer_size = batch_size * buffer_batches
    num_buffers = len(lengths) // buffer_size
    assert num_buffers >= 3
    for start in range(0, num_buffers * buffer_size, buffer_size):
        batches = [lengths[first : first + batch_size] for first in range(start, start + buffer_size, batch_size)]
        ranges = sorted((min(batch), max(batch)) for batch in batches)
        # Sorted, then cut: the length ranges of a buffer's batches do not overlap.
        assert all(next_low >= high for (_, high), (next_low, _) in itertools.pairwise(ranges))

    def padding(values: list[int]) -> int:
        batches = [values[first : first + batch_size] for first in range(0, len(values), batch_size)]
        return sum(len(batch) * max(batch) - sum(batch) for batch in batches)

    in_file_order = prepared.train["num_events"][: num_buffers * buffer_size]
    assert padding(lengths[: num_buffers * buffer_size]) < padding(in_file_order)


def test_the_script_prepares_and_prints_the_folder(inputs, tmp_path, capsys):
    argv = [
        "--transactions",
        *map(str, inputs["files"]),
        "--labels",
        str(inputs["labels"]),
        "--data_cache_dir",
        str(tmp_path),
    ]
    directory = main([*argv, "--part_bytes", str(PART_BYTES)])
    assert str(directory) in capsys.readouterr().out
    assert len(datasets.load_from_disk(str(directory / "train"))) > 0
    assert os.path.isfile(directory / "event_vocabulary.json")


def test_scaled_benchmark_data_holds_every_copy_with_distinct_ids(tmp_path):
    single = build_customer_dataset(scaled_data(tmp_path, 1, seed=5, num_customers=12) / "transactions.csv")
    folder = scaled_data(tmp_path, 3, seed=5, num_customers=12)
    tripled = build_customer_dataset(folder / "transactions.csv", folder / "gender_train.csv", keep_unlabelled=True)
    copies = [
        build_customer_dataset(tmp_path / f"synthetic-n12-seed{seed}" / "transactions.csv") for seed in (5, 6, 7)
    ]
    assert len(tripled) == sum(len(copy) for copy in copies) == 36
    assert customer_table(tripled).slice(0, 12).drop_columns(["labels"]).equals(customer_table(single))
    offsets = np.asarray(tripled["customer_id"]) // 10**8
    assert np.bincount(offsets).tolist() == [12, 12, 12]
    assert tripled.filter(lambda row: row["labels"] is not None).num_rows == sum(
        len(read_labels(tmp_path / f"synthetic-n12-seed{seed}" / "gender_train.csv")) for seed in (5, 6, 7)
    )


if __name__ == "__main__":
    prepare_in_launched_process(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:-1], sys.argv[-1])
