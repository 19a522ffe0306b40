"""Speed and peak memory against sequence length for every attention kind and its peers, at three levels: the
attention layer alone (forward + backward), the model forward (inference) and a full training step (forward,
backward, AdamW step); plus the ∞-former check of a single very long history (forward + backward, batch 1).

Methods run side by side at each length in the same process, so their ratios are measured under the same conditions.
A method stops at the first length where its predicted time or memory (from its last length and its growth
exponent) would exceed the budget, or where it runs out of memory; the report says so.
"""

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from txformer.attention_full import build_attention_mask
from txformer.configuration_txformer import ATTENTION_KINDS

from .measure import Measurement, measure_callable, measure_forward_backward, synchronize, tensor_peak_mib
from .models import EXACT_REFERENCE, METHODS, PEERS, Method, benchmark_config, build_model, synthetic_batch


CHECK_LEVEL = "infinity_check"
LEVELS = ("attention", "forward", "train", CHECK_LEVEL)
LEVEL_TITLES = {
    "attention": "Attention layer alone: forward + backward",
    "forward": "Model forward (inference, no gradient)",
    "train": "Training step: forward + backward + AdamW step",
    CHECK_LEVEL: "∞-former check: one long history, forward + backward (batch 1)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchmarkConfig:
    """What to measure (one command-line flag per field)."""

    levels: list[str] = field(
        default_factory=lambda: list(LEVELS),
        metadata={"help": f"Levels to measure, of {list(LEVELS)} ({CHECK_LEVEL}: the long-history check)."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Methods, of {list(METHODS)} (peers that are not installed are left out)."},
    )
    lengths: list[int] = field(
        default_factory=lambda: [256, 1024, 4096, 16384], metadata={"help": "Sequence lengths (events per history)."}
    )
    batch_size: int = field(default=4, metadata={"help": "Histories per batch."})
    min_run_time: float = field(
        default=1.0,
        metadata={
            "help": "Seconds of timed runs per point after a warm-up run (Timer.blocked_autorange; the median)."
        },
    )
    max_seconds: float = field(
        default=8.0, metadata={"help": "A method stops before a length whose predicted run time exceeds this (s)."}
    )
    max_memory_mib: float = field(
        default=0.0, metadata={"help": "The same for predicted peak memory (MiB); 0: half the free memory."}
    )
    dtype: str = field(
        default="float32", metadata={"help": f"Compute dtype, of {list(DTYPES)} (others run under autocast)."}
    )
    device: str = field(default="auto", metadata={"help": "torch device; auto: cuda if available, else cpu."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default."})
    config_overrides: str = field(
        default="", metadata={"help": "Model config fields, e.g. 'hidden_size=128,num_hidden_layers=4'."}
    )
    check_lengths: list[int] = field(
        default_factory=lambda: [2000, 8000, 32000, 89000],
        metadata={"help": "Lengths of the ∞-former long-history check (first = reference)."},
    )
    check_methods: list[str] = field(
        default_factory=lambda: ["infinity", "performer", "full_sdpa"], metadata={"help": "Methods of the check."}
    )
    check_batch_size: int = field(default=1, metadata={"help": "Histories per batch in the check."})
    check_max_seconds: float = field(default=40.0, metadata={"help": "max_seconds of the check."})
    check_memory_goal: float = field(
        default=1.25, metadata={"help": "∞-former goal: peak memory at the longest / at the first check length."}
    )
    tensor_memory: bool = field(
        default=True, metadata={"help": "Also measure peak tensor memory (profiler) in the check, one extra run."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and inputs."})

    def __post_init__(self):
        unknown = [name for name in [*self.methods, *self.check_methods] if name not in METHODS]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; valid: {list(METHODS)}.")
        if any(level not in LEVELS for level in self.levels):
            raise ValueError(f"Unknown levels {self.levels}; valid: {list(LEVELS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; valid: {list(DTYPES)}.")
        if any(length < 1 for length in [*self.lengths, *self.check_lengths]):
            raise ValueError("Lengths must be positive.")

    def model_levels(self) -> list[str]:
        """The levels to measure at `lengths`, in their order (all but the check)."""
        return [level for level in LEVELS if level in self.levels and level != CHECK_LEVEL]

    def resolved_device(self) -> torch.device:
        """The device to run on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class BenchmarkRow:
    """One method at one length of one level. Ratios are None where their reference was not measured."""

    level: str
    method: str
    length: int
    batch_size: int
    time_s: float
    peak_memory_mib: float
    tokens_per_s: float
    us_per_event: float
    tensor_peak_mib: float = math.nan
    time_vs_exact: float | None = None
    memory_vs_exact: float | None = None
    time_vs_peer: float | None = None
    memory_vs_peer: float | None = None
    us_per_event_vs_first: float | None = None
    memory_vs_first: float | None = None
    tensor_memory_vs_first: float | None = None


@dataclass
class BenchmarkResult:
    """Rows, the points left out (level, method, length, why), and the context of the run."""

    rows: list[BenchmarkRow]
    skipped: list[tuple[str, str, int, str]]
    device: str
    started: str
    load_average: dict[str, list[float]]
    wall_time_s: float


def free_memory_mib(device: torch.device) -> float:
    """Memory that may be used: free CUDA memory, else MemAvailable of /proc/meminfo (inf where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.inf


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocation failure (CUDA or host)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "memory" in str(error).lower() and "alloc" in str(error).lower()
    )


class Budget:
    """Decides whether a method is measured at a length, from its previous point and its growth exponents."""

    def __init__(self, max_seconds: float, max_memory_mib: float):
        self.max_seconds = max_seconds
        self.max_memory_mib = max_memory_mib
        self.last: dict[tuple[str, str], tuple[int, float, float]] = {}
        self.stopped: dict[tuple[str, str], str] = {}

    def reason_to_skip(self, level: str, method: Method, length: int) -> str | None:
        """Why `method` is not measured at `length` (None: it is)."""
        key = (level, method.name)
        if key in self.stopped:
            return self.stopped[key]
        if key not in self.last:
            return None
        previous_length, seconds, memory_mib = self.last[key]
        growth = length / previous_length
        predicted_seconds = seconds * growth**method.time_exponent
        predicted_memory = memory_mib * growth**method.memory_exponent
        if predicted_seconds > self.max_seconds:
            reason = f"predicted {predicted_seconds:.0f} s per run > {self.max_seconds:g} s"
        elif not math.isnan(predicted_memory) and predicted_memory > self.max_memory_mib:
            reason = f"predicted {predicted_memory:,.0f} MiB > {self.max_memory_mib:,.0f} MiB"
        else:
            return None
        self.stopped[key] = f"from L={length}: {reason}"
        return self.stopped[key]

    def record(self, level: str, method: Method, length: int, measurement: Measurement) -> None:
        """Notes a measured point."""
        self.last[(level, method.name)] = (length, measurement.seconds, measurement.peak_memory_mib)

    def stop(self, level: str, method: Method, length: int, reason: str) -> None:
        """Stops a method at a length (e.g. out of memory)."""
        self.stopped[(level, method.name)] = f"from L={length}: {reason}"


def attention_layer_function(model: torch.nn.Module, method: Method) -> Callable[[torch.Tensor], torch.Tensor]:
    """`hidden [batch, length, hidden] -> output` through the first layer's attention module. A streaming kind (the
    ∞-former) reads the sequence segment by segment as the model does: state carried between segments, earlier
    segments without gradient when the kind detaches it."""
    attention = model.txformer.layers[0].self_attn
    config = model.config
    streaming = ATTENTION_KINDS[method.attention_type].streaming

    def attend(hidden: torch.Tensor) -> torch.Tensor:
        key_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if streaming is None:
            return attention(hidden, build_attention_mask(config, hidden, key_mask), key_mask)[0]
        segment_length, detach_state = streaming.segment_length(config), streaming.detach_state(config)
        outputs, state = [], None
        starts = range(0, hidden.shape[1], segment_length)
        for index, start in enumerate(starts):
            window = slice(start, start + segment_length)
            keeps_graph = not detach_state or index == len(starts) - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and keeps_graph):
                mask = key_mask[:, window]
                output, _, state = attention(
                    hidden[:, window], build_attention_mask(config, hidden[:, window], mask), mask, past_state=state
                )
            if detach_state:
                state = state.detach()
            outputs.append(output)
        return torch.cat(outputs, dim=1)

    return attend


class MethodRunner:
    """One model of a method, its optimizer, and the measurement of each level at a length."""

    def __init__(self, method: Method, config: BenchmarkConfig, device: torch.device):
        torch.manual_seed(config.seed)
        self.method = method
        self.config = config
        self.device = device
        self.model_config = benchmark_config(method, config.config_overrides)
        self.model = build_model(method, self.model_config, device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.dtype = DTYPES[config.dtype]

    def autocast(self):
        """Autocast to the compute dtype (disabled for float32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, level: str, length: int, batch_size: int) -> Measurement:
        """Time and peak memory of one level at one length."""
        min_run_time = self.config.min_run_time
        if level == "attention":
            self.model.train()
            generator = torch.Generator().manual_seed(self.config.seed)
            hidden = torch.randn(batch_size, length, self.model_config.hidden_size, generator=generator)
            hidden = hidden.to(self.device).requires_grad_()
            attend = attention_layer_function(self.model, self.method)

            def function(states: torch.Tensor) -> torch.Tensor:
                with self.autocast():
                    return attend(states)

            measurement = measure_forward_backward(function, [hidden], min_run_time)
            self.clear_gradients()
            return measurement
        batch = synthetic_batch(self.model_config, batch_size, length, self.device, self.config.seed)
        step = self.step_function(level, batch)
        self.model.train(level != "forward")
        return measure_callable(step, self.device, min_run_time, prepare=self.clear_gradients)

    def step_function(self, level: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
        """The work of a model level: `forward` (no gradient), `train` (with the optimizer step) or `backward`
        (forward + backward, the check)."""

        def step() -> None:
            if level == "forward":
                with torch.no_grad(), self.autocast():
                    self.model(**batch)
                return
            with self.autocast():
                loss = self.model(**batch).loss
            loss.backward()
            if level == "train":
                self.optimizer.step()

        return step

    def tensor_peak(self, length: int, batch_size: int) -> float:
        """Peak tensor memory of one forward + backward (the check), from the profiler."""
        batch = synthetic_batch(self.model_config, batch_size, length, self.device, self.config.seed)
        self.model.train()
        self.clear_gradients()
        peak = tensor_peak_mib(self.step_function("backward", batch), self.device)
        self.clear_gradients()
        return peak


def make_row(level: str, method: str, length: int, batch_size: int, measurement: Measurement) -> BenchmarkRow:
    """A row from a measurement."""
    events = batch_size * length
    return BenchmarkRow(
        level=level,
        method=method,
        length=length,
        batch_size=batch_size,
        time_s=measurement.seconds,
        peak_memory_mib=measurement.peak_memory_mib,
        tokens_per_s=events / measurement.seconds,
        us_per_event=1e6 * measurement.seconds / events,
    )


def add_ratios(rows: list[BenchmarkRow]) -> None:
    """Fills the ratio columns: against exact SDPA and against the method's first peer at the same level and length
    (time: method / reference, so < 1 is faster; memory: method / reference), and against the method's own first
    length (µs per event: 1 = linear time; memory)."""
    by_key = {(row.level, row.method, row.length): row for row in rows}
    first: dict[tuple[str, str], BenchmarkRow] = {}
    for row in sorted(rows, key=lambda row: row.length):
        first.setdefault((row.level, row.method), row)
    for row in rows:
        exact = by_key.get((row.level, EXACT_REFERENCE, row.length))
        if exact is not None and row.method != EXACT_REFERENCE:
            row.time_vs_exact = row.time_s / exact.time_s
            row.memory_vs_exact = safe_ratio(row.peak_memory_mib, exact.peak_memory_mib)
        peer = by_key.get((row.level, PEERS.get(row.method, ("",))[0], row.length))
        if peer is not None:
            row.time_vs_peer = row.time_s / peer.time_s
            row.memory_vs_peer = safe_ratio(row.peak_memory_mib, peer.peak_memory_mib)
        reference = first[(row.level, row.method)]
        row.us_per_event_vs_first = row.us_per_event / reference.us_per_event
        row.memory_vs_first = safe_ratio(row.peak_memory_mib, reference.peak_memory_mib)
        row.tensor_memory_vs_first = safe_ratio(row.tensor_peak_mib, reference.tensor_peak_mib)


def safe_ratio(value: float, reference: float) -> float | None:
    """value / reference, None when either is unknown or the reference is not positive."""
    if math.isnan(value) or math.isnan(reference) or reference <= 0:
        return None
    return value / reference


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where unknown)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def run_benchmark(config: BenchmarkConfig, log: Callable[[str], None] = print) -> BenchmarkResult:
    """Measures every level, length and method (methods side by side at each length), then the ∞-former check."""
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    loads = {"start": load_average()}
    device = config.resolved_device()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    max_memory = config.max_memory_mib or free_memory_mib(device) / 2
    methods = [METHODS[name] for name in config.methods if METHODS[name].available]
    for name in config.methods:
        if not METHODS[name].available:
            log(f"{name}: {METHODS[name].requires} is not installed, left out")
    rows: list[BenchmarkRow] = []
    skipped: list[tuple[str, str, int, str]] = []
    runners: dict[str, MethodRunner] = {}

    def runner(method: Method) -> MethodRunner:
        if method.name not in runners:
            runners[method.name] = MethodRunner(method, config, device)
        return runners[method.name]

    def measure_point(level: str, method: Method, length: int, batch_size: int, budget: Budget) -> BenchmarkRow | None:
        reason = budget.reason_to_skip(level, method, length)
        if reason is not None:
            skipped.append((level, method.name, length, reason))
            return None
        try:
            measurement = runner(method).measure("backward" if level == CHECK_LEVEL else level, length, batch_size)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            runner(method).clear_gradients()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            budget.stop(level, method, length, "out of memory")
            skipped.append((level, method.name, length, budget.stopped[(level, method.name)]))
            return None
        budget.record(level, method, length, measurement)
        row = make_row(level, method.name, length, batch_size, measurement)
        rows.append(row)
        log(
            f"{level:>14} {method.name:>17} L={length:>6}: {1e3 * row.time_s:10.1f} ms "
            f"{row.peak_memory_mib:9.1f} MiB {row.tokens_per_s:12,.0f} events/s"
        )
        return row

    budget = Budget(config.max_seconds, max_memory)
    for level in config.model_levels():
        for length in sorted(config.lengths):
            for method in methods:
                measure_point(level, method, length, config.batch_size, budget)
    check_budget = Budget(config.check_max_seconds, max_memory)
    check_methods = [METHODS[name] for name in config.check_methods if METHODS[name].available]
    for length in sorted(config.check_lengths) if CHECK_LEVEL in config.levels else []:
        for method in check_methods:
            row = measure_point(CHECK_LEVEL, method, length, config.check_batch_size, check_budget)
            if row is not None and config.tensor_memory:
                row.tensor_peak_mib = runner(method).tensor_peak(length, config.check_batch_size)
                log(f"{'':>14} {method.name:>17} L={length:>6}: peak tensor memory {row.tensor_peak_mib:.1f} MiB")
    synchronize(device)
    add_ratios(rows)
    loads["end"] = load_average()
    return BenchmarkResult(rows, skipped, str(device), started, loads, time.perf_counter() - start)
