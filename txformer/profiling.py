"""Profiling of HF `Trainer` runs: step time, data time, real-event throughput and peak memory per optimizer step."""

import json
import logging
import math
import socket
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .file_names import PROFILE_SUMMARY_FILE, profile_steps_file
from .io_utils import atomic_write, atomic_write_json
from .machine import describe_hardware, describe_software, memory_probe_for


logger = logging.getLogger(__name__)

# The Trainer's count of real events: the `attention_mask` sum of every training micro-batch.
NON_PADDING_TOKENS = "non_padding"
STEP_TIME_PERCENTILES = (10, 90, 99)


def _distribution(values: np.ndarray) -> dict[str, float | None]:
    """Median, mean and the step-time percentiles of `values`, ignoring NaNs; all None when none is finite."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"median": None, "mean": None, **{f"p{q}": None for q in STEP_TIME_PERCENTILES}}
    percentiles = np.percentile(values, STEP_TIME_PERCENTILES)
    return {
        "median": float(np.median(values)),
        "mean": float(np.mean(values)),
        **{f"p{q}": float(value) for q, value in zip(STEP_TIME_PERCENTILES, percentiles, strict=True)},
    }


def summarize_steps(
    step_time_s: Sequence[float],
    data_time_s: Sequence[float],
    samples: Sequence[float],
    tokens: Sequence[float],
    peak_memory_mib: Sequence[float],
    excluded_warmup_steps: int,
) -> dict[str, Any]:
    """Statistics of one rank's steps without the first `excluded_warmup_steps`; totals and peak memory keep them all.

    `samples` and `tokens` hold NaN for steps whose counts are unknown (no forward call seen; the Trainer counting
    padding too); totals over such steps are None. When every step is a warm-up step, the statistics use all steps and
    `num_steps_in_statistics` says so.
    """
    num_steps = len(step_time_s)
    first = excluded_warmup_steps if num_steps > excluded_warmup_steps else 0
    step_time = np.asarray(step_time_s, dtype=np.float64)
    sample_counts = np.asarray(samples, dtype=np.float64)
    token_counts = np.asarray(tokens, dtype=np.float64)
    peaks = np.asarray(peak_memory_mib, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples_per_s = sample_counts[first:] / step_time[first:]
        tokens_per_s = token_counts[first:] / step_time[first:]
    return {
        "num_steps": num_steps,
        "num_steps_in_statistics": num_steps - first,
        "step_time_s": _distribution(step_time[first:]),
        "data_time_s": _distribution(np.asarray(data_time_s, dtype=np.float64)[first:]),
        "samples_per_s_median": _distribution(samples_per_s)["median"],
        "tokens_per_s_median": _distribution(tokens_per_s)["median"],
        "samples_total": int(np.sum(sample_counts)) if np.all(np.isfinite(sample_counts)) else None,
        "tokens_total": int(np.sum(token_counts)) if np.all(np.isfinite(token_counts)) else None,
        "peak_memory_mib": float(np.max(peaks)) if peaks.size else None,
    }


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else sum(values)


def _max_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def _min_or_none(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else min(values)


def aggregate_rank_summaries(rank_summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of all ranks: samples per second summed, peak memory and step-time statistics at their maximum.

    Ranks synchronise at every gradient all-reduce, so the slowest rank sets the pace: each step-time statistic is
    the largest of the ranks' values, and the events per second (every rank counts the events of all ranks) the
    smallest. The per-rank summaries are listed, ordered by rank, under `per_rank`.
    """
    ordered = sorted(rank_summaries, key=lambda summary: summary["rank"])
    step_time_keys = ordered[0]["step_time_s"].keys()
    return {
        "world_size": len(ordered),
        "num_steps": max(summary["num_steps"] for summary in ordered),
        "step_time_s": {key: _max_or_none([rank["step_time_s"][key] for rank in ordered]) for key in step_time_keys},
        "data_time_s": {key: _max_or_none([rank["data_time_s"][key] for rank in ordered]) for key in step_time_keys},
        "samples_per_s_median": _sum_or_none([summary["samples_per_s_median"] for summary in ordered]),
        "tokens_per_s_median": _min_or_none([summary["tokens_per_s_median"] for summary in ordered]),
        "samples_total": _sum_or_none([summary["samples_total"] for summary in ordered]),
        "tokens_total": _min_or_none([summary["tokens_total"] for summary in ordered]),
        "peak_memory_mib": _max_or_none([summary["peak_memory_mib"] for summary in ordered]),
        "callback_overhead_fraction": _max_or_none([summary["callback_overhead_fraction"] for summary in ordered]),
        "per_rank": ordered,
    }


def _complete_records_up_to(path: Path, last_step: int) -> list[str]:
    """Lines of a steps file that parse as JSON and belong to steps up to `last_step` (a torn last line is dropped)."""
    kept = []
    with open(path, encoding="utf-8") as steps_file:
        for line in steps_file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if line.endswith("\n") and record.get("step", last_step + 1) <= last_step:
                kept.append(line)
    return kept


class ProfilingCallback(TrainerCallback):
    """Measures every optimizer step of a `Trainer` run and writes a JSON-lines log and a summary to `output_dir`.

    Step time runs from `on_step_begin` to `on_step_end` (after a device synchronize on CUDA and MPS). The Trainer
    fetches all micro-batches of an optimizer step before `on_step_begin`, so data loading lies outside that span: it
    is recorded as `data_time_s`, the time from the Trainer's last hook before the step (previous step end, log,
    evaluation, checkpoint or epoch start) to the step's start.

    Real (non-padding) events are the Trainer's own count, `include_num_input_tokens_seen="non_padding"` (the
    `attention_mask` sum of every training micro-batch, gathered over the processes), which this callback turns on
    when it is off: a step's `tokens` is what `state.num_input_tokens_seen` grew by during the step. Samples are
    counted by a forward pre-hook that this callback puts on the model at `on_train_begin` and removes at
    `on_train_end`: it reads the rows of every forward call made between `on_step_begin` and `on_step_end`, so all
    micro-batches of a gradient-accumulation step are summed, evaluation batches are left out, and dataloader workers,
    prefetching and distributed sharding make no difference.
    """

    def __init__(self, excluded_warmup_steps: int = 2, max_buffered_steps: int = 100):
        self.excluded_warmup_steps = excluded_warmup_steps
        self.max_buffered_steps = max_buffered_steps

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Opens the steps file (emptied on a fresh run, cut to the resumed step on a resumed one), hooks the model."""
        self.output_dir = Path(args.output_dir)
        self.rank = args.process_index
        self.world_size = args.world_size
        self.steps_path = self.output_dir / profile_steps_file(self.rank, self.world_size)
        kept_lines = _complete_records_up_to(self.steps_path, state.global_step) if self.steps_path.exists() else []
        atomic_write(self.steps_path, lambda steps_file: steps_file.writelines(kept_lines))
        if state.is_world_process_zero:
            (self.output_dir / PROFILE_SUMMARY_FILE).unlink(missing_ok=True)
        self.steps_file = open(self.steps_path, "ab")
        self.pending_lines: list[str] = []
        if args.include_num_input_tokens_seen == "no":
            args.include_num_input_tokens_seen = NON_PADDING_TOKENS
        self.counts_tokens = args.include_num_input_tokens_seen == NON_PADDING_TOKENS
        if not self.counts_tokens:
            logger.warning(
                "include_num_input_tokens_seen=%r counts padding too: the profile records no real-event counts.",
                args.include_num_input_tokens_seen,
            )
        self.model = kwargs["model"]
        # Disabled for torch.compile: the hook's bookkeeping runs eagerly instead of breaking the compiled graph.
        count_batch = torch.compiler.disable(self._count_batch)
        self.forward_hook = self.model.register_forward_pre_hook(count_batch, with_kwargs=True)
        self.memory_probe = memory_probe_for(args.device)
        # Compact columns of every step of this run (8 bytes a value), for the summary and the log-interval means.
        self.step_time_s = array("d")
        self.data_time_s = array("d")
        self.samples = array("d")
        self.tokens = array("d")
        self.peak_memory_mib = array("d")
        self.overhead_s = 0.0
        self.in_step = False
        self.steps_logged = 0
        self.last_trainer_hook_time = time.perf_counter()

    def _count_batch(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: notes the batch's rows (of `attention_mask`, else of the first tensor argument)."""
        if not self.in_step:
            return
        start = time.perf_counter()
        attention_mask = kwargs.get("attention_mask")
        first_tensor = (
            attention_mask
            if isinstance(attention_mask, torch.Tensor)
            else next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        )
        self.step_rows.append(0 if first_tensor is None or first_tensor.dim() == 0 else first_tensor.shape[0])
        self.overhead_s += time.perf_counter() - start

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Marks the start of the data wait of the epoch's first step."""
        self.last_trainer_hook_time = time.perf_counter()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Starts the step's clock and memory window."""
        entry = time.perf_counter()
        self.memory_probe.synchronize()
        self.memory_probe.reset()
        # Rows of each forward call; appends only, so DataParallel's replica threads are safe.
        self.step_rows: list[int] = []
        self.step_tokens_start = state.num_input_tokens_seen
        self.step_micro_batches = 1
        self.in_step = True
        self.step_start = time.perf_counter()
        self.step_data_time_s = entry - self.last_trainer_hook_time
        self.overhead_s += self.step_start - entry

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Counts a micro-batch that did not end the optimizer step."""
        self.step_micro_batches += 1

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Stops the clock, reads memory and the event counts, and buffers the step's JSON line."""
        self.memory_probe.synchronize()
        step_end = time.perf_counter()
        self.in_step = False
        step_time_s = step_end - self.step_start
        memory = self.memory_probe.read()
        # No forward call seen (a custom loop calling another module): the count is unknown, not zero.
        samples = sum(self.step_rows) if self.step_rows else None
        tokens = int(state.num_input_tokens_seen - self.step_tokens_start) if self.counts_tokens else None
        self.step_time_s.append(step_time_s)
        self.data_time_s.append(self.step_data_time_s)
        self.samples.append(float("nan") if samples is None else samples)
        self.tokens.append(float("nan") if tokens is None else tokens)
        self.peak_memory_mib.append(memory["peak_memory_mib"])
        record = {
            "step": state.global_step,
            "rank": self.rank,
            "micro_batches": self.step_micro_batches,
            "step_time_s": round(step_time_s, 7),
            "data_time_s": round(self.step_data_time_s, 7),
            "samples": samples,
            "tokens": tokens,
            "samples_per_s": None if samples is None else round(samples / step_time_s, 3),
            "tokens_per_s": None if tokens is None else round(tokens / step_time_s, 3),
            **{key: round(value, 3) for key, value in memory.items()},
            "memory_source": self.memory_probe.source,
        }
        self.pending_lines.append(json.dumps(record) + "\n")
        if len(self.pending_lines) >= self.max_buffered_steps:
            self._flush()
        self.last_trainer_hook_time = time.perf_counter()
        self.overhead_s += self.last_trainer_hook_time - step_end

    def _flush(self) -> None:
        """Appends the buffered complete lines in one write."""
        if self.pending_lines:
            self.steps_file.write("".join(self.pending_lines).encode("utf-8"))
            self.steps_file.flush()
            self.pending_lines = []

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs
    ):
        """Adds the `profile/*` figures of the steps since the last log to `logs` and to its `state.log_history` entry.

        Step and data time are means, throughput is events over step time, peak memory is the window's maximum.
        Callbacks placed after this one (see `add_profiling_callback`) see the figures in `logs`.
        """
        start = time.perf_counter()
        first = self.steps_logged
        if logs is not None and len(self.step_time_s) > first:
            step_time_total = sum(self.step_time_s[first:])
            figures = {
                "profile/step_time_s": step_time_total / (len(self.step_time_s) - first),
                "profile/data_time_s": sum(self.data_time_s[first:]) / (len(self.step_time_s) - first),
                "profile/peak_memory_mib": max(self.peak_memory_mib[first:]),
            }
            for name, counts in (("samples", self.samples), ("tokens", self.tokens)):
                count_total = sum(counts[first:])
                if not math.isnan(count_total):  # NaN when a step's count is unknown
                    figures[f"profile/{name}_per_s"] = count_total / step_time_total
            logs.update(figures)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(figures)
            self.steps_logged = len(self.step_time_s)
        self._flush()
        self.last_trainer_hook_time = time.perf_counter()
        self.overhead_s += self.last_trainer_hook_time - start

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Marks the end of an evaluation, so that it does not count as data time."""
        self.last_trainer_hook_time = time.perf_counter()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Flushes the steps file next to the checkpoint and marks the end of the save."""
        start = time.perf_counter()
        self._flush()
        self.last_trainer_hook_time = time.perf_counter()
        self.overhead_s += self.last_trainer_hook_time - start

    def rank_summary(self) -> dict[str, Any]:
        """Statistics of this rank's steps, with its callback overhead as a fraction of its total step time."""
        summary = summarize_steps(
            self.step_time_s,
            self.data_time_s,
            self.samples,
            self.tokens,
            self.peak_memory_mib,
            self.excluded_warmup_steps,
        )
        step_time_total = sum(self.step_time_s)
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            **summary,
            "memory_source": self.memory_probe.source,
            "callback_overhead_s": self.overhead_s,
            "callback_overhead_fraction": self.overhead_s / step_time_total if step_time_total > 0 else None,
        }

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Closes the steps file, gathers the rank summaries (a collective: every rank) and writes the summary on rank 0."""
        self._flush()
        self.steps_file.close()
        self.forward_hook.remove()
        self.memory_probe.close()
        rank_summaries = [self.rank_summary()]
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rank_summaries[0])
            rank_summaries = gathered
        if not state.is_world_process_zero:
            return
        model_config = getattr(self.model, "config", None)
        summary = {
            **aggregate_rank_summaries(rank_summaries),
            "excluded_warmup_steps": self.excluded_warmup_steps,
            "training": {
                "world_size": self.world_size,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "dataloader_num_workers": args.dataloader_num_workers,
                "device": str(args.device),
            },
            "hardware": describe_hardware(),
            "software": describe_software(),
            "model_config": model_config.to_diff_dict() if hasattr(model_config, "to_diff_dict") else None,
        }
        atomic_write_json(self.output_dir / PROFILE_SUMMARY_FILE, summary)


def add_profiling_callback(trainer: Trainer, callback: ProfilingCallback | None = None) -> ProfilingCallback:
    """Puts a profiling callback first in `trainer`'s callbacks, so that TensorBoard/W&B callbacks log its figures.

    The Trainer places its reporting integrations before the callbacks passed to it; those would log `logs` before
    this callback adds its `profile/*` keys.
    """
    callback = ProfilingCallback() if callback is None else callback
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["ProfilingCallback", "add_profiling_callback", "aggregate_rank_summaries", "summarize_steps"]
