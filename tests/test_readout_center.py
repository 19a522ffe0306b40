"""The embedding readout's centre outside training: linear in the log of the history's length, fitted over the
training customers before every evaluation (`update_readout_center`), and what a trained model is saved with."""

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import random_batch, tiny_config
from safetensors.torch import load_file, save_file
from test_recipe import NUM_CUSTOMERS, TINY_MODEL, arguments, tiny_run_flags

from txformer import TxFormerForSequenceClassification, TxFormerModel
from txformer.data import TransactionCollator
from txformer.prediction import load_model
from txformer.readout_center import center_customers, fit_center, update_readout_center
from txformer.training import DataArguments, main, prepare_datasets


def readout_model(attention_type: str = "full", **overrides) -> TxFormerModel:
    torch.manual_seed(0)
    config = tiny_config(attention_type, embedding_sum_readout=True, pooling_sum_scale=4.0, **overrides)
    return TxFormerModel(config).eval()


def histories(model: TxFormerModel, lengths: list[int]) -> datasets.Dataset:
    """Customers with random events of the given lengths, in the prepared data's columns."""
    config = model.config
    batch = random_batch(config, lengths)
    rows = []
    for row, length in enumerate(lengths):
        history = {"event_time": batch["event_time"][row, :length].tolist(), "num_events": length}
        for index, name in enumerate(config.categorical_fields):
            history[name] = batch["input_ids"][row, :length, index].tolist()
        for index, name in enumerate(config.numeric_fields):
            history[name] = batch["numeric_values"][row, :length, index].tolist()
        rows.append(history)
    return datasets.Dataset.from_list(rows)


def collator_of(model: TxFormerModel, max_length: int | None = None) -> TransactionCollator:
    config = model.config
    return TransactionCollator(list(config.categorical_fields), list(config.numeric_fields), max_length=max_length)


def weighted_line(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's least squares of the mean embeddings on (1, log n), each history weighted by its events."""
    design = np.stack([np.ones_like(counts), np.log(counts)], axis=1) * np.sqrt(counts)[:, None]
    solution, *_ = np.linalg.lstsq(design, sums / np.sqrt(counts)[:, None], rcond=None)
    return solution[0], solution[1]


def test_embedding_sums_are_what_the_readout_adds_up(attention_type):
    """`embedding_sums` gives the sums and counts the readout receives in a forward pass (the ∞-former's read
    segment by segment), without running the layers."""
    model = readout_model(attention_type)
    seen = {}
    model.embedding_readout.register_forward_hook(lambda module, inputs, output: seen.update(inputs=inputs))
    batch = random_batch(model.config, [9, 5, 2])
    with torch.no_grad():
        model(**batch)
    sums, counts = model.embedding_sums(**batch)
    assert counts.tolist() == [9, 5, 2] and sums.dtype == torch.float32
    torch.testing.assert_close(sums, seen["inputs"][0], rtol=1e-5, atol=1e-5)


def test_the_centre_outside_training_is_linear_in_the_log_length(attention_type):
    model = readout_model(attention_type)
    readout = model.embedding_readout
    mean, slope = torch.randn(16), torch.randn(16)
    readout.set_center(mean, slope)
    batch = random_batch(model.config, [9, 5, 2])
    seen = {}
    readout.register_forward_hook(lambda module, inputs, output: seen.update(output=output))
    with torch.no_grad():
        model(**batch)
    sums, counts = model.embedding_sums(**batch)
    counts = counts.float()[:, None]
    expected = (sums - counts * (mean + slope * counts.log())) / 4.0
    torch.testing.assert_close(seen["output"], expected, rtol=1e-5, atol=1e-5)
    readout.set_center(mean)
    assert not readout.center_log_slope.any()


def test_fit_center_is_the_weighted_least_squares_line():
    generator = np.random.default_rng(0)
    counts = generator.integers(1, 5000, size=40).astype(np.float64)
    sums = counts[:, None] * (generator.normal(size=(40, 6)) + np.log(counts)[:, None] * generator.normal(size=6))
    features = np.stack([np.ones_like(counts), np.log(counts)], axis=1)
    gram = torch.from_numpy(features.T @ (counts[:, None] * features))
    mean, slope = fit_center(gram, torch.from_numpy(features.T @ sums))
    expected_mean, expected_slope = weighted_line(sums, counts)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(slope.numpy(), expected_slope, rtol=1e-5, atol=1e-5)
    # One length for all: no slope, the event-weighted mean.
    features[:, 1] = np.log(256.0)
    gram = torch.from_numpy(features.T @ (counts[:, None] * features))
    mean, slope = fit_center(gram, torch.from_numpy(features.T @ sums))
    np.testing.assert_allclose(mean.numpy(), sums.sum(axis=0) / counts.sum(), rtol=1e-5)
    assert not slope.any()
    with pytest.raises(ValueError, match="no history"):
        fit_center(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("max_length", [None, 6])
def test_update_readout_center_fits_the_customers_as_evaluation_reads_them(max_length):
    """Over a dataset read in token-budget batches, the centre is the fit of each customer's own embedding sum (its
    last `max_length` events), as one-customer batches give it in evaluation (without dropout); the model's training
    mode is kept."""
    model = readout_model(hidden_dropout_prob=0.5).train()
    lengths = [3, 40, 7, 12, 1, 25, 9, 60]
    dataset = histories(model, lengths)
    collator = collator_of(model, max_length)
    update_readout_center(model, dataset, collator, Accelerator(cpu=True), "num_events", max_length=max_length)
    assert model.training
    model.eval()
    sums, counts = zip(*(model.embedding_sums(**collator([dataset[row]])) for row in range(len(lengths))), strict=True)
    sums, counts = torch.cat(sums).double().numpy(), torch.cat(counts).double().numpy()
    if max_length is None:
        expected_mean, expected_slope = weighted_line(sums, counts)
    else:  # most histories are cut to 6 events: the line is fitted on the lengths read
        expected_mean, expected_slope = weighted_line(sums, np.minimum(counts, max_length))
    readout = model.embedding_readout
    np.testing.assert_allclose(readout.running_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(readout.center_log_slope.numpy(), expected_slope, rtol=1e-4, atol=1e-5)


def test_a_trained_model_is_saved_with_the_centre_of_its_training_customers(tmp_path):
    """With the readout, `scripts/train.py` ends with the centre fitted over the training customers' whole
    histories (what evaluation reads) at the final weights, whatever the running mean of the training batches was."""
    output_dir = tmp_path / "out"
    flags = ["--max_length=0", "--train_max_length=32", "--max_steps=4", "--eval_steps=2"]
    flags.append(f"--config_overrides={TINY_MODEL},embedding_sum_readout=true")
    main(tiny_run_flags(output_dir, tmp_path / "cache", *flags))
    model = load_model(str(output_dir))
    saved_mean = model.txformer.embedding_readout.running_mean.clone()
    saved_slope = model.txformer.embedding_readout.center_log_slope.clone()
    assert saved_slope.any()
    data_args = DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(tmp_path / "cache"))
    train = prepare_datasets(data_args, arguments(tmp_path))["train"]
    collator = collator_of(model.txformer)
    update_readout_center(model, train, collator, Accelerator(cpu=True), "num_events")
    torch.testing.assert_close(model.txformer.embedding_readout.running_mean, saved_mean)
    torch.testing.assert_close(model.txformer.embedding_readout.center_log_slope, saved_slope)


def test_a_folder_saved_without_the_slope_loads_with_a_constant_centre(tmp_path):
    """Folders trained before the centre had a slope load (also through `load_model`, which refuses missing
    weights) with a zero slope: the constant centre they were saved with."""
    model = TxFormerForSequenceClassification(tiny_config(embedding_sum_readout=True))
    model.txformer.embedding_readout.set_center(torch.randn(16), torch.randn(16))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["txformer.embedding_readout.center_log_slope"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(tmp_path)).txformer.embedding_readout
    torch.testing.assert_close(loaded.running_mean, model.txformer.embedding_readout.running_mean)
    assert not loaded.center_log_slope.any()


def test_readout_center_customers_is_positive_or_zero_for_all(tmp_path):
    assert arguments(tmp_path, readout_center_customers=0).readout_center_customers is None
    with pytest.raises(ValueError, match="--readout_center_customers must be positive"):
        arguments(tmp_path, readout_center_customers=-1)


def test_the_centre_reads_all_customers_or_a_seeded_sample():
    assert center_customers(5, None).tolist() == center_customers(5, 8).tolist() == [0, 1, 2, 3, 4]
    sample = center_customers(1000, 64)
    assert len(set(sample.tolist())) == 64 and np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, center_customers(1000, 64))
