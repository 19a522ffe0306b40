"""ProfilingCallback: one complete JSON line per optimizer step, exact real-event counts, summary and logged figures."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from txformer.file_names import PROFILE_STEPS_FILE, PROFILE_SUMMARY_FILE
from txformer.profiling import (
    ProfilingCallback,
    add_profiling_callback,
    aggregate_rank_summaries,
    summarize_steps,
)


NUM_SEQUENCES = 28
BATCH_SIZE = 4
VOCAB_SIZE = 16
PROFILE_KEYS = {
    "profile/step_time_s",
    "profile/data_time_s",
    "profile/samples_per_s",
    "profile/tokens_per_s",
    "profile/peak_memory_mib",
}


def sequence_lengths(num_sequences: int = NUM_SEQUENCES) -> list[int]:
    """Uneven history lengths (1 to 13 events), so every batch has padding."""
    return [(index * 7) % 13 + 1 for index in range(num_sequences)]


class LengthsDataset(Dataset):
    """Sequences of known lengths with random event ids and a binary label."""

    def __init__(self, lengths: list[int]):
        generator = torch.Generator().manual_seed(0)
        self.items = [
            {"input_ids": torch.randint(1, VOCAB_SIZE, (length,), generator=generator), "labels": float(index % 2)}
            for index, length in enumerate(lengths)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def pad_collator(items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads `input_ids` to the longest sequence of the batch and adds the `attention_mask`."""
    max_length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.zeros(len(items), max_length, dtype=torch.long)
    attention_mask = torch.zeros(len(items), max_length, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item["input_ids"])] = item["input_ids"]
        attention_mask[row, : len(item["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([item["labels"] for item in items]),
    }


class MeanPoolClassifier(torch.nn.Module):
    """Embeds events, mean-pools the real ones and predicts a logit."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB_SIZE, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1)
        logits = self.head(pooled).squeeze(-1)
        return {"loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, labels), "logits": logits}


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    """Quiet CPU arguments that visit the data in order, so that each step's batches are known."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE,
        num_train_epochs=1,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def expected_steps(lengths: list[int], gradient_accumulation_steps: int) -> list[dict[str, int]]:
    """Micro-batches, samples and real events of each optimizer step under in-order batching."""
    batches = [lengths[start : start + BATCH_SIZE] for start in range(0, len(lengths), BATCH_SIZE)]
    steps = [
        batches[start : start + gradient_accumulation_steps]
        for start in range(0, len(batches), gradient_accumulation_steps)
    ]
    return [
        {"micro_batches": len(step), "samples": sum(map(len, step)), "tokens": sum(map(sum, step))} for step in steps
    ]


def read_steps(path: Path) -> list[dict]:
    """Records of a steps file, checking that every line is complete."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def accumulation_run(tmp_path_factory) -> tuple[Trainer, Path]:
    """Gradient accumulation 2 over 7 batches (4 optimizer steps, the last of one micro-batch) with evaluations."""
    output_dir = tmp_path_factory.mktemp("accumulation")
    dataset = LengthsDataset(sequence_lengths())
    args = training_args(output_dir, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = Trainer(
        model=MeanPoolClassifier(),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        data_collator=pad_collator,
        callbacks=[ProfilingCallback()],
    )
    trainer.train()
    return trainer, output_dir


def test_one_complete_line_per_optimizer_step_with_exact_real_event_counts(accumulation_run):
    _, output_dir = accumulation_run
    records = read_steps(output_dir / PROFILE_STEPS_FILE)
    expected = expected_steps(sequence_lengths(), gradient_accumulation_steps=2)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [{key: record[key] for key in ("micro_batches", "samples", "tokens")} for record in records] == expected
    # Padding is not counted: each step holds fewer real events than padded positions.
    assert all(record["tokens"] < record["samples"] * 13 for record in records)
    for record in records:
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["step_time_s"], rel=1e-3)
        assert record["step_time_s"] > 0 and record["data_time_s"] >= 0 and record["peak_memory_mib"] > 0


def test_real_events_are_the_trainers_own_non_padding_count(accumulation_run, tmp_path):
    """The callback turns on the Trainer's count (attention_mask sums) and takes each step's share of it; a count that
    includes padding is not recorded as real events."""
    trainer, output_dir = accumulation_run
    assert trainer.args.include_num_input_tokens_seen == "non_padding"
    records = read_steps(output_dir / PROFILE_STEPS_FILE)
    assert (
        trainer.state.num_input_tokens_seen == sum(record["tokens"] for record in records) == sum(sequence_lengths())
    )
    Trainer(
        model=MeanPoolClassifier(),
        args=training_args(tmp_path, include_num_input_tokens_seen="all", max_steps=2),
        train_dataset=LengthsDataset(sequence_lengths()),
        data_collator=pad_collator,
        callbacks=[ProfilingCallback()],
    ).train()
    assert [record["tokens"] for record in read_steps(tmp_path / PROFILE_STEPS_FILE)] == [None, None]
    assert json.loads((tmp_path / PROFILE_SUMMARY_FILE).read_text())["tokens_total"] is None


def test_summary_has_statistics_environment_and_overhead(accumulation_run):
    _, output_dir = accumulation_run
    summary = json.loads((output_dir / PROFILE_SUMMARY_FILE).read_text())
    assert summary["num_steps"] == 4 and summary["world_size"] == 1 and summary["excluded_warmup_steps"] == 2
    assert summary["per_rank"][0]["num_steps_in_statistics"] == 2
    assert set(summary["step_time_s"]) == {"median", "mean", "p10", "p90", "p99"}
    assert summary["tokens_total"] == sum(sequence_lengths())
    assert (
        summary["samples_per_s_median"] > 0 and summary["tokens_per_s_median"] > 0 and summary["peak_memory_mib"] > 0
    )
    assert {"cpu_model", "cpu_count", "gpu_count", "gpu_names", "memory_total_mib"} <= set(summary["hardware"])
    assert {"python", "torch", "transformers", "accelerate", "datasets", "txformer"} <= set(summary["software"])
    assert summary["training"]["gradient_accumulation_steps"] == 2
    assert "model_config" in summary
    overhead = summary["callback_overhead_fraction"]
    assert math.isfinite(overhead) and overhead >= 0  # the < 2 % target is reported, not asserted: timing is noisy


def test_profile_figures_reach_log_history_but_not_evaluation_logs(accumulation_run):
    trainer, _ = accumulation_run
    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(training_logs) == 4
    assert all(PROFILE_KEYS <= set(entry) for entry in training_logs)
    evaluation_logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluation_logs and not any(PROFILE_KEYS & set(entry) for entry in evaluation_logs)


class LogRecorder(TrainerCallback):
    """Keeps a copy of every `logs` dict it is handed, as a reporting integration would see it."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_dataloader_workers_and_reporting_callbacks(tmp_path):
    """Counts stay exact with worker processes; callbacks after the profiler (integrations) see its figures."""
    recorder = LogRecorder()
    trainer = Trainer(
        model=MeanPoolClassifier(),
        args=training_args(tmp_path, dataloader_num_workers=2, logging_steps=3),
        train_dataset=LengthsDataset(sequence_lengths()),
        data_collator=pad_collator,
        callbacks=[recorder],
    )
    add_profiling_callback(trainer)
    trainer.train()
    records = read_steps(tmp_path / PROFILE_STEPS_FILE)
    assert [record["tokens"] for record in records] == [
        step["tokens"] for step in expected_steps(sequence_lengths(), 1)
    ]
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert step_logs and all(PROFILE_KEYS <= set(logs) for logs in step_logs)


def test_resumed_run_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    dataset = LengthsDataset(sequence_lengths())
    args = training_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = Trainer(
        model=MeanPoolClassifier(),
        args=args,
        train_dataset=dataset,
        data_collator=pad_collator,
        callbacks=[ProfilingCallback()],
    )
    trainer.train()
    assert [record["step"] for record in read_steps(tmp_path / PROFILE_STEPS_FILE)] == [1, 2, 3, 4, 5, 6, 7]
    trainer = Trainer(
        model=MeanPoolClassifier(),
        args=args,
        train_dataset=dataset,
        data_collator=pad_collator,
        callbacks=[ProfilingCallback()],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    records = read_steps(tmp_path / PROFILE_STEPS_FILE)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6, 7]
    assert json.loads((tmp_path / PROFILE_SUMMARY_FILE).read_text())["num_steps"] == 3


def test_txformer_model_and_collator_train_with_profiling(tmp_path):
    """The package's own classifier and collator: its real events are counted like any other model's."""
    from conftest import tiny_config

    from txformer import TxFormerForSequenceClassification
    from txformer.data import TransactionCollator

    config = tiny_config(num_labels=2)
    lengths = sequence_lengths(8)
    generator = np.random.default_rng(0)
    customers = [
        {
            **{
                name: generator.integers(1, size, length).tolist()
                for name, size in zip(config.categorical_fields, config.categorical_vocab_sizes, strict=True)
            },
            **{name: generator.normal(size=length).tolist() for name in config.numeric_fields},
            "event_time": np.cumsum(generator.uniform(0, 2, length)).tolist(),
            "labels": index % 2,
        }
        for index, length in enumerate(lengths)
    ]
    collator = TransactionCollator(categorical_fields=config.categorical_fields, numeric_fields=config.numeric_fields)
    trainer = Trainer(
        model=TxFormerForSequenceClassification(config),
        args=training_args(tmp_path, remove_unused_columns=False),
        train_dataset=customers,
        data_collator=collator,
        callbacks=[ProfilingCallback()],
    )
    trainer.train()
    assert [record["tokens"] for record in read_steps(tmp_path / PROFILE_STEPS_FILE)] == [
        step["tokens"] for step in expected_steps(lengths, 1)
    ]
    summary = json.loads((tmp_path / PROFILE_SUMMARY_FILE).read_text())
    assert summary["model_config"]["model_type"] == config.model_type


TWO_RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[2])
    from test_profiling import LengthsDataset, MeanPoolClassifier, pad_collator, sequence_lengths, training_args
    from transformers import Trainer

    from txformer.profiling import ProfilingCallback

    args = training_args(Path(sys.argv[1]), gradient_accumulation_steps=2, ddp_backend="gloo")
    Trainer(
        model=MeanPoolClassifier(),
        args=args,
        train_dataset=LengthsDataset(sequence_lengths(2 * NUM_SEQUENCES)),
        data_collator=pad_collator,
        callbacks=[ProfilingCallback()],
    ).train()
    """
).replace("NUM_SEQUENCES", str(NUM_SEQUENCES))


def test_two_ranks_write_their_own_steps_and_one_gathered_summary(tmp_path):
    """`torchrun` with two CPU processes (gloo): per-rank files, one summary gathered over both ranks."""
    tests_dir = Path(__file__).parent
    script = tmp_path / "train_two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    environment = {**os.environ, "PYTHONPATH": str(tests_dir.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, str(script), str(tmp_path), str(tests_dir)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank_records = [read_steps(tmp_path / f"profile_steps.rank{rank}.jsonl") for rank in (0, 1)]
    assert not (tmp_path / PROFILE_STEPS_FILE).exists()
    assert all([record["step"] for record in records] == [1, 2, 3, 4] for records in rank_records)
    summary = json.loads((tmp_path / PROFILE_SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and [rank["rank"] for rank in summary["per_rank"]] == [0, 1]
    # Every rank records the real events of both ranks (the Trainer gathers its count), per step and in all.
    assert [record["tokens"] for record in rank_records[0]] == [record["tokens"] for record in rank_records[1]]
    assert [rank["tokens_total"] for rank in summary["per_rank"]] == [sum(sequence_lengths(2 * NUM_SEQUENCES))] * 2
    assert summary["tokens_total"] == sum(sequence_lengths(2 * NUM_SEQUENCES))


def test_summarize_steps_excludes_warmup_steps_from_statistics():
    summary = summarize_steps(
        step_time_s=[10.0, 5.0, 1.0, 2.0, 3.0],
        data_time_s=[1.0, 1.0, 0.1, 0.1, 0.1],
        samples=[4, 4, 4, 4, 4],
        tokens=[40, 40, 10, 20, 30],
        peak_memory_mib=[500.0, 100.0, 100.0, 200.0, 100.0],
        excluded_warmup_steps=2,
    )
    assert summary["num_steps"] == 5 and summary["num_steps_in_statistics"] == 3
    assert summary["step_time_s"]["median"] == 2.0
    assert summary["step_time_s"]["p99"] == pytest.approx(np.percentile([1.0, 2.0, 3.0], 99))
    assert summary["samples_per_s_median"] == 2.0 and summary["tokens_per_s_median"] == 10.0
    assert summary["tokens_total"] == 140 and summary["peak_memory_mib"] == 500.0  # both keep the warm-up steps


def test_summarize_steps_without_real_event_counts_reports_no_tokens():
    summary = summarize_steps([1.0], [0.0], [4], [float("nan")], [1.0], excluded_warmup_steps=2)
    assert summary["num_steps_in_statistics"] == 1
    assert summary["tokens_per_s_median"] is None and summary["tokens_total"] is None
    assert summary["samples_total"] == 4


def test_summarize_steps_with_unseen_batches_reports_no_counts():
    nan = float("nan")
    summary = summarize_steps([1.0, 1.0], [0.0, 0.0], [nan, nan], [nan, nan], [1.0, 1.0], excluded_warmup_steps=0)
    assert summary["samples_total"] is None and summary["samples_per_s_median"] is None
    assert summary["step_time_s"]["median"] == 1.0


def fake_rank_summary(rank: int, step_time_median: float, tokens_per_s: float, peak_memory_mib: float) -> dict:
    """A per-rank summary as `ProfilingCallback.rank_summary` builds it, with chosen figures."""
    step_time = {
        "median": step_time_median,
        "mean": step_time_median,
        "p10": 0.5,
        "p90": 2 * step_time_median,
        "p99": 3.0,
    }
    return {
        "rank": rank,
        "host": f"node{rank // 2}",
        "num_steps": 10,
        "num_steps_in_statistics": 8,
        "step_time_s": step_time,
        "data_time_s": {key: 0.01 for key in step_time},
        "samples_per_s_median": tokens_per_s / 100,
        "tokens_per_s_median": tokens_per_s,
        "samples_total": 40,
        "tokens_total": 4000,
        "peak_memory_mib": peak_memory_mib,
        "memory_source": "cuda_max_memory_allocated",
        "callback_overhead_s": 0.01,
        "callback_overhead_fraction": 0.001 * (rank + 1),
    }


def test_aggregate_rank_summaries_sums_samples_and_takes_the_pace_of_the_slowest_rank():
    """Each rank counts its own samples but the events of all ranks, over its own step time."""
    ranks = [fake_rank_summary(1, 1.2, 900.0, 2048.0), fake_rank_summary(0, 1.0, 1000.0, 1024.0)]
    aggregate = aggregate_rank_summaries(ranks)
    assert aggregate["world_size"] == 2
    assert aggregate["tokens_per_s_median"] == 900.0 and aggregate["samples_per_s_median"] == 19.0
    assert aggregate["samples_total"] == 80 and aggregate["tokens_total"] == 4000
    assert aggregate["peak_memory_mib"] == 2048.0
    assert aggregate["step_time_s"]["median"] == 1.2 and aggregate["step_time_s"]["p90"] == 2.4
    assert aggregate["callback_overhead_fraction"] == 0.002
    assert [summary["rank"] for summary in aggregate["per_rank"]] == [0, 1]
    assert [summary["step_time_s"]["median"] for summary in aggregate["per_rank"]] == [1.0, 1.2]


def test_aggregate_rank_summaries_with_a_rank_without_tokens():
    ranks = [fake_rank_summary(0, 1.0, 1000.0, 1.0), fake_rank_summary(1, 1.0, 1000.0, 1.0)]
    ranks[1].update(tokens_per_s_median=None, tokens_total=None)
    aggregate = aggregate_rank_summaries(ranks)
    assert aggregate["tokens_per_s_median"] is None and aggregate["tokens_total"] is None
