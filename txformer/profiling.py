"""Profiling of HF `Trainer` runs: step time, data time, real-event throughput and peak memory per optimizer step."""

import importlib.metadata
import json
import logging
import math
import os
import platform
import socket
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .io_utils import atomic_write, atomic_write_json


logger = logging.getLogger(__name__)

STEPS_FILE = "profile_steps.jsonl"
SUMMARY_FILE = "profile_summary.json"
BYTES_PER_MIB = 2**20
# The Trainer's count of real events: the `attention_mask` sum of every training micro-batch.
NON_PADDING_TOKENS = "non_padding"
STEP_TIME_PERCENTILES = (10, 90, 99)


class CudaMemoryProbe:
    """Peak CUDA memory of one step: `max_memory_allocated`/`max_memory_reserved`, peak stats reset at each step."""

    source = "cuda_max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        """Waits for the device's queued work, so that the clock read after it covers that work."""
        torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Starts a new peak window."""
        torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float]:
        """The step's peak allocated (`peak_memory_mib`) and reserved memory."""
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(self.device) / BYTES_PER_MIB,
            "peak_memory_reserved_mib": torch.cuda.max_memory_reserved(self.device) / BYTES_PER_MIB,
        }

    def close(self) -> None:
        """Nothing to release."""


class MpsMemoryProbe:
    """MPS memory at the end of a step: MPS keeps no peak counter, so these are current values, not peaks."""

    source = "mps_current_allocated_memory"

    def synchronize(self) -> None:
        """Waits for the device's queued work, so that the clock read after it covers that work."""
        torch.mps.synchronize()

    def reset(self) -> None:
        """MPS has no peak statistics to reset."""

    def read(self) -> dict[str, float]:
        """Memory held by tensors (`peak_memory_mib`) and by the Metal driver at the end of the step."""
        return {
            "peak_memory_mib": torch.mps.current_allocated_memory() / BYTES_PER_MIB,
            "driver_memory_mib": torch.mps.driver_allocated_memory() / BYTES_PER_MIB,
        }

    def close(self) -> None:
        """Nothing to release."""


class ProcessHighWaterMarkProbe:
    """Peak resident set size of the process within one step: VmHWM of /proc/self/status, reset through clear_refs."""

    source = "proc_vmhwm_per_step"

    def __init__(self):
        # Kept open, so that a step costs one write and one read, not two opens as well.
        self.clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY)
        self.status = os.open("/proc/self/status", os.O_RDONLY)

    def synchronize(self) -> None:
        """CPU work is synchronous."""

    def reset(self) -> None:
        """Sets the high-water mark to the current resident set size."""
        os.write(self.clear_refs, b"5")

    def read(self) -> dict[str, float]:
        """The highest resident set size since the last reset."""
        status = os.pread(self.status, 8192, 0)
        start = status.index(b"VmHWM:") + len(b"VmHWM:")
        kibibytes = int(status[start : status.index(b"kB", start)])
        return {"peak_memory_mib": kibibytes / 1024}

    def close(self) -> None:
        """Closes the /proc files."""
        os.close(self.clear_refs)
        os.close(self.status)


class LifetimePeakRssProbe:
    """Peak resident set size since the process started (`getrusage`), used where /proc is missing: never reset."""

    source = "getrusage_maxrss_lifetime"

    def synchronize(self) -> None:
        """CPU work is synchronous."""

    def reset(self) -> None:
        """`getrusage` has no reset."""

    def read(self) -> dict[str, float]:
        """The process's lifetime peak resident set size (KiB on Linux, bytes on macOS)."""
        import resource

        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_memory_mib": max_rss / (BYTES_PER_MIB if platform.system() == "Darwin" else 1024)}

    def close(self) -> None:
        """Nothing to release."""


MemoryProbe = CudaMemoryProbe | MpsMemoryProbe | ProcessHighWaterMarkProbe | LifetimePeakRssProbe


def memory_probe_for(device: torch.device) -> MemoryProbe:
    """The memory probe of the training device: CUDA or MPS statistics, else the host process's resident set size."""
    if device.type == "cuda":
        return CudaMemoryProbe(device)
    if device.type == "mps":
        return MpsMemoryProbe()
    try:
        return ProcessHighWaterMarkProbe()
    except OSError:
        return LifetimePeakRssProbe()


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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware() -> dict[str, Any]:
    """CPU model and cores, host memory, GPU names, count and memory of this machine."""
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_properties = [torch.cuda.get_device_properties(index) for index in range(gpu_count)]
    try:
        memory_total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / BYTES_PER_MIB
    except (AttributeError, ValueError, OSError):
        memory_total_mib = None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_total_mib": memory_total_mib,
        "gpu_count": gpu_count,
        "gpu_names": [properties.name for properties in gpu_properties],
        "gpu_memory_total_mib": [properties.total_memory / BYTES_PER_MIB for properties in gpu_properties],
        "mps_available": torch.backends.mps.is_available(),
    }


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_software() -> dict[str, str | None]:
    """Versions of Python, the libraries training depends on, and txformer."""
    from . import __version__ as txformer_version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": _installed_version("accelerate"),
        "datasets": _installed_version("datasets"),
        "txformer": txformer_version,
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
        self.steps_path = self.output_dir / (
            STEPS_FILE if self.world_size == 1 else f"profile_steps.rank{self.rank}.jsonl"
        )
        kept_lines = _complete_records_up_to(self.steps_path, state.global_step) if self.steps_path.exists() else []
        atomic_write(self.steps_path, lambda steps_file: steps_file.writelines(kept_lines))
        if state.is_world_process_zero:
            (self.output_dir / SUMMARY_FILE).unlink(missing_ok=True)
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
        atomic_write_json(self.output_dir / SUMMARY_FILE, summary)


def add_profiling_callback(trainer: Trainer, callback: ProfilingCallback | None = None) -> ProfilingCallback:
    """Puts a profiling callback first in `trainer`'s callbacks, so that TensorBoard/W&B callbacks log its figures.

    The Trainer places its reporting integrations before the callbacks passed to it; those would log `logs` before
    this callback adds its `profile/*` keys.
    """
    callback = ProfilingCallback() if callback is None else callback
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["ProfilingCallback", "add_profiling_callback", "aggregate_rank_summaries", "summarize_steps"]
