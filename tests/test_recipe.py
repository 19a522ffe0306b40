"""The training recipe: a budget counted in optimizer steps, a validation split carved from the training customers
that steers training (early stopping, best checkpoint) while the reported held-out split does not, fine-tuning from
a pretrained folder, and training batches that fill a token budget."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from conftest import tiny_config
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from txformer import TxFormerConfig, TxFormerModel
from txformer.cli import parse_config_overrides
from txformer.data import (
    EventVocabulary,
    TokenBudgetBatchSampler,
    TransactionCollator,
    build_customer_dataset,
    generate_synthetic_data,
    stratified_split,
)
from txformer.data.sampler import bucket_ceilings
from txformer.file_names import EVAL_PREDICTIONS_FILE
from txformer.metrics import classification_metrics, compute_metrics, read_evaluated_predictions
from txformer.prediction import load_model, predict_probabilities
from txformer.recipe import (
    FINE_TUNING_LEARNING_RATE_SCALE,
    LONG_HISTORY_RECIPE,
    STANDARD_RECIPE,
    choose_recipe,
)
from txformer.training import (
    DataArguments,
    ModelArguments,
    TxFormerTrainingArguments,
    build_model,
    data_files,
    main,
    prepare_datasets,
    steps_per_epoch,
    training_budget,
    use_recipe,
    validation_size,
)


TINY_MODEL = "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32,numeric_num_frequencies=2"
NUM_CUSTOMERS = 200


def tiny_run_flags(
    output_dir: Path, cache_dir: Path, *flags: str, model_name_or_path: Path | None = None
) -> list[str]:
    """`scripts/train.py` flags of a run of a few steps on 200 synthetic customers (126 training customers), of a
    tiny new model or of the one in `model_name_or_path`."""
    return [
        f"--synthetic_num_customers={NUM_CUSTOMERS}",
        f"--config_overrides={TINY_MODEL}"
        if model_name_or_path is None
        else f"--model_name_or_path={model_name_or_path}",
        "--max_length=32",
        "--per_device_train_batch_size=8",
        "--per_device_eval_batch_size=64",
        "--report_to=none",
        "--disable_tqdm=true",
        "--use_cpu=true",
        f"--output_dir={output_dir}",
        f"--data_cache_dir={cache_dir}",
        *flags,
    ]


def arguments(tmp_path: Path, **overrides) -> TxFormerTrainingArguments:
    return TxFormerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)


# Budget.


def test_the_budget_is_the_floor_on_small_data_and_epochs_on_large_data(tmp_path):
    args = arguments(tmp_path, min_train_steps=600, num_train_epochs=8)
    assert training_budget(args, num_steps_per_epoch=30) == 600
    assert training_budget(args, num_steps_per_epoch=100) == 800
    assert training_budget(arguments(tmp_path, num_train_epochs=2.5, min_train_steps=1), 7) == 18


def test_an_explicit_max_steps_wins(tmp_path):
    assert training_budget(arguments(tmp_path, max_steps=37, min_train_steps=600), num_steps_per_epoch=100) == 37


def test_steps_per_epoch_count_processes_and_accumulation():
    assert steps_per_epoch(100) == 100
    assert steps_per_epoch(100, gradient_accumulation_steps=4) == 25
    assert steps_per_epoch(101, gradient_accumulation_steps=4) == 26
    # Two processes take 51 batches each (the last round completed), or 50 with drop_last.
    assert steps_per_epoch(101, world_size=2) == 51
    assert steps_per_epoch(101, world_size=2, drop_last=True) == 50
    assert steps_per_epoch(101, world_size=2, gradient_accumulation_steps=4) == 13
    assert steps_per_epoch(3, world_size=4) == 1


def test_a_run_takes_the_budget_of_its_data(tmp_path):
    """126 training customers, 31 of them for validation: 95 / 8 = 12 batches, 6 steps with accumulation 2."""
    metrics = main(
        tiny_run_flags(
            tmp_path / "out",
            tmp_path / "cache",
            "--num_train_epochs=1.5",
            "--min_train_steps=5",
            "--gradient_accumulation_steps=2",
            "--early_stopping_patience=0",
        )
    )
    assert metrics["train_samples"] == 95 and metrics["validation_samples"] == 31
    assert metrics["train_max_steps"] == metrics["train_steps"] == 9
    assert json.loads((tmp_path / "out" / "training_run.json").read_text())["recipe"] == "standard"


def test_evaluation_and_checkpoints_follow_each_other(tmp_path):
    default = arguments(tmp_path)
    assert default.eval_steps == default.save_steps < 1
    assert default.load_best_model_at_end and default.greater_is_better
    assert default.metric_for_best_model == "validation_auroc"
    assert arguments(tmp_path, save_steps=4).eval_steps == 4
    assert arguments(tmp_path, eval_steps=6).save_steps == 6
    assert not arguments(tmp_path, eval_strategy="no").load_best_model_at_end
    with pytest.raises(ValueError, match="both group by length"):
        arguments(tmp_path, group_by_length=True, max_tokens_per_batch=512)


# The long-history recipe.


def test_the_auto_recipe_follows_the_training_customers_median_history():
    assert choose_recipe("auto", [300, 1025, 5000]) is LONG_HISTORY_RECIPE
    assert choose_recipe("auto", [300, 1024, 90000]) is STANDARD_RECIPE
    assert choose_recipe("auto", []) is STANDARD_RECIPE
    assert choose_recipe("standard", [5000]) is STANDARD_RECIPE
    assert choose_recipe("long_histories", [10]) is LONG_HISTORY_RECIPE


def test_the_standard_recipe_gives_the_defaults_until_another_is_used(tmp_path):
    args, data_args = arguments(tmp_path), DataArguments()
    assert (args.learning_rate, args.min_train_steps, args.save_steps, args.eval_steps) == (1e-3, 500, 0.05, 0.05)
    assert (args.early_stopping_patience, args.group_by_length) == (5, False)
    assert (data_args.train_window_min_share, data_args.train_max_length) == (0.5, None)
    args.use_recipe(LONG_HISTORY_RECIPE)
    data_args.use_recipe(LONG_HISTORY_RECIPE)
    assert (args.learning_rate, args.min_train_steps, args.save_steps, args.eval_steps) == (2e-4, 300, 1 / 12, 1 / 12)
    assert (args.early_stopping_patience, args.group_by_length) == (0, True)
    assert args.train_sampling_strategy == "group_by_length"
    assert (data_args.train_window_min_share, data_args.train_max_length) == (0.05, 4096)
    assert "recipe_fields" not in args.to_dict()


def test_flags_given_on_the_command_line_keep_their_values_under_the_long_recipe(tmp_path):
    parser = HfArgumentParser((ModelArguments, DataArguments, TxFormerTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(
        args=[
            f"--output_dir={tmp_path}",
            "--learning_rate=5e-4",
            "--eval_steps=10",
            "--train_max_length=0",
            "--max_tokens_per_batch=4096",
            "--config_overrides=embedding_sum_readout=false,hidden_size=16",
        ]
    )
    use_recipe(LONG_HISTORY_RECIPE, model_args, data_args, args)
    assert (args.learning_rate, args.eval_steps, args.save_steps, args.min_train_steps) == (5e-4, 10, 10, 300)
    # Token-budget batches are grouped by length already.
    assert args.group_by_length is False
    assert (data_args.train_max_length, data_args.train_window_min_share) == (None, 0.05)
    assert parse_config_overrides(model_args.config_overrides, TxFormerConfig()) == {
        "embedding_sum_readout": False,
        "hidden_size": 16,
    }


def test_another_sampling_strategy_given_is_kept_under_the_long_recipe(tmp_path):
    args = arguments(tmp_path, train_sampling_strategy="sequential")
    args.use_recipe(LONG_HISTORY_RECIPE)
    assert (args.train_sampling_strategy, args.group_by_length) == ("sequential", False)


def test_deepspeed_needs_the_learning_rate_given_when_the_recipe_changes_it(tmp_path):
    """DeepSpeed fills its 'auto' learning rate when the flags are parsed, before the data chooses the recipe."""
    args = arguments(tmp_path)
    args.deepspeed = "ds_config.json"
    with pytest.raises(
        ValueError, match="--deepspeed fills its config's 'auto' learning rate .* give --learning_rate"
    ):
        args.use_recipe(LONG_HISTORY_RECIPE)
    args = arguments(tmp_path, learning_rate=1e-3)
    args.deepspeed = "ds_config.json"
    args.use_recipe(LONG_HISTORY_RECIPE)
    assert args.learning_rate == 1e-3


def test_the_long_recipe_adds_the_readout_to_a_new_model_only(tmp_path):
    new_model, args = ModelArguments(config_overrides="hidden_size=16"), arguments(tmp_path)
    use_recipe(LONG_HISTORY_RECIPE, new_model, DataArguments(), args)
    assert new_model.config_overrides == "embedding_sum_readout=true,hidden_size=16"
    assert args.learning_rate == LONG_HISTORY_RECIPE.learning_rate
    folder = ModelArguments(model_name_or_path=str(tmp_path))
    use_recipe(LONG_HISTORY_RECIPE, folder, DataArguments(), args := arguments(tmp_path))
    assert folder.config_overrides is None


@pytest.mark.parametrize("recipe", [STANDARD_RECIPE, LONG_HISTORY_RECIPE])
def test_a_trained_encoder_is_fine_tuned_at_a_tenth_of_the_learning_rate(tmp_path, recipe):
    folder = ModelArguments(model_name_or_path=str(tmp_path))
    use_recipe(recipe, folder, DataArguments(), args := arguments(tmp_path))
    assert args.learning_rate == pytest.approx(recipe.learning_rate * FINE_TUNING_LEARNING_RATE_SCALE)
    # The head alone (a new layer on a frozen encoder) and a given learning rate keep theirs.
    head_only = ModelArguments(model_name_or_path=str(tmp_path), freeze_encoder=True)
    use_recipe(recipe, head_only, DataArguments(), args := arguments(tmp_path))
    assert args.learning_rate == recipe.learning_rate
    use_recipe(recipe, folder, DataArguments(), args := arguments(tmp_path, learning_rate=3e-3))
    assert args.learning_rate == 3e-3


def test_a_run_on_long_histories_trains_with_the_long_recipe(tmp_path):
    """The long family's median history holds about 1,500 events: the run takes the long-history recipe (the flags it
    was not given, and the embedding readout), while a flag it was given keeps its value."""
    output_dir = tmp_path / "out"
    flags = tiny_run_flags(output_dir, tmp_path / "cache", "--max_steps=2", "--weight_decay=0.05")
    flags[0] = "--synthetic_num_customers=100"
    main([*flags, "--synthetic_family=long"])
    record = json.loads((output_dir / "training_run.json").read_text())
    assert record["recipe"] == "long_histories"
    training_args, data_args = record["training_args"], record["data_args"]
    assert (training_args["learning_rate"], training_args["early_stopping_patience"]) == (2e-4, 0)
    assert training_args["group_by_length"] and training_args["weight_decay"] == 0.05
    assert (data_args["train_window_min_share"], data_args["train_max_length"]) == (0.05, 4096)
    assert json.loads((output_dir / "config.json").read_text())["embedding_sum_readout"] is True


# Splits.


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    generate_synthetic_data(cache / DataArguments(synthetic_num_customers=400).synthetic_dir_name, num_customers=400)
    return cache


def test_validation_comes_from_training_customers_and_held_out_ones_are_unchanged(synthetic_data, tmp_path):
    data_args = DataArguments(synthetic_num_customers=400, data_cache_dir=str(synthetic_data))
    data = prepare_datasets(data_args, arguments(tmp_path))
    folder = synthetic_data / data_args.synthetic_dir_name
    customers = build_customer_dataset(folder / "transactions.csv", folder / "gender_train.csv")
    # The held-out split of the recipe is the one of a plain stratified split with the same seed.
    before_train, before_held_out = stratified_split(customers, data_args.eval_fraction, data_args.split_seed)
    train, validation, held_out = (set(data[part]["customer_id"]) for part in ("train", "validation", "eval"))
    assert held_out == set(before_held_out["customer_id"])
    assert train | validation == set(before_train["customer_id"]) and not train & validation
    assert len(validation) == validation_size(len(before_train), 0.1, 200) == len(before_train) // 4
    # Stratified: the validation label share is the training one, to a customer.
    share = np.mean(before_train["labels"])
    assert abs(np.sum(data["validation"]["labels"]) - share * len(validation)) <= 1
    # Without evaluation during training, nothing is held back from training.
    no_validation = prepare_datasets(data_args, arguments(tmp_path, eval_strategy="no"))
    assert no_validation["validation"] is None and len(no_validation["train"]) == len(before_train)


def test_validation_size_rule():
    assert validation_size(5000, 0.1, 200) == 500
    assert validation_size(1800, 0.1, 200) == 200
    assert validation_size(126, 0.1, 200) == 31


def test_the_synthetic_family_and_labelled_share_name_the_cache_and_reach_the_generator(tmp_path):
    default = DataArguments()
    other = DataArguments(
        synthetic_family="order",
        synthetic_labelled_fraction=0.5,
        synthetic_num_customers=60,
        data_cache_dir=str(tmp_path),
    )
    assert default.synthetic_dir_name == "synthetic-independent-n8000-seed0"
    assert other.synthetic_dir_name == "synthetic-order-n60-seed0-labelled0.5"
    transactions, labels, synthetic_dir = data_files(other)
    oracle = json.loads((synthetic_dir / "oracle.json").read_text())
    assert (
        synthetic_dir == tmp_path / other.synthetic_dir_name and transactions.parent == labels.parent == synthetic_dir
    )
    assert oracle["family"] == "order"
    assert 20 <= len(labels.read_text().splitlines()) - 1 <= 40  # about half of the 60 customers


def test_evaluating_without_a_validation_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--validation_fraction is 0"):
        main(tiny_run_flags(tmp_path / "out", tmp_path / "cache", "--validation_fraction=0", "--max_steps=1"))


# Early stopping.


@pytest.mark.parametrize("start, stop", [(0.0, 4), (0.5, 8)])
def test_early_stopping_stops_and_restores_the_best_checkpoint(tmp_path, monkeypatch, start, stop):
    """Validation AUROCs scripted per evaluation (every 2 steps of a budget of 16): the best is the first, and the
    next one, not better, stops the run (patience 1), or the first one at half of the budget (start 0.5)."""
    from txformer import training

    scripted = iter([0.8] + [0.6] * 20)

    def scripted_metrics(eval_prediction):
        return {**compute_metrics(eval_prediction), "auroc": next(scripted)}

    monkeypatch.setattr(training, "compute_metrics", scripted_metrics)
    output_dir = tmp_path / "out"
    flags = ["--max_steps=16", "--save_steps=2", "--early_stopping_patience=1", f"--early_stopping_start={start}"]
    metrics = main(tiny_run_flags(output_dir, tmp_path / "cache", *flags))
    assert metrics["train_steps"] == stop and metrics["best_global_step"] == 2
    state = json.loads((output_dir / f"checkpoint-{stop}" / "trainer_state.json").read_text())
    evaluated = [entry["step"] for entry in state["log_history"] if "eval_validation_auroc" in entry]
    assert evaluated == list(range(2, stop + 1, 2))
    final, best = load_file(output_dir / "model.safetensors"), load_file(output_dir / "checkpoint-2/model.safetensors")
    last = load_file(output_dir / f"checkpoint-{stop}" / "model.safetensors")
    assert all(torch.equal(final[name], best[name]) for name in best)
    assert not all(torch.equal(final[name], last[name]) for name in last)
    # The held-out split is evaluated once, after training, with the reported key names.
    assert {"eval_auroc", "eval_loss", "validation_auroc"} <= metrics.keys()


# Fine-tuning from a pretrained folder.


def test_a_pretrained_folder_gives_its_vocabulary_and_encoder(synthetic_data, tmp_path):
    data_args = DataArguments(synthetic_num_customers=400, data_cache_dir=str(synthetic_data))
    data = prepare_datasets(data_args, arguments(tmp_path, eval_strategy="no"))
    vocabulary = data["vocabulary"]
    config = tiny_config(
        categorical_fields=list(vocabulary.categorical_fields), categorical_vocab_sizes=list(vocabulary.vocab_sizes)
    )
    encoder = TxFormerModel(config).eval()
    folder = tmp_path / "pretrained"
    encoder.save_pretrained(folder)
    vocabulary.save_pretrained(folder)

    output_dir = tmp_path / "fine_tuned"
    main(tiny_run_flags(output_dir, tmp_path / "cache", "--max_steps=2", model_name_or_path=folder))
    # On a different data set (200 customers) the folder's vocabulary is used, not one fitted anew.
    assert EventVocabulary.from_pretrained(output_dir).to_dict() == vocabulary.to_dict()
    other_data = DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(tmp_path / "cache"))
    fitted = prepare_datasets(other_data, arguments(tmp_path, eval_strategy="no"))["vocabulary"]
    assert fitted.to_dict() != vocabulary.to_dict()

    model = build_model(ModelArguments(model_name_or_path=str(folder)), vocabulary)
    assert model.config.num_labels == 2
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.txformer.state_dict()[name], tensor), name

    # --freeze_encoder trains the head alone: the encoder's weights are saved as they were loaded.
    frozen = build_model(ModelArguments(model_name_or_path=str(folder), freeze_encoder=True), vocabulary)
    assert not any(parameter.requires_grad for parameter in frozen.txformer.parameters())
    assert all(parameter.requires_grad for parameter in frozen.classifier.parameters())
    # The last model of two steps (the first one's learning rate is 0: warm-up), frozen and not.
    unchanged = {}
    for name, flags in (("frozen", ["--freeze_encoder"]), ("tuned", [])):
        main(
            tiny_run_flags(
                tmp_path / name,
                tmp_path / "cache",
                "--max_steps=2",
                "--eval_strategy=no",
                *flags,
                model_name_or_path=folder,
            )
        )
        weights = load_file(tmp_path / name / "model.safetensors")
        unchanged[name] = [torch.equal(weights[f"txformer.{key}"], value) for key, value in encoder.named_parameters()]
    assert all(unchanged["frozen"]) and not all(unchanged["tuned"])
    with pytest.raises(ValueError, match="--freeze_encoder trains the head on the encoder of a trained or pretrained"):
        ModelArguments(freeze_encoder=True)


# Token budget.


LENGTHS = np.random.default_rng(0).lognormal(4.5, 1.2, 500).astype(int) + 1


def epoch_batches(sampler: TokenBudgetBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_bucket_ceilings_pad_a_few_percent_at_most():
    lengths = np.arange(1, 70_000)
    ceilings = bucket_ceilings(lengths)
    assert np.all(ceilings >= lengths) and np.all(ceilings - lengths < np.maximum(lengths / 16, 1))
    assert np.array_equal(ceilings[:16], lengths[:16])
    assert len(np.unique(ceilings)) < 300


@pytest.mark.parametrize("max_length", [None, 256])
def test_every_history_once_per_epoch_within_the_budget(max_length):
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=2048, seed=3, max_length=max_length)
    kept = LENGTHS if max_length is None else np.minimum(LENGTHS, max_length)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert sorted(index for batch in batches for index in batch) == list(range(len(LENGTHS)))
        for batch in batches:
            assert len(batch) == 1 or len(batch) * kept[batch].max() <= 2048
    sizes = [len(batch) for batch in batches]
    # Short histories come by the dozen, the longest alone (or as many as fit at max_length): the budget, not a
    # count, sets the size.
    assert max(sizes) > 50 and min(sizes) <= (1 if max_length is None else 2048 // max_length)
    # Most of the budget is real events.
    assert sum(kept) / (len(batches) * 2048) > 0.6


def test_batches_are_seeded_and_change_with_the_epoch():
    first, again = (TokenBudgetBatchSampler(LENGTHS, max_tokens=2048, seed=1) for _ in range(2))
    assert epoch_batches(first, 0) == epoch_batches(again, 0)
    assert epoch_batches(first, 1) == epoch_batches(again, 1)
    assert epoch_batches(first, 0) != epoch_batches(first, 1)
    assert epoch_batches(TokenBudgetBatchSampler(LENGTHS, max_tokens=2048, seed=2), 0) != epoch_batches(first, 0)
    # Not only the order of the batches changes: histories of a bucket meet other histories.
    assert {tuple(sorted(batch)) for batch in epoch_batches(first, 0)} != {
        tuple(sorted(batch)) for batch in epoch_batches(first, 1)
    }


def test_each_process_of_a_launch_gets_its_own_batches():
    """What `accelerator.prepare` does to the training loader on each of 2 processes."""
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=2048, seed=1)
    per_rank = []
    for rank in range(2):
        loader = DataLoader(list(range(len(LENGTHS))), batch_sampler=sampler, collate_fn=list)
        prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        prepared.set_epoch(0)
        per_rank.append(list(prepared))
    assert len(per_rank[0]) == len(per_rank[1]) == steps_per_epoch(len(sampler), world_size=2)
    batches = epoch_batches(sampler, 0)
    # Round-robin: rank r takes batches r, r + 2, ...; an odd count repeats the epoch's first batch at the end.
    assert per_rank[0][: len(batches[0::2])] == batches[0::2]
    assert per_rank[1][: len(batches[1::2])] == batches[1::2]
    seen = [index for rank in per_rank for batch in rank for index in batch]
    assert set(seen) == set(range(len(LENGTHS)))


def test_token_budget_training_and_resuming(tmp_path):
    """Steps per epoch come from the sampler; a run resumed from its checkpoint ends as the uninterrupted one."""
    flags = [
        "--max_tokens_per_batch=128",
        "--num_train_epochs=1",
        "--min_train_steps=1",
        "--eval_strategy=no",
        "--save_steps=3",
        "--save_total_limit=100",
        "--logging_steps=1",
    ]
    straight = tmp_path / "straight"
    metrics = main(tiny_run_flags(straight, tmp_path / "cache", *flags))
    data_args = DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(tmp_path / "cache"))
    train = prepare_datasets(data_args, arguments(tmp_path, eval_strategy="no"))["train"]
    sampler = TokenBudgetBatchSampler(train["num_events"], max_tokens=128, max_length=32)
    assert metrics["train_steps"] == len(sampler) == metrics["train_max_steps"] > len(train) // 8
    records = [json.loads(line) for line in (straight / "profile_steps.jsonl").read_text().splitlines()]
    assert all(record["tokens"] <= 128 for record in records)
    assert len({record["samples"] for record in records}) > 1

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    main(tiny_run_flags(resumed, tmp_path / "cache", *flags, "--resume_from_checkpoint=last"))
    final, expected = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_training_windows_are_cut_to_train_max_length_and_evaluation_reads_whole_histories(tmp_path):
    """Training batches hold windows of at most `--train_max_length` events; the saved processor (what evaluation and
    inference read) keeps whole histories, and the budget counts the shorter windows' token batches."""
    flags = ["--max_length=0", "--train_max_length=16", "--max_tokens_per_batch=64", "--logging_steps=1"]
    flags += ["--num_train_epochs=1", "--min_train_steps=1", "--eval_strategy=no"]
    output_dir = tmp_path / "out"
    metrics = main(tiny_run_flags(output_dir, tmp_path / "cache", *flags))
    records = [json.loads(line) for line in (output_dir / "profile_steps.jsonl").read_text().splitlines()]
    assert max(record["tokens"] / record["samples"] for record in records) <= 16
    assert max(record["samples"] for record in records) == 4
    assert json.loads((output_dir / "preprocessor_config.json").read_text())["max_length"] is None
    data_args = DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(tmp_path / "cache"))
    train = prepare_datasets(data_args, arguments(tmp_path, eval_strategy="no"))["train"]
    assert metrics["train_steps"] == len(TokenBudgetBatchSampler(train["num_events"], max_tokens=64, max_length=16))


def test_the_training_window_is_the_shorter_of_the_two_lengths():
    assert DataArguments(max_length=0, train_max_length=512).train_window_length == 512
    assert DataArguments(max_length=256, train_max_length=512).train_window_length == 256
    assert DataArguments(max_length=256, train_max_length=0).train_window_length == 256
    assert DataArguments(max_length=0).train_window_length is None
    with pytest.raises(ValueError, match="--train_max_length must be positive"):
        DataArguments(train_max_length=-1)


def test_concurrent_generation_of_the_same_synthetic_data_is_safe(tmp_path):
    script = (
        "import sys; from txformer.training import DataArguments, data_files; "
        f"data_files(DataArguments(synthetic_num_customers=50, data_cache_dir={str(tmp_path)!r}))"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(3)]
    errors = [process.communicate(timeout=120)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], errors
    assert sorted(path.name for path in tmp_path.iterdir()) == ["synthetic-independent-n50-seed0"]
    assert (tmp_path / "synthetic-independent-n50-seed0" / "oracle.json").exists()


def test_an_output_folder_of_another_run_is_refused_unless_overwritten(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "all_results.json").write_text("{}")
    flags = tiny_run_flags(output_dir, tmp_path / "cache", "--max_steps=2", "--eval_strategy=no")
    with pytest.raises(ValueError, match="already holds files of another run"):
        main(flags)
    assert (output_dir / "all_results.json").read_text() == "{}"
    main([*flags, "--overwrite_output_dir=true"])
    assert "eval_auroc" in json.loads((output_dir / "all_results.json").read_text())


def test_resuming_from_a_checkpoint_of_another_kind_is_refused(tmp_path):
    output_dir = tmp_path / "out"
    flags = tiny_run_flags(output_dir, tmp_path / "cache", "--max_steps=2", "--eval_strategy=no", "--save_steps=1")
    main([*flags, "--attention_type=performer"])
    with pytest.raises(ValueError, match="holds another model .*attention_type: 'performer' there, 'full' here"):
        main([*flags, "--resume_from_checkpoint=last"])


def test_held_out_predictions_are_written_in_customer_order_with_their_metrics(tmp_path):
    """With length-grouped evaluation batches the Trainer returns the predictions out of order: the file puts them
    back with their customers, equal to scoring the saved model afresh, and gives the run's metrics exactly."""
    output_dir, cache_dir = tmp_path / "out", tmp_path / "cache"
    flags = ["--max_steps=2", "--eval_strategy=no", "--group_by_length=true", "--per_device_eval_batch_size=8"]
    metrics = main(tiny_run_flags(output_dir, cache_dir, *flags))
    customer_ids, labels, probabilities = read_evaluated_predictions(output_dir / EVAL_PREDICTIONS_FILE)
    data_args = DataArguments(synthetic_num_customers=NUM_CUSTOMERS, data_cache_dir=str(cache_dir), max_length=32)
    held_out = prepare_datasets(
        data_args, arguments(tmp_path, eval_strategy="no"), EventVocabulary.from_pretrained(output_dir)
    )["eval"]
    assert customer_ids.tolist() == held_out["customer_id"] and labels.tolist() == held_out["labels"]
    assert {f"eval_{name}": value for name, value in classification_metrics(labels, probabilities).items()} == {
        name: metrics[name] for name in ("eval_auroc", "eval_accuracy", "eval_log_loss")
    }
    vocabulary = EventVocabulary.from_pretrained(output_dir)
    collator = TransactionCollator(list(vocabulary.categorical_fields), list(vocabulary.numeric_fields), max_length=32)
    rescored = predict_probabilities(load_model(str(output_dir)), held_out, collator, 64, torch.device("cpu"))
    np.testing.assert_allclose(probabilities, rescored, rtol=1e-5)


def test_the_model_reads_the_terminal_only_when_asked(synthetic_data, tmp_path):
    def fields(*categorical_fields: str) -> list[str]:
        flags = {"categorical_fields": list(categorical_fields)} if categorical_fields else {}
        data_args = DataArguments(synthetic_num_customers=400, data_cache_dir=str(synthetic_data), **flags)
        return prepare_datasets(data_args, arguments(tmp_path, eval_strategy="no"))["vocabulary"].categorical_fields

    assert fields() == ["mcc_code", "tr_type"]
    assert fields("mcc_code", "tr_type", "term_id") == ["mcc_code", "tr_type", "term_id"]
    with pytest.raises(ValueError, match="terminal"):
        fields("mcc_code", "terminal")
