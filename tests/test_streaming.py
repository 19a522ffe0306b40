"""Training from a stream (`--streaming`): each rank streams its own share of the prepared training customers
(`split_dataset_by_node`), endlessly, in another order and with other windows at each pass; a run takes
`--max_steps` batches; the flags it cannot work with are refused before any data is read."""

import itertools
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_recipe import NUM_CUSTOMERS, arguments, tiny_run_flags

from txformer import training
from txformer.data import RandomWindow
from txformer.training import DataArguments, TxFormerTrainingArguments, main, prepare_datasets, training_stream


BATCH_SIZE = 8


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """The 126 training customers of 200 synthetic ones (no validation split), prepared."""
    folder = tmp_path_factory.mktemp("streaming")
    data_args = DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(folder / "cache"))
    return prepare_datasets(data_args, arguments(folder, eval_strategy="no"))["train"]


def as_rank(monkeypatch, rank: int, world_size: int) -> None:
    """Training arguments that read as those of process `rank` of a launch of `world_size` processes."""
    monkeypatch.setattr(TxFormerTrainingArguments, "process_index", property(lambda self: rank))
    monkeypatch.setattr(TxFormerTrainingArguments, "world_size", property(lambda self: world_size))


def test_each_rank_streams_its_own_share_pass_after_pass(train, tmp_path, monkeypatch):
    """Pass `k` of each rank is its share of the stream at epoch `k`: the ranks split the customers anew at each
    pass, and the shares of one pass hold every training customer once."""
    args = arguments(tmp_path, per_device_train_batch_size=BATCH_SIZE, group_by_length=True)
    shares = []
    for rank in range(2):
        as_rank(monkeypatch, rank, world_size=2)
        stream = training_stream(train, args, seed=0)
        passes = []
        for epoch in range(3):
            stream.stream.set_epoch(epoch)
            passes.append([customer["customer_id"] for customer in stream.stream])
        read = [customer["customer_id"] for customer in itertools.islice(stream, sum(map(len, passes)))]
        assert read == [customer for share in passes for customer in share]
        assert passes[0] and passes[1] != passes[0] and passes[2] != passes[1]
        shares.append(passes)
    for epoch in range(3):
        assert sorted(shares[0][epoch] + shares[1][epoch]) == sorted(train["customer_id"]), f"pass {epoch}"


def test_windows_are_drawn_anew_at_each_pass(train, tmp_path):
    window = RandomWindow(max_length=32, min_share=0.5, seed=0)
    stream = training_stream(train, arguments(tmp_path, per_device_train_batch_size=BATCH_SIZE), 0, window)
    read = list(itertools.islice(stream, 2 * len(train)))
    kept = {
        customer: min(length, 32) for customer, length in zip(train["customer_id"], train["num_events"], strict=True)
    }
    passes = [
        {customer["customer_id"]: customer["num_events"] for customer in read[start : start + len(train)]}
        for start in (0, len(train))
    ]
    for lengths in passes:
        assert lengths.keys() == kept.keys()
        assert all(np.ceil(kept[customer] / 2) <= lengths[customer] <= kept[customer] for customer in kept)
    assert np.mean([passes[0][customer] != passes[1][customer] for customer in kept]) > 0.5


def test_a_streaming_run_takes_max_steps_and_reads_every_training_customer_first(tmp_path, monkeypatch):
    seen = []

    class RecordingCollator(training.TransactionCollator):
        def __call__(self, features):
            seen.extend(feature["customer_id"] for feature in features)
            return super().__call__(features)

    monkeypatch.setattr(training, "TransactionCollator", RecordingCollator)
    flags = ["--streaming", "--max_steps=12", "--per_device_train_batch_size=16", "--eval_strategy=no"]
    metrics = main(tiny_run_flags(tmp_path / "out", tmp_path / "cache", *flags, "--group_by_length"))
    assert metrics["train_steps"] == metrics["train_max_steps"] == 12
    assert np.isfinite(metrics["train_loss"])
    num_train = metrics["train_samples"]
    assert num_train == 126 and len(seen) >= 12 * 16 > num_train
    train_ids = prepare_datasets(
        DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(tmp_path / "cache")),
        arguments(tmp_path, eval_strategy="no"),
    )["train"]["customer_id"]
    assert sorted(seen[:num_train]) == sorted(train_ids), "the first pass holds every training customer once"


def test_a_streaming_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(tmp_path):
    """The resumed run reads the stream again from its start and skips the batches already taken; dropout is on, so
    the random states must be restored too."""
    flags = [
        "--streaming",
        "--max_steps=10",
        "--save_strategy=steps",
        "--save_steps=5",
        "--eval_strategy=no",
        "--config_overrides=hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32,"
        "hidden_dropout_prob=0.1",
    ]
    main(tiny_run_flags(tmp_path / "straight", tmp_path / "cache", *flags))
    shutil.copytree(tmp_path / "straight" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    main(tiny_run_flags(tmp_path / "resumed", tmp_path / "cache", *flags, "--resume_from_checkpoint=last"))
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(resumed[name], tensor) for name, tensor in straight.items())
    assert not torch.equal(
        straight["classifier.weight"],
        load_file(tmp_path / "resumed" / "checkpoint-5" / "model.safetensors")["classifier.weight"],
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--streaming"], "give --max_steps"),
        (["--streaming", "--max_steps=3", "--max_tokens_per_batch=512"], "--max_tokens_per_batch .* pass one"),
    ],
)
def test_flags_a_stream_cannot_take_are_refused_before_reading_data(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(tiny_run_flags(tmp_path / "out", tmp_path / "cache", *flags))
    assert not (tmp_path / "cache").exists(), "no data generated or prepared"
