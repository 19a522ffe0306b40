"""Peak training memory of reversible layers (`reversible_layers=True`) against ordinary layers, for every attention
kind: a training step (forward, backward, AdamW step) of a shallow and of a deep model, each with ordinary and with
reversible layers, at one history length, side by side in one process. The report gives, per kind, how the memory
grows from the shallow to the deep model with each kind of layer, and the deep reversible model against the
shallow ordinary one (the goal: at most `memory_goal` times)."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from txformer.configuration_txformer import ATTENTION_KINDS

from .models import METHODS, Method
from .suite import BenchmarkConfig, MethodRunner, load_average


@dataclass
class ReversibleBenchmarkConfig:
    """What to measure (one command-line flag per field)."""

    kinds: list[str] = field(
        default_factory=lambda: list(ATTENTION_KINDS),
        metadata={"help": f"Attention kinds, of {list(ATTENTION_KINDS)}."},
    )
    length: int = field(default=4096, metadata={"help": "Events per history."})
    batch_size: int = field(default=4, metadata={"help": "Histories per batch."})
    layers: list[int] = field(
        default_factory=lambda: [1, 8], metadata={"help": "Numbers of layers: the shallow model, then the deep one."}
    )
    memory_goal: float = field(
        default=1.3, metadata={"help": "Goal: peak memory of the deep reversible / the shallow ordinary model."}
    )
    min_run_time: float = field(
        default=1.0,
        metadata={
            "help": "Seconds of timed runs per point after a warm-up run (Timer.blocked_autorange; the median)."
        },
    )
    tensor_memory: bool = field(
        default=True, metadata={"help": "Also measure peak tensor memory (profiler) of forward + backward, one run."}
    )
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default."})
    device: str = field(default="auto", metadata={"help": "torch device; auto: cuda if available, else cpu."})
    config_overrides: str = field(
        default="", metadata={"help": "Model config fields, e.g. 'hidden_size=128' (not the layers)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and inputs."})

    def __post_init__(self):
        unknown = [kind for kind in self.kinds if kind not in ATTENTION_KINDS]
        if unknown:
            raise ValueError(f"Unknown attention kinds {unknown}; valid: {list(ATTENTION_KINDS)}.")
        if len(self.layers) != 2 or not 0 < self.layers[0] < self.layers[1]:
            raise ValueError(f"--layers takes two increasing positive numbers (shallow, deep), got {self.layers}.")
        if self.length < 1 or self.batch_size < 1:
            raise ValueError("--length and --batch_size must be positive.")
        if any(name in self.config_overrides for name in ("num_hidden_layers", "reversible_layers")):
            raise ValueError("--config_overrides cannot set num_hidden_layers or reversible_layers: --layers does.")


@dataclass
class ReversibleRow:
    """One model: its kind, layers and layer type, the median time of a training step (s), its peak memory above the
    level before it (MiB; NaN where the platform cannot tell) and the peak tensor memory of forward + backward."""

    kind: str
    num_layers: int
    reversible: bool
    time_s: float
    peak_memory_mib: float
    tensor_peak_mib: float = math.nan


@dataclass
class ReversibleResult:
    """The rows, the device and the load averages at the start and the end of the run."""

    rows: list[ReversibleRow]
    device: str
    load_average: dict[str, list[float]]


def kind_method(kind: str) -> Method:
    """The benchmark's method of a kind with its default backend (exact attention: SDPA)."""
    return next(method for method in METHODS.values() if method.attention_type == kind and method.requires is None)


def run_reversible_benchmark(
    config: ReversibleBenchmarkConfig, log: Callable[[str], None] = print
) -> ReversibleResult:
    """Measures every kind's four models (shallow and deep, ordinary and reversible) one after the other."""
    loads = {"start": load_average()}
    device = BenchmarkConfig(device=config.device).resolved_device()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    rows = []
    for kind in config.kinds:
        for reversible in (False, True):
            for num_layers in config.layers:
                overrides = f"num_hidden_layers={num_layers},reversible_layers={str(reversible).lower()}"
                suite_config = BenchmarkConfig(
                    min_run_time=config.min_run_time,
                    device=config.device,
                    config_overrides=",".join(filter(None, [config.config_overrides, overrides])),
                    seed=config.seed,
                )
                runner = MethodRunner(kind_method(kind), suite_config, device)
                measurement = runner.measure("train", config.length, config.batch_size)
                row = ReversibleRow(kind, num_layers, reversible, measurement.seconds, measurement.peak_memory_mib)
                if config.tensor_memory:
                    row.tensor_peak_mib = runner.tensor_peak(config.length, config.batch_size)
                rows.append(row)
                log(
                    f"{kind:>10} {num_layers:>2} {'reversible' if reversible else 'ordinary':>10} layers: "
                    f"{row.time_s:7.2f} s {row.peak_memory_mib:8.1f} MiB peak, {row.tensor_peak_mib:8.1f} MiB tensors"
                )
                del runner
    loads["end"] = load_average()
    return ReversibleResult(rows, str(device), loads)


def ratio(value: float, reference: float) -> str:
    """`value / reference` as `1.23×`, or `n/a` where either is unknown."""
    if math.isnan(value) or math.isnan(reference) or reference <= 0:
        return "n/a"
    return f"{value / reference:.2f}×"


def memory_ratios(row: ReversibleRow, reference: ReversibleRow, goal: float | None = None) -> str:
    """`row` against `reference`: the ratio of their peak memory and of their peak tensor memory, the latter marked
    ✓ or ✗ against `goal` when given."""
    tensors = ratio(row.tensor_peak_mib, reference.tensor_peak_mib)
    if goal is not None and tensors != "n/a":
        tensors += " ✓" if row.tensor_peak_mib <= goal * reference.tensor_peak_mib else " ✗"
    return f"{ratio(row.peak_memory_mib, reference.peak_memory_mib)} / {tensors}"


def format_reversible(result: ReversibleResult, config: ReversibleBenchmarkConfig) -> str:
    """A Markdown report: every model's time and memory, then per kind the ratios of both memory measures."""
    shallow, deep = config.layers
    rows, loads = result.rows, result.load_average
    lines = [
        f"Training step (forward, backward, AdamW step) of {config.batch_size} histories × {config.length:,} events, "
        f"{result.device}, {torch.get_num_threads()} torch threads; load average (1, 5, 15 min) {loads['start']} at the "
        f"start, {loads['end']} at the end. Peak memory: rise above the level before the step (weights and "
        "optimizer state excluded, gradients included); tensors: profiler peak of forward + backward.",
    ]
    if result.device == "cpu":
        lines.append(
            "On the CPU the resident set also holds freed memory that glibc keeps for reuse; with "
            "MALLOC_MMAP_THRESHOLD_=131072 in the environment it follows the live tensors (docs/reversible_layers.md)."
        )
    lines += [
        "",
        "| kind | layers | layer type | time (s) | peak memory (MiB) | peak tensor memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.kind} | {row.num_layers} | {'reversible' if row.reversible else 'ordinary'} | {row.time_s:.2f} | "
            f"{row.peak_memory_mib:.1f} | {row.tensor_peak_mib:.1f} |"
        )
    lines += [
        "",
        f"Ratios of peak memory / of peak tensor memory; ✓ where the tensor ratio meets the goal "
        f"(≤ {config.memory_goal:g}×).",
        "",
        f"| kind | ordinary {deep} / {shallow} | reversible {deep} / {shallow} | reversible {deep} / ordinary "
        f"{shallow} | time, reversible / ordinary ({deep} layers) |",
        "|---|---|---|---|---|",
    ]
    by_key = {(row.kind, row.num_layers, row.reversible): row for row in rows}
    for kind in config.kinds:
        ordinary_shallow, ordinary_deep = by_key[(kind, shallow, False)], by_key[(kind, deep, False)]
        reversible_shallow, reversible_deep = by_key[(kind, shallow, True)], by_key[(kind, deep, True)]
        lines.append(
            f"| {kind} | {memory_ratios(ordinary_deep, ordinary_shallow)} | "
            f"{memory_ratios(reversible_deep, reversible_shallow, config.memory_goal)} | "
            f"{memory_ratios(reversible_deep, ordinary_shallow, config.memory_goal)} | "
            f"{ratio(reversible_deep.time_s, ordinary_deep.time_s)} |"
        )
    return "\n".join(lines)
