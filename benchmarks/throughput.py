"""Training and scoring throughput (real events per second) of attention kinds at their natural batch shapes, side by
side in one run: e.g. the ∞-former over 8 histories of 4,096 events against full attention over 128 histories of 256
events, the same number of events per step. The points are measured in turn for several rounds, so that they share
the machine's load; the report gives the median of the rounds and their range, and each point's ratio to the first.
"""

import dataclasses
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from txformer.cli import merge_config_overrides

from .measure import CLOCKS, measure_callable
from .models import METHODS, synthetic_batch
from .suite import DTYPES, BenchmarkConfig, MethodRunner, load_average


LEVEL_NAMES = {"train": "training step", "forward": "scoring (forward, no gradient)"}
POINT_PATTERN = re.compile(r"(?P<method>\w+)(\[(?P<overrides>[^\]]*)\])?:(?P<batch_size>\d+)x(?P<length>\d+)")
RATE_UNITS = {"wall": "events/s", "process": "events/CPU-s"}


@dataclass
class ThroughputConfig:
    """What to measure (one command-line flag per field)."""

    points: list[str] = field(
        default_factory=lambda: ["full_sdpa:128x256", "infinity:8x4096"],
        metadata={
            "help": "Points as METHOD:HISTORIESxLENGTH, or METHOD[key=value,...]:HISTORIESxLENGTH with config fields "
            "of that point alone (on top of --config_overrides); the first is the reference of the ratios."
        },
    )
    levels: list[str] = field(
        default_factory=lambda: ["train", "forward"], metadata={"help": f"Levels, of {list(LEVEL_NAMES)}."}
    )
    ragged: bool = field(
        default=False,
        metadata={
            "help": "Histories of a batch evenly spread from LENGTH/8 to LENGTH events (right padding), instead of "
            "all LENGTH long; events/s counts the real events."
        },
    )
    rounds: int = field(default=3, metadata={"help": "Rounds over all points (the median round is reported)."})
    min_run_time: float = field(
        default=1.0,
        metadata={"help": "Seconds of timed runs per point and round after a warm-up run (Timer.blocked_autorange)."},
    )
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0: torch's default."})
    clock: str = field(
        default="wall",
        metadata={
            "help": "wall: events per second of elapsed time; process: events per CPU-second of this process (all "
            "its threads), which other jobs on a shared machine barely change (CPU only)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": f"Compute dtype, of {list(DTYPES)}."})
    device: str = field(default="auto", metadata={"help": "torch device; auto: cuda if available, else cpu."})
    config_overrides: str = field(
        default="", metadata={"help": "Model config fields, e.g. 'hidden_size=128,num_hidden_layers=4'."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and inputs."})

    def __post_init__(self):
        for point in self.points:
            parse_point(point)
        if any(level not in LEVEL_NAMES for level in self.levels):
            raise ValueError(f"Unknown levels {self.levels}; valid: {list(LEVEL_NAMES)}.")
        if self.clock not in CLOCKS:
            raise ValueError(f"Unknown clock {self.clock!r}; valid: {list(CLOCKS)}.")


def parse_point(point: str) -> tuple[str, int, int, str]:
    """`"infinity:8x4096"` -> `("infinity", 8, 4096, "")`, `"infinity[segment_length=128]:8x4096"` -> `("infinity",
    8, 4096, "segment_length=128")`, with a clear error for anything else."""
    match = POINT_PATTERN.fullmatch(point)
    if match is None:
        raise ValueError(
            f"A point is METHOD:HISTORIESxLENGTH or METHOD[key=value,...]:HISTORIESxLENGTH (e.g. infinity:8x4096), "
            f"got {point!r}."
        )
    method = match["method"]
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r} in point {point!r}; valid: {list(METHODS)}.")
    return method, int(match["batch_size"]), int(match["length"]), match["overrides"] or ""


def ragged_batch(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The batch with its histories cut to lengths evenly spread from `length / 8` to `length` (right padding)."""
    batch_size = batch["attention_mask"].shape[0]
    lengths = torch.linspace(length / 8, length, batch_size).round().long().to(batch["attention_mask"].device)
    mask = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
    ragged = {"labels": batch["labels"], "attention_mask": mask.long()}
    for key in ("input_ids", "numeric_values", "event_time"):
        value = batch[key]
        ragged[key] = value * mask.view(*mask.shape, *[1] * (value.dim() - 2)).to(value.dtype)
    return ragged


@dataclass
class ThroughputRow:
    """Real events per second of one point at one level: the median round, the range, the ratio to the first."""

    level: str
    point: str
    events_per_step: int
    events_per_s: float
    min_events_per_s: float
    max_events_per_s: float
    vs_first: float


def run_throughput(
    config: ThroughputConfig, log: Callable[[str], None] = print
) -> tuple[list[ThroughputRow], dict[str, list[float]]]:
    """Measures every point at every level, `rounds` times in turn. Returns the rows and the load averages."""
    loads = {"start": load_average()}
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    suite_config = BenchmarkConfig(
        dtype=config.dtype,
        device=config.device,
        config_overrides=config.config_overrides,
        seed=config.seed,
    )
    device = suite_config.resolved_device()
    runs = []
    for point in config.points:
        method, batch_size, length, overrides = parse_point(point)
        point_config = dataclasses.replace(
            suite_config, config_overrides=merge_config_overrides(config.config_overrides, overrides)
        )
        runner = MethodRunner(METHODS[method], point_config, device)
        batch = synthetic_batch(runner.model_config, batch_size, length, device, config.seed)
        if config.ragged:
            batch = ragged_batch(batch, length)
        runs.append((point, runner, batch, int(batch["attention_mask"].sum())))
    rates = {(level, point): [] for level in config.levels for point in config.points}
    for round_index in range(config.rounds):
        for level in config.levels:
            for point, runner, batch, num_events in runs:
                runner.model.train(level != "forward")
                measurement = measure_callable(
                    runner.step_function(level, batch),
                    device,
                    config.min_run_time,
                    prepare=runner.clear_gradients,
                    clock=CLOCKS[config.clock],
                )
                rate = num_events / measurement.seconds
                rates[(level, point)].append(rate)
                log(f"round {round_index + 1} {level:>8} {point:>20}: {rate:12,.0f} {RATE_UNITS[config.clock]}")
    rows = []
    for level in config.levels:
        reference = statistics.median(rates[(level, config.points[0])])
        for point, _, _, num_events in runs:
            values = rates[(level, point)]
            rows.append(
                ThroughputRow(
                    level=level,
                    point=point,
                    events_per_step=num_events,
                    events_per_s=statistics.median(values),
                    min_events_per_s=min(values),
                    max_events_per_s=max(values),
                    vs_first=statistics.median(values) / reference,
                )
            )
    loads["end"] = load_average()
    return rows, loads


def format_throughput(rows: list[ThroughputRow], config: ThroughputConfig, loads: dict[str, list[float]]) -> str:
    """A Markdown table of the rows, with the machine's thread count and load averages."""
    threads = torch.get_num_threads()
    lines = [
        f"{config.rounds} rounds of at least {config.min_run_time:g} s ({config.clock} clock) per point (median "
        f"time per run of `Timer.blocked_autorange`), {threads} torch threads, dtype {config.dtype}"
        f"{', ragged histories' if config.ragged else ''}; load average (1, 5, 15 min) "
        f"{loads['start']} at the start, {loads['end']} at the end.",
        "",
        f"| level | point | events per step | {RATE_UNITS[config.clock]} (median round) | range over rounds | "
        "vs first |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {LEVEL_NAMES[row.level]} | {row.point} | {row.events_per_step:,} | {row.events_per_s:,.0f} | "
            f"{row.min_events_per_s:,.0f}–{row.max_events_per_s:,.0f} | {row.vs_first:.2f}× |"
        )
    return "\n".join(lines)
