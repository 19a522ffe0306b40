"""The comparison report: on each synthetic data family, train every attention kind at several context lengths and
seeds (each run a `scripts/train.py` process with the default recipe and the profiling callback on, in its own
folder) next to the LightGBM baseline on aggregates (`scripts/baseline.py`, same split and seeds), then aggregate
AUROC, accuracy, throughput and memory next to the oracle AUROCs of the data into `docs/results.md` and plots.

Runs are resumable: a folder with `all_results.json` is finished and skipped; with `time_limit_minutes`, a run that
reaches the limit is stopped and continues from its last complete checkpoint at the next call (checkpoints are
removed once the run has finished and saved its model).
"""

import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers.trainer import TRAINER_STATE_NAME

from txformer.configuration_txformer import ATTENTION_KINDS, TxFormerConfig
from txformer.data.synthetic import FAMILIES
from txformer.file_names import (
    BASELINE_PREDICTIONS_FILE,
    BASELINE_RESULTS_FILE,
    EVAL_PREDICTIONS_FILE,
    PROFILE_STEPS_FILE,
    PROFILE_SUMMARY_FILE,
    RESULTS_FILE,
)
from txformer.io_utils import atomic_write_json
from txformer.machine import describe_machine
from txformer.metrics import bootstrap_auroc_interval, read_evaluated_predictions
from txformer.recipe import LONG_HISTORY_MEDIAN_EVENTS, STANDARD_RECIPE, Recipe, recipe_for_median_length
from txformer.training import last_complete_checkpoint


RUN_RECORD_FILE = "compare_run.json"
RUN_LOG_FILE = "train.log"
WHOLE_HISTORY = 0
BASELINE = "lightgbm"
# The kind every other kind is held against at the same context.
REFERENCE_KIND = "full"
BENCHMARK_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmark.md"
LABEL_STUDY_DOC = BENCHMARK_DOC.with_name("label_study.md")
# The installed console scripts (setup.py), so that the comparison runs from a wheel as from a source tree.
TRAIN_ENTRY_POINT = "txformer-train"
BASELINE_ENTRY_POINT = "txformer-baseline"
# Resamples of the held-out customers behind each bootstrap interval of the report.
BOOTSTRAP_RESAMPLES = 2000
# Context length a whole history counts as when choosing the micro-batch size (the longest histories are grouped),
# for a kind that holds a whole history at once; a streaming kind holds one segment at a time.
WHOLE_HISTORY_BATCH_LENGTH = 8192
# The contexts every registered kind is trained at by default: a streaming kind reads whole histories, any other
# kind the last 256 and 1,024 events.
DEFAULT_RUNS = [
    f"{name}:{WHOLE_HISTORY}" if kind.streaming is not None else f"{name}:256,1024"
    for name, kind in ATTENTION_KINDS.items()
]
# Long contexts, on the long-history family only: the Performer at 4,096 and 16,384 events, the Reformer over whole
# histories and local attention at 4,096 events.
LONG_FAMILY_RUNS = ["long/performer:4096,16384", "long/reformer:0", "long/local:4096"]
# The oracle AUROC of a window of most recent events, as a training run records it.
ORACLE_WINDOW_KEY = re.compile(r"^oracle_auroc_last_(\d+)$")


@dataclass(frozen=True)
class RunSpec:
    """One run on a data family: an attention kind at its context (`max_length`, 0 = whole histories), or the
    baseline (`attention_type == BASELINE`), and a seed."""

    family: str
    attention_type: str
    max_length: int
    seed: int

    @property
    def name(self) -> str:
        """The run's folder, relative to the output folder."""
        if self.is_baseline:
            return f"{self.family}/{BASELINE}-seed{self.seed}"
        context = "whole" if self.max_length == WHOLE_HISTORY else str(self.max_length)
        return f"{self.family}/{self.attention_type}-{context}-seed{self.seed}"

    @property
    def is_baseline(self) -> bool:
        return self.attention_type == BASELINE

    @property
    def context(self) -> str:
        """How tables name the context."""
        if self.is_baseline:
            return "aggregates of the whole history"
        return "whole history" if self.max_length == WHOLE_HISTORY else f"last {self.max_length:,}"


DEFAULT_OUTPUT_DIR = "outputs/compare"
DEFAULT_REPORT = "docs/results.md"
DEFAULT_FIGURES_DIR = "docs/figures"


@dataclass
class CompareConfig:
    """The grid of runs and how they are trained (one command-line flag per field)."""

    families: list[str] = field(
        default_factory=lambda: ["independent:8000", "order:4000", "long:2000"],
        metadata={"help": "FAMILY:CUSTOMERS per synthetic data family (`--synthetic_family` of scripts/train.py)."},
    )
    runs: list[str] = field(
        default_factory=lambda: DEFAULT_RUNS + LONG_FAMILY_RUNS,
        metadata={
            "help": "[FAMILY/]KIND:LENGTH,LENGTH,... per attention kind (on every family, or on FAMILY only); "
            "length 0 = whole histories."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44], metadata={"help": "Seeds (init, order)."})
    baseline: bool = field(default=True, metadata={"help": "Also run the LightGBM baseline for each family and seed."})
    output_dir: str = field(default=DEFAULT_OUTPUT_DIR, metadata={"help": "One folder per run inside."})
    report: str | None = field(
        default=None,
        metadata={
            "help": f"The Markdown report written at the end (default: {DEFAULT_REPORT} for the default "
            "--output_dir, else results.md inside --output_dir, so that another grid never overwrites the project's)."
        },
    )
    figures_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Where the report's PNG plots go (default: {DEFAULT_FIGURES_DIR} for the default --output_dir, "
            "else figures/ inside it)."
        },
    )
    effective_batch_size: int = field(default=64, metadata={"help": "Histories per optimizer step."})
    micro_batch_events: int = field(
        default=65536,
        metadata={"help": "Padded events per forward pass: sets the micro-batch (gradient accumulation fills up)."},
    )
    train_max_length: int = field(
        default=0,
        metadata={
            "help": "`--train_max_length` of the model runs: training windows of at most this many events, while "
            "evaluation reads the run's context (0: the context)."
        },
    )
    time_limit_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Stop a run after this long in one call and resume it from its last checkpoint at the next call "
            "(0: no limit)."
        },
    )
    num_threads: int = field(default=0, metadata={"help": "OMP_NUM_THREADS of the runs (0: inherit)."})
    report_only: bool = field(default=False, metadata={"help": "Only aggregate the finished runs into the report."})
    dry_run: bool = field(default=False, metadata={"help": "Print the commands of the runs still to do, run none."})

    def __post_init__(self):
        default_place = Path(self.output_dir).resolve() == Path(DEFAULT_OUTPUT_DIR).resolve()
        if self.report is None:
            self.report = DEFAULT_REPORT if default_place else str(Path(self.output_dir) / "results.md")
        if self.figures_dir is None:
            self.figures_dir = DEFAULT_FIGURES_DIR if default_place else str(Path(self.output_dir) / "figures")

    def family_sizes(self) -> dict[str, int]:
        """Customers of each family's generated data."""
        sizes = {}
        for item in self.families:
            family, _, customers = item.partition(":")
            if not customers.isdigit():
                raise ValueError(f"Family {item!r} is not FAMILY:CUSTOMERS.")
            sizes[family] = int(customers)
        return sizes

    def specs(self) -> list[RunSpec]:
        """Every run of the grid, seed-major (so that a first seed of every configuration finishes first), the
        baseline of a family and seed first."""
        grid = []
        for item in self.runs:
            scope, _, run = item.rpartition("/")
            kind, _, lengths = run.partition(":")
            if not lengths:
                raise ValueError(f"Run {item!r} is not [FAMILY/]KIND:LENGTH[,LENGTH...].")
            grid += [(scope, kind, int(length)) for length in lengths.split(",")]
        if self.baseline:
            grid.insert(0, ("", BASELINE, WHOLE_HISTORY))
        return [
            RunSpec(family, kind, length, seed)
            for seed in self.seeds
            for family in self.family_sizes()
            for scope, kind, length in grid
            if scope in ("", family)
        ]


def batch_length(spec: RunSpec) -> int:
    """Events per history that a forward pass of the run works on at once: its context; over whole histories, one
    segment for a streaming kind (the ∞-former's layers hold one segment at a time; with the embedding readout, the
    embeddings of the training window keep their gradient, which the window, `train_window`, bounds), else
    `WHOLE_HISTORY_BATCH_LENGTH`. The segment length is the kind's default (not a `--config_overrides` one)."""
    if spec.max_length != WHOLE_HISTORY:
        return spec.max_length
    streaming = ATTENTION_KINDS[spec.attention_type].streaming
    if streaming is None:
        return WHOLE_HISTORY_BATCH_LENGTH
    return streaming.segment_length(TxFormerConfig(attention_type=spec.attention_type))


def micro_batch_size(spec: RunSpec, config: CompareConfig, training: bool = True) -> int:
    """Histories per forward pass: the largest power of two that keeps `micro_batch_events` padded events (of
    `batch_length`), at most the effective batch size; in training, of histories cut to the training windows
    (`train_max_length`)."""
    lengths = [batch_length(spec)]
    window = train_window(spec.family, config)
    if training and window > 0:
        lengths.append(window)
    length = min(lengths)
    size = 1
    while size * 2 <= config.effective_batch_size and size * 2 * length <= config.micro_batch_events:
        size *= 2
    return size


def entry_point(name: str) -> str:
    """The console script `name` of the running Python environment (next to its interpreter), else from `PATH`."""
    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else shutil.which(name) or name


def data_args(spec: RunSpec, config: CompareConfig) -> list[str]:
    """The data flags shared by the training and baseline commands of a run: its family, same split as every run."""
    return [
        "--synthetic_family", spec.family,
        "--synthetic_num_customers", str(config.family_sizes()[spec.family]),
        "--output_dir", str(Path(config.output_dir) / spec.name),
    ]  # fmt: skip


def family_recipe(family: str) -> Recipe:
    """The recipe `scripts/train.py` chooses on a family's data (`--recipe auto`), by the median history length of the
    family's generator."""
    return recipe_for_median_length(FAMILIES[family].default_config.median_length)


def train_window(family: str, config: CompareConfig) -> int:
    """Training windows of a family's model runs: the comparison's `--train_max_length`, else the recipe's (0: the
    context)."""
    return config.train_max_length or family_recipe(family).train_max_length


def family_recipe_lines(family: str) -> list[str]:
    """The report's sentence on the recipe of a family's model runs, when it is not the standard one."""
    recipe = family_recipe(family)
    if recipe == STANDARD_RECIPE:
        return []
    return [
        f"Model runs of this family train with `scripts/train.py`'s `{recipe.name}` recipe, which its default "
        f"`--recipe auto` chooses here (the training customers' median history holds more than "
        f"{LONG_HISTORY_MEDIAN_EVENTS:,} events; [recipe.md](recipe.md#the-long-history-recipe)): `{shlex.join(recipe.flags(STANDARD_RECIPE))}`.",
        "",
    ]


def train_command(spec: RunSpec, config: CompareConfig, extra_args: list[str]) -> list[str]:
    """The command of a run: `txformer-baseline` for the baseline, else `txformer-train` with the default recipe
    (resuming from its last complete checkpoint when there is one)."""
    if spec.is_baseline:
        return [entry_point(BASELINE_ENTRY_POINT), *data_args(spec, config), "--seed", str(spec.seed)]
    micro = micro_batch_size(spec, config)
    command = [
        entry_point(TRAIN_ENTRY_POINT),
        *data_args(spec, config),
        "--attention_type", spec.attention_type,
        "--max_length", str(spec.max_length),
        "--seed", str(spec.seed),
        "--per_device_train_batch_size", str(micro),
        "--gradient_accumulation_steps", str(max(1, config.effective_batch_size // micro)),
        "--per_device_eval_batch_size", str(micro_batch_size(spec, config, training=False)),
        "--group_by_length",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if config.train_max_length > 0:
        command += ["--train_max_length", str(config.train_max_length)]
    checkpoint = last_complete_checkpoint(Path(config.output_dir) / spec.name)
    # The run folder is the comparison's own: it holds the run's log (and, of a run killed early, its first files).
    command += (
        ["--overwrite_output_dir", "true"] if checkpoint is None else ["--resume_from_checkpoint", str(checkpoint)]
    )
    return command + extra_args


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its script wrote its metrics."""
    return (run_dir / RESULTS_FILE).exists() or (run_dir / BASELINE_RESULTS_FILE).exists()


def run_one(spec: RunSpec, config: CompareConfig, extra_args: list[str], log: Callable[[str], None]) -> bool:
    """Runs (or continues) one training of the grid; returns whether it finished."""
    command = train_command(spec, config, extra_args)
    return run_command(command, spec.name, {"spec": asdict(spec)}, config, log)


def run_command(
    command: list[str], name: str, header: dict, config: CompareConfig, log: Callable[[str], None]
) -> bool:
    """Runs (or continues) the command of the run in folder `name` of `config.output_dir` in a subprocess, its output
    logged to `train.log` there, stopped at `config.time_limit_minutes`; records each call's wall time in
    `compare_run.json` (which starts with `header`). Returns whether the run finished."""
    run_dir = Path(config.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path = run_dir / RUN_RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {**header, "calls": []}
    environment = dict(os.environ)
    if config.num_threads > 0:
        environment["OMP_NUM_THREADS"] = str(config.num_threads)
    log(f"[{name}] {shlex.join(command)}")
    start = time.perf_counter()
    with open(run_dir / RUN_LOG_FILE, "a") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
        timeout = config.time_limit_minutes * 60 if config.time_limit_minutes > 0 else None
        try:
            return_code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return_code = None
        except BaseException:
            process.kill()
            process.wait()
            raise
    wall_s = time.perf_counter() - start
    finished = is_finished(run_dir)
    if finished:  # the trained model is in the run folder; the resumption checkpoints are not needed any more
        for checkpoint in run_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    record["calls"].append(
        {"command": command, "wall_time_s": wall_s, "return_code": return_code, "finished": finished}
    )
    atomic_write_json(record_path, record)
    if return_code not in (0, None):
        log(f"[{name}] failed (exit {return_code}) after {wall_s / 60:.1f} min: see {run_dir / RUN_LOG_FILE}")
    else:
        state = "finished" if finished else "stopped at the time limit, resumes at the next call"
        log(f"[{name}] {state} after {wall_s / 60:.1f} min")
    return finished


def run_all(
    config: CompareConfig,
    extra_args: list[str],
    log: Callable[[str], None] = print,
    runner: Callable[..., bool] = run_one,
) -> list[RunSpec]:
    """Runs every unfinished run of the grid in order; returns those still unfinished."""
    unfinished = []
    for spec in config.specs():
        run_dir = Path(config.output_dir) / spec.name
        if is_finished(run_dir):
            log(f"[{spec.name}] finished earlier: skipped")
            continue
        if config.dry_run:
            log(shlex.join(train_command(spec, config, extra_args)))
            unfinished.append(spec)
            continue
        if not runner(spec, config, extra_args, log):
            unfinished.append(spec)
    return unfinished


@dataclass
class RunResult:
    """What one finished run measured."""

    spec: RunSpec
    auroc: float
    accuracy: float
    oracle_all: float | None
    oracle_window: float | None
    oracle_by_window: dict[int, float]
    events_per_s: float | None
    events_per_s_median: float | None
    peak_memory_mib: float | None
    train_minutes: float | None
    wall_minutes: float | None
    hardware: dict | None
    log_history: list[dict]
    predictions: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def read_steps(path: Path) -> list[dict]:
    """The complete lines of a profile steps file."""
    steps = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                steps.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return steps


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Customer ids, labels and probabilities of a run's evaluated customers; None for a run without them (one that
    predates them, or a baseline file without labels)."""
    try:
        return read_evaluated_predictions(path)
    except (FileNotFoundError, KeyError):
        return None


def read_run(run_dir: Path, spec: RunSpec) -> RunResult:
    """The metrics of a finished run: held-out AUROC and accuracy, the oracles, and for a model from the profiling
    callback's steps file the throughput over all steps (real events / step time), the median per-step throughput and
    the peak memory, and the Trainer's log history; the wall time from the run record."""
    if spec.is_baseline:
        metrics = json.loads((run_dir / BASELINE_RESULTS_FILE).read_text())["metrics"]
    else:
        metrics = json.loads((run_dir / RESULTS_FILE).read_text())
    steps = read_steps(run_dir / PROFILE_STEPS_FILE)
    counted = [step for step in steps if step.get("tokens") is not None]
    step_time = sum(step["step_time_s"] for step in counted)
    summary_path = run_dir / PROFILE_SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    record_path = run_dir / RUN_RECORD_FILE
    calls = json.loads(record_path.read_text())["calls"] if record_path.exists() else []
    state_path = run_dir / TRAINER_STATE_NAME
    log_history = json.loads(state_path.read_text()).get("log_history", []) if state_path.exists() else []
    return RunResult(
        spec=spec,
        auroc=metrics["eval_auroc"],
        accuracy=metrics["eval_accuracy"],
        oracle_all=metrics.get("oracle_auroc_all"),
        oracle_window=None if spec.is_baseline else metrics.get("oracle_auroc_last_max_length"),
        oracle_by_window={
            int(match[1]): value for key, value in metrics.items() if (match := ORACLE_WINDOW_KEY.match(key))
        },
        events_per_s=sum(step["tokens"] for step in counted) / step_time if step_time > 0 else None,
        events_per_s_median=statistics.median(step["tokens_per_s"] for step in counted) if counted else None,
        peak_memory_mib=max((step["peak_memory_mib"] for step in steps), default=None),
        train_minutes=sum(step["step_time_s"] for step in steps) / 60 if steps else None,
        wall_minutes=sum(call["wall_time_s"] for call in calls) / 60 if calls else None,
        hardware=summary.get("hardware"),
        log_history=log_history,
        predictions=read_predictions(
            run_dir / (BASELINE_PREDICTIONS_FILE if spec.is_baseline else EVAL_PREDICTIONS_FILE)
        ),
    )


def collect_results(config: CompareConfig) -> list[RunResult]:
    """Every finished run of the grid."""
    results = []
    for spec in config.specs():
        run_dir = Path(config.output_dir) / spec.name
        if is_finished(run_dir):
            results.append(read_run(run_dir, spec))
    return results


@dataclass
class GroupSummary:
    """The seeds of one (family, kind, context) configuration."""

    family: str
    attention_type: str
    max_length: int
    seeds: list[int]
    auroc: list[float]
    accuracy: list[float]
    oracle_all: float | None
    oracle_window: float | None
    oracle_by_window: dict[int, float]
    events_per_s: float | None
    peak_memory_mib: float | None
    wall_minutes: float | None
    auroc_interval: tuple[float, float] | None = None
    margin_interval: tuple[float, float] | None = None
    reference_margin_interval: tuple[float, float] | None = None

    @property
    def spec(self) -> RunSpec:
        return RunSpec(self.family, self.attention_type, self.max_length, 0)

    @property
    def mean_auroc(self) -> float:
        return statistics.fmean(self.auroc)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aligned_predictions(runs: list[RunResult]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """Customer ids, labels and every run's probabilities, ordered by customer, when all the runs scored the same
    customers; None otherwise."""
    if any(run.predictions is None for run in runs):
        return None
    aligned = []
    for customer_ids, labels, probabilities in (run.predictions for run in runs):
        order = np.argsort(customer_ids, kind="stable")
        aligned.append((customer_ids[order], labels[order], probabilities[order]))
    customer_ids, labels, _ = aligned[0]
    if any(not np.array_equal(ids, customer_ids) or not np.array_equal(other, labels) for ids, other, _ in aligned):
        return None
    return customer_ids, labels, [probabilities for _, _, probabilities in aligned]


def auroc_interval(runs: list[RunResult]) -> tuple[float, float] | None:
    """Bootstrap 95% interval over the held-out customers of the runs' mean AUROC, where the predictions allow."""
    scored = aligned_predictions(runs)
    if scored is None:
        return None
    _, labels, probabilities = scored
    return bootstrap_auroc_interval(labels, probabilities, num_resamples=BOOTSTRAP_RESAMPLES)


def margin_interval(runs: list[RunResult], other_runs: list[RunResult]) -> tuple[float, float] | None:
    """Bootstrap 95% interval over the held-out customers of the runs' mean AUROC minus the other runs' mean AUROC
    (paired: the same resampled customers on both sides), where the predictions allow."""
    scored = aligned_predictions(runs)
    other = aligned_predictions(other_runs) if other_runs else None
    if scored is None or other is None or not np.array_equal(other[0], scored[0]):
        return None
    _, labels, probabilities = scored
    return bootstrap_auroc_interval(labels, probabilities, baseline=other[2], num_resamples=BOOTSTRAP_RESAMPLES)


def summarize(results: list[RunResult]) -> list[GroupSummary]:
    """One summary per (family, kind, context), in the order the grid lists them."""
    groups: dict[tuple[str, str, int], list[RunResult]] = {}
    for result in results:
        key = (result.spec.family, result.spec.attention_type, result.spec.max_length)
        groups.setdefault(key, []).append(result)

    def reference_runs(family: str, kind: str, length: int) -> list[RunResult]:
        return [] if kind in (BASELINE, REFERENCE_KIND) else groups.get((family, REFERENCE_KIND, length), [])

    def baseline_runs(family: str, kind: str) -> list[RunResult]:
        return [] if kind == BASELINE else groups.get((family, BASELINE, WHOLE_HISTORY), [])

    def median_of(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    return [
        GroupSummary(
            family=family,
            attention_type=kind,
            max_length=length,
            seeds=[run.spec.seed for run in runs],
            auroc=[run.auroc for run in runs],
            accuracy=[run.accuracy for run in runs],
            oracle_all=runs[0].oracle_all,
            oracle_window=runs[0].oracle_window,
            oracle_by_window=runs[0].oracle_by_window,
            events_per_s=median_of([run.events_per_s for run in runs]),
            peak_memory_mib=max((run.peak_memory_mib for run in runs if run.peak_memory_mib), default=None),
            wall_minutes=median_of([run.wall_minutes for run in runs]),
            auroc_interval=auroc_interval(runs),
            margin_interval=margin_interval(runs, baseline_runs(family, kind)),
            reference_margin_interval=margin_interval(runs, reference_runs(family, kind, length)),
        )
        for (family, kind, length), runs in groups.items()
    ]


def _format_mean_std(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _seeds(summary: GroupSummary) -> str:
    return f"{len(summary.seeds)} seed{'' if len(summary.seeds) == 1 else 's'}"


def _optional(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _interval(interval: tuple[float, float] | None, spec: str) -> str:
    return "–" if interval is None else f"[{interval[0]:{spec}}, {interval[1]:{spec}}]"


def results_table(summaries: list[GroupSummary]) -> list[str]:
    """The table of one family: every model configuration and the baseline."""
    baseline = next((summary for summary in summaries if summary.spec.is_baseline), None)
    lines = [
        "| method | context | seeds | AUROC (mean ± std) | AUROC 95% CI | accuracy | oracle AUROC, same window "
        "| gap to it | − baseline AUROC | its 95% CI | train events/s | peak memory (MiB) | wall time per run (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries:
        gap = None if summary.oracle_window is None else summary.oracle_window - summary.mean_auroc
        margin = None if baseline is None or summary is baseline else summary.mean_auroc - baseline.mean_auroc
        lines.append(
            f"| {summary.attention_type} | {summary.spec.context} | {len(summary.seeds)} "
            f"| {_format_mean_std(summary.auroc)} | {_interval(summary.auroc_interval, '.4f')} "
            f"| {_format_mean_std(summary.accuracy)} | {_optional(summary.oracle_window, '.4f')} "
            f"| {_optional(gap, '.4f')} | {_optional(margin, '+.4f')} | {_interval(summary.margin_interval, '+.4f')} "
            f"| {_optional(summary.events_per_s, ',.0f')} | {_optional(summary.peak_memory_mib, ',.0f')} "
            f"| {_optional(summary.wall_minutes, '.1f')} |"
        )
    oracle_all = next((summary.oracle_all for summary in summaries if summary.oracle_all is not None), None)
    if oracle_all is not None:
        lines.append(f"| Bayes oracle | whole history | | {oracle_all:.4f} | | | | | | | | | |")
    return lines


def quality_verdict(summaries: list[GroupSummary], tolerance: float = 0.02) -> list[str]:
    """The quality goals of one family, from the runs that exist: each kind at its best context against the
    baseline (mean over seeds) and against the oracle of its window."""
    baseline = next((summary for summary in summaries if summary.spec.is_baseline), None)
    models = [summary for summary in summaries if not summary.spec.is_baseline]
    lines = []
    for kind in dict.fromkeys(summary.attention_type for summary in models):
        best = max((summary for summary in models if summary.attention_type == kind), key=lambda s: s.mean_auroc)
        parts = [f"- {kind}, best at {best.spec.context}: AUROC {_format_mean_std(best.auroc)}"]
        if baseline is not None:
            margin = best.mean_auroc - baseline.mean_auroc
            interval = "" if best.margin_interval is None else f" (95% CI {_interval(best.margin_interval, '+.4f')})"
            parts.append(f"{'beats' if margin > 0 else '**does not beat**'} the baseline by {margin:+.4f}{interval}")
        if best.oracle_window is not None:
            gap = best.oracle_window - best.mean_auroc
            parts.append(
                f"{gap:.4f} below its window's oracle ({'within' if gap <= tolerance else '**not within**'} "
                f"{tolerance})"
            )
        lines.append("; ".join(parts) + ".")
    return lines or ["No finished model run yet: no verdict."]


def reference_verdict(summaries: list[GroupSummary], tolerance: float = 0.02) -> list[str]:
    """The goal of every other kind against full attention at the same context, on one family: its mean AUROC over
    seeds at most `tolerance` below full attention's (the paired bootstrap interval of the difference where the
    predictions allow)."""
    references = {summary.max_length: summary for summary in summaries if summary.attention_type == REFERENCE_KIND}
    lines = []
    for summary in summaries:
        reference = references.get(summary.max_length)
        if summary.spec.is_baseline or summary.attention_type == REFERENCE_KIND or reference is None:
            continue
        difference = summary.mean_auroc - reference.mean_auroc
        interval = summary.reference_margin_interval
        lines.append(
            f"- {summary.attention_type} against {REFERENCE_KIND} at {summary.spec.context}: AUROC "
            f"{_format_mean_std(summary.auroc)} ({_seeds(summary)}) against {_format_mean_std(reference.auroc)} "
            f"({_seeds(reference)}), {difference:+.4f}"
            + ("" if interval is None else f" (95% CI {_interval(interval, '+.4f')})")
            + f" (goal: at least {-tolerance:+.2f}, **{'met' if difference >= -tolerance else 'not met'}**)."
        )
    return lines


def auroc_figure_name(family: str) -> str:
    """The file of a family's AUROC-against-context figure."""
    return f"results_{family}_auroc_vs_context.png"


def curves_figure_name(family: str) -> str:
    """The file of a family's learning-curves figure."""
    return f"results_{family}_learning_curves.png"


def context_verdict(summaries: list[GroupSummary], tolerance: float = 0.03, slack: float = 0.02) -> list[str]:
    """The long-context goals of one family: the best model configuration against the whole-history oracle (within
    `tolerance`), and its gain over every model with a shorter context against the gain of their windows' oracles
    (at least that gain minus `slack`)."""
    models = [summary for summary in summaries if not summary.spec.is_baseline]
    oracle_all = next((summary.oracle_all for summary in models if summary.oracle_all is not None), None)
    if not models or oracle_all is None:
        return []

    def reach(summary: GroupSummary) -> float:
        return math.inf if summary.max_length == WHOLE_HISTORY else summary.max_length

    best = max(models, key=lambda summary: summary.mean_auroc)
    gap = oracle_all - best.mean_auroc
    lines = [
        f"- Best: {best.attention_type} at {best.spec.context}, {gap:.4f} below the whole-history oracle "
        f"({'within' if gap <= tolerance else '**not within**'} {tolerance})."
    ]
    for shorter in models:
        if reach(shorter) >= reach(best) or shorter.oracle_window is None or best.oracle_window is None:
            continue
        gain, oracle_gain = best.mean_auroc - shorter.mean_auroc, best.oracle_window - shorter.oracle_window
        met = gain >= oracle_gain - slack
        lines.append(
            f"- It gains {gain:+.4f} over {shorter.attention_type} at {shorter.spec.context}, whose oracle is "
            f"{oracle_gain:.4f} lower (goal: at least {oracle_gain - slack:.4f}, **{'met' if met else 'not met'}**)."
        )
    return lines


def plot_family(summaries: list[GroupSummary], results: list[RunResult], family: str, figures_dir: Path) -> list[Path]:
    """Two figures of one family: AUROC against context (whole histories at the right end) with the oracle of each
    window and the baseline, and the learning curves (train loss, validation AUROC) of the first seed of each model
    next to the baseline's held-out AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figures_dir.mkdir(parents=True, exist_ok=True)
    models = [summary for summary in summaries if not summary.spec.is_baseline]
    baseline = next((summary for summary in summaries if summary.spec.is_baseline), None)
    # The oracle of every window some run recorded (the runs of a family share their held-out customers).
    oracle_curve = {window: value for s in models for window, value in s.oracle_by_window.items()}
    oracle_curve.update({s.max_length: s.oracle_window for s in models if s.oracle_window is not None})
    finite = sorted(({s.max_length for s in models} | set(oracle_curve)) - {WHOLE_HISTORY}) or [256]
    whole_x = finite[-1] * 4

    def x_of(summary: GroupSummary) -> int:
        return whole_x if summary.max_length == WHOLE_HISTORY else summary.max_length

    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(s.attention_type for s in models):
        points = sorted((s for s in models if s.attention_type == kind), key=x_of)
        errors = [mean_std(s.auroc)[1] or 0.0 for s in points]
        axis.errorbar(
            [x_of(s) for s in points], [s.mean_auroc for s in points], yerr=errors, marker="o", capsize=3, label=kind
        )
    oracle_points = sorted((whole_x if window == WHOLE_HISTORY else window, v) for window, v in oracle_curve.items())
    oracle_all = next((s.oracle_all for s in summaries if s.oracle_all is not None), None)
    if oracle_all is not None:
        oracle_points = sorted({*oracle_points, (whole_x, oracle_all)})
    if oracle_points:
        axis.plot(*zip(*oracle_points, strict=True), "k--", marker=".", linewidth=1, label="Bayes oracle, same window")
    if baseline is not None:
        axis.axhline(baseline.mean_auroc, color="tab:gray", linestyle="-.", linewidth=1, label="LightGBM, aggregates")
    ticks = [*finite, whole_x]
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [*(str(length) for length in finite), "whole"])
    axis.set(xlabel="context (most recent events)", ylabel="held-out AUROC", title=f"{family} family")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    auroc_path = figures_dir / auroc_figure_name(family)
    figure.savefig(auroc_path, dpi=90)
    pyplot.close(figure)

    figure, (loss_axis, auroc_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
    first_seed = {}
    for result in results:
        if result.spec.family == family and not result.spec.is_baseline and result.log_history:
            first_seed.setdefault((result.spec.attention_type, result.spec.max_length), result)
    for result in first_seed.values():
        label = f"{result.spec.attention_type}, {result.spec.context}"
        losses = [(entry["step"], entry["loss"]) for entry in result.log_history if "loss" in entry]
        validation = [
            (entry["step"], entry["eval_validation_auroc"])
            for entry in result.log_history
            if "eval_validation_auroc" in entry
        ]
        if losses:
            loss_axis.plot(*zip(*losses, strict=True), label=label)
        if validation:
            auroc_axis.plot(*zip(*validation, strict=True), marker=".", label=label)
    if baseline is not None:
        auroc_axis.axhline(baseline.mean_auroc, color="tab:gray", linestyle="-.", label="LightGBM (held-out)")
    loss_axis.axhline(math.log(2), color="k", linestyle=":", linewidth=1, label="chance (ln 2)")
    loss_axis.set(xlabel="optimizer step", ylabel="training loss", title=f"{family}: training loss")
    auroc_axis.set(xlabel="optimizer step", ylabel="validation AUROC", title=f"{family}: validation AUROC")
    for axis in (loss_axis, auroc_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    curves_path = figures_dir / curves_figure_name(family)
    figure.savefig(curves_path, dpi=90)
    pyplot.close(figure)
    return [auroc_path, curves_path]


def format_report(
    config: CompareConfig,
    results: list[RunResult],
    unfinished: list[RunSpec],
    command: str,
    figure_paths: dict[str, list[Path]],
    report_path: Path,
) -> str:
    """`docs/results.md`: a section per family, with its table, verdict and figures."""
    summaries = summarize(results)
    hardware = next((result.hardware for result in results if result.hardware), None) or {}
    machine = describe_machine(hardware)
    lines = [
        "# Results: quality and cost of each attention kind, against the baseline and the oracle",
        "",
        "Generated by `scripts/compare.py` (do not edit by hand); rerun to update. Command:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Machine of the runs: {machine}. Every model run trains the default model with the default recipe of "
        f"`scripts/train.py` (budget in optimizer steps, early stopping on a validation split carved from the training "
        f"customers, best checkpoint restored; [docs/recipe.md](recipe.md)), {config.effective_batch_size} histories "
        "per optimizer step, length-grouped batches, the profiling callback on; where the data calls for the "
        "long-history recipe, the family's section says so. The baseline is `scripts/baseline.py` "
        "(LightGBM on per-customer aggregates of the whole history; [docs/baseline.md](baseline.md)). Models and "
        "baseline see the same held-out customers (labelled customers split 90/10, split seed 42); the run seeds vary "
        "initialisation and order, not the data. The oracles are the exact Bayes posteriors of the generator on the "
        "same customers ([docs/data.md](data.md)), with the model's window of most recent events and with whole "
        "histories. Events/s: real (non-padding) events over step time. Peak memory: the training process's peak "
        "resident set (CPU) or CUDA allocation, as the profiling callback records it. AUROC 95% CI: percentile "
        f"bootstrap over the held-out customers ({BOOTSTRAP_RESAMPLES:,} resamples) of the AUROC averaged over the "
        "seeds, from the predictions every run writes (`eval_predictions.csv`, `baseline_predictions.csv`); each "
        "resample draws the same customers for every seed and, for a margin, for the baseline or full attention "
        "too. It shows how much the draw of held-out customers moves a result, where ± std shows the seeds' spread; "
        "– where a run has no predictions file (runs of version 0.2). Every other kind is held against full "
        "attention at the same context (goal: at most 0.02 below it). Speed and memory of each kind "
        f"against length: [docs/benchmark.md]({os.path.relpath(BENCHMARK_DOC, report_path.parent)}).",
        "",
    ]
    for family in dict.fromkeys(summary.family for summary in summaries):
        family_summaries = [summary for summary in summaries if summary.family == family]
        lines += [
            f"## The `{family}` family ({config.family_sizes().get(family, '?'):,} customers)",
            "",
            *family_recipe_lines(family),
            *results_table(family_summaries),
            "",
            *quality_verdict(family_summaries),
            *reference_verdict(family_summaries),
            *context_verdict(family_summaries),
            "",
        ]
        relative = [os.path.relpath(path, report_path.parent) for path in figure_paths.get(family, [])]
        lines += [f"![{Path(path).stem}]({path})" for path in relative]
        lines.append("")
    lines += [
        "## Scarce labels",
        "",
        "Pretraining on every customer plus fine-tuning on 10% of the labels, against supervised training on those 10% "
        "and with every label: `scripts/label_study.py`, report in "
        f"[label_study.md]({os.path.relpath(LABEL_STUDY_DOC, report_path.parent)}).",
        "",
    ]
    if unfinished:
        lines += ["## Not run yet", ""]
        lines += [f"- {spec.family}: {spec.attention_type}, {spec.context}, seed {spec.seed}" for spec in unfinished]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(config: CompareConfig, unfinished: list[RunSpec], command: str) -> Path:
    """Collects the finished runs and writes the report and its plots."""
    results = collect_results(config)
    summaries = summarize(results)
    report_path = Path(config.report)
    figure_paths = {
        family: plot_family(
            [summary for summary in summaries if summary.family == family], results, family, Path(config.figures_dir)
        )
        for family in dict.fromkeys(summary.family for summary in summaries)
    }
    report = format_report(config, results, unfinished, command, figure_paths, report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report, encoding="utf-8")
    return report_path
