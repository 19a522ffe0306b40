"""The comparison report: train every attention kind at several context lengths and seeds (each run a
`scripts/train.py` process with the profiling callback on, in its own folder), then aggregate AUROC, accuracy,
throughput and memory next to the oracle AUROCs of the synthetic data into `docs/results.md` and plots.

Runs are resumable: a folder with `all_results.json` is finished and skipped; with `time_limit_minutes`, a run that
reaches the limit is stopped and continues from its last complete checkpoint at the next call (checkpoints are
removed once the run has finished and saved its model).
"""

import json
import math
import os
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

from ..io_utils import atomic_write_json


RESULTS_FILE = "all_results.json"
STEPS_FILE = "profile_steps.jsonl"
SUMMARY_FILE = "profile_summary.json"
RUN_RECORD_FILE = "compare_run.json"
TRAINER_STATE_FILE = "trainer_state.json"
WHOLE_HISTORY = 0
BENCHMARK_DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmark.md"
# Context length a whole history counts as when choosing the micro-batch size (the longest histories are grouped).
WHOLE_HISTORY_BATCH_LENGTH = 8192


@dataclass(frozen=True)
class RunSpec:
    """One training run: an attention kind, its context (`max_length`, 0 = whole histories) and a seed."""

    attention_type: str
    max_length: int
    seed: int

    @property
    def name(self) -> str:
        context = "whole" if self.max_length == WHOLE_HISTORY else str(self.max_length)
        return f"{self.attention_type}-{context}-seed{self.seed}"

    @property
    def context(self) -> str:
        """How tables name the context."""
        return "whole history" if self.max_length == WHOLE_HISTORY else f"last {self.max_length:,}"


@dataclass
class CompareConfig:
    """The grid of runs and how they are trained (one command-line flag per field)."""

    runs: list[str] = field(
        default_factory=lambda: ["full:64,256,1024", "performer:256,1024,4096", "infinity:0,1024"],
        metadata={"help": "KIND:LENGTH,LENGTH,... per attention kind; length 0 = whole histories."},
    )
    seeds: list[int] = field(default_factory=lambda: [42, 43], metadata={"help": "Training seeds (init, order)."})
    output_dir: str = field(default="outputs/compare", metadata={"help": "One folder per run inside."})
    report: str = field(default="docs/results.md", metadata={"help": "The Markdown report written at the end."})
    figures_dir: str = field(default="docs/figures", metadata={"help": "Where the report's PNG plots go."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs of every run."})
    effective_batch_size: int = field(default=64, metadata={"help": "Histories per optimizer step."})
    micro_batch_events: int = field(
        default=65536,
        metadata={"help": "Padded events per forward pass: sets the micro-batch (gradient accumulation fills up)."},
    )
    time_limit_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Stop a run after this long in one call and resume it from its last checkpoint at the next call "
            "(0: no limit, no checkpoints)."
        },
    )
    save_steps: int = field(default=25, metadata={"help": "Checkpoint interval when time_limit_minutes is set."})
    num_threads: int = field(default=0, metadata={"help": "OMP_NUM_THREADS of the runs (0: inherit)."})
    report_only: bool = field(default=False, metadata={"help": "Only aggregate the finished runs into the report."})
    dry_run: bool = field(default=False, metadata={"help": "Print the commands of the runs still to do, run none."})

    def specs(self) -> list[RunSpec]:
        """Every run of the grid, seed-major (so that a first seed of every configuration finishes first)."""
        grid = []
        for item in self.runs:
            kind, _, lengths = item.partition(":")
            if not lengths:
                raise ValueError(f"Run {item!r} is not KIND:LENGTH[,LENGTH...].")
            grid += [(kind, int(length)) for length in lengths.split(",")]
        return [RunSpec(kind, length, seed) for seed in self.seeds for kind, length in grid]


def micro_batch_size(spec: RunSpec, config: CompareConfig) -> int:
    """Histories per forward pass: the largest power of two that keeps `micro_batch_events` padded events, at most
    the effective batch size."""
    length = WHOLE_HISTORY_BATCH_LENGTH if spec.max_length == WHOLE_HISTORY else spec.max_length
    size = 1
    while size * 2 <= config.effective_batch_size and size * 2 * length <= config.micro_batch_events:
        size *= 2
    return size


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer state (written last by the Trainer) is readable."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]), reverse=True)
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        return checkpoint
    return None


def train_command(spec: RunSpec, config: CompareConfig, extra_args: list[str]) -> list[str]:
    """The `scripts/train.py` command of a run (resuming from its last checkpoint when there is one)."""
    run_dir = Path(config.output_dir) / spec.name
    micro = micro_batch_size(spec, config)
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[2] / "scripts" / "train.py"),
        "--attention_type", spec.attention_type,
        "--max_length", str(spec.max_length),
        "--seed", str(spec.seed),
        "--output_dir", str(run_dir),
        "--num_train_epochs", str(config.num_train_epochs),
        "--per_device_train_batch_size", str(micro),
        "--gradient_accumulation_steps", str(max(1, config.effective_batch_size // micro)),
        "--per_device_eval_batch_size", str(micro),
        "--group_by_length",
        "--eval_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if config.time_limit_minutes > 0:
        command += ["--save_strategy", "steps", "--save_steps", str(config.save_steps), "--save_total_limit", "1"]
        checkpoint = last_complete_checkpoint(run_dir)
        if checkpoint is not None:
            command += ["--resume_from_checkpoint", str(checkpoint)]
    else:
        command += ["--save_strategy", "no"]
    return command + extra_args


def is_finished(run_dir: Path) -> bool:
    """A run is finished once the training script wrote its metrics."""
    return (run_dir / RESULTS_FILE).exists()


def run_one(spec: RunSpec, config: CompareConfig, extra_args: list[str], log: Callable[[str], None]) -> bool:
    """Runs (or continues) one training in a subprocess, its output logged to `train.log` in its folder; records
    each call's wall time in `compare_run.json`. Returns whether the run finished."""
    run_dir = Path(config.output_dir) / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(spec, config, extra_args)
    record_path = run_dir / RUN_RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {"spec": asdict(spec), "calls": []}
    environment = dict(os.environ)
    if config.num_threads > 0:
        environment["OMP_NUM_THREADS"] = str(config.num_threads)
    log(f"[{spec.name}] {shlex.join(command)}")
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log_file:
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
        log(f"[{spec.name}] failed (exit {return_code}) after {wall_s / 60:.1f} min: see {run_dir / 'train.log'}")
    else:
        state = "finished" if finished else "stopped at the time limit, resumes at the next call"
        log(f"[{spec.name}] {state} after {wall_s / 60:.1f} min")
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
    events_per_s: float | None
    events_per_s_median: float | None
    peak_memory_mib: float | None
    train_minutes: float | None
    wall_minutes: float | None
    hardware: dict | None


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


def read_run(run_dir: Path, spec: RunSpec) -> RunResult:
    """The metrics of a finished run: held-out AUROC and accuracy, the oracles, and from the profiling callback's
    steps file the throughput over all steps (real events / step time), the median per-step throughput and the peak
    memory; the wall time from the run record."""
    metrics = json.loads((run_dir / RESULTS_FILE).read_text())
    steps = read_steps(run_dir / STEPS_FILE)
    counted = [step for step in steps if step.get("tokens") is not None]
    step_time = sum(step["step_time_s"] for step in counted)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    record_path = run_dir / RUN_RECORD_FILE
    calls = json.loads(record_path.read_text())["calls"] if record_path.exists() else []
    return RunResult(
        spec=spec,
        auroc=metrics["eval_auroc"],
        accuracy=metrics["eval_accuracy"],
        oracle_all=metrics.get("oracle_auroc_all"),
        oracle_window=metrics.get("oracle_auroc_last_max_length"),
        events_per_s=sum(step["tokens"] for step in counted) / step_time if step_time > 0 else None,
        events_per_s_median=statistics.median(step["tokens_per_s"] for step in counted) if counted else None,
        peak_memory_mib=max((step["peak_memory_mib"] for step in steps), default=None),
        train_minutes=sum(step["step_time_s"] for step in steps) / 60 if steps else None,
        wall_minutes=sum(call["wall_time_s"] for call in calls) / 60 if calls else None,
        hardware=summary.get("hardware"),
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
    """The seeds of one (kind, context) configuration."""

    attention_type: str
    max_length: int
    seeds: list[int]
    auroc: list[float]
    accuracy: list[float]
    oracle_all: float | None
    oracle_window: float | None
    events_per_s: float | None
    peak_memory_mib: float | None
    wall_minutes: float | None

    @property
    def context(self) -> str:
        return RunSpec(self.attention_type, self.max_length, 0).context


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(results: list[RunResult]) -> list[GroupSummary]:
    """One summary per (kind, context), in the order the grid lists them."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.spec.attention_type, result.spec.max_length), []).append(result)

    def median_of(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    summaries = []
    for (kind, length), runs in groups.items():
        summaries.append(
            GroupSummary(
                attention_type=kind,
                max_length=length,
                seeds=[run.spec.seed for run in runs],
                auroc=[run.auroc for run in runs],
                accuracy=[run.accuracy for run in runs],
                oracle_all=runs[0].oracle_all,
                oracle_window=runs[0].oracle_window,
                events_per_s=median_of([run.events_per_s for run in runs]),
                peak_memory_mib=max((run.peak_memory_mib for run in runs if run.peak_memory_mib), default=None),
                wall_minutes=median_of([run.wall_minutes for run in runs]),
            )
        )
    return summaries


def _format_mean_std(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _optional(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(summaries: list[GroupSummary]) -> list[str]:
    """The headline table."""
    lines = [
        "| attention | context | seeds | AUROC (mean ± std) | accuracy | oracle AUROC, same window | "
        "gap to oracle, all events | train events/s | peak memory (MiB) | wall time per run (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for summary in summaries:
        mean_auroc = statistics.fmean(summary.auroc)
        gap = None if summary.oracle_all is None else summary.oracle_all - mean_auroc
        lines.append(
            f"| {summary.attention_type} | {summary.context} | {len(summary.seeds)} | {_format_mean_std(summary.auroc)} "
            f"| {_format_mean_std(summary.accuracy)} | {_optional(summary.oracle_window, '.4f')} "
            f"| {_optional(gap, '.4f')} | {_optional(summary.events_per_s, ',.0f')} "
            f"| {_optional(summary.peak_memory_mib, ',.0f')} | {_optional(summary.wall_minutes, '.1f')} |"
        )
    return lines


def infinity_verdict(summaries: list[GroupSummary], results: list[RunResult], tolerance: float = 0.03) -> list[str]:
    """Issue 4's quality goals, from the runs that exist: the ∞-former on whole histories against full attention at
    each of its contexts (on the seeds both have), and against the whole-history oracle."""
    by_spec = {(result.spec.attention_type, result.spec.max_length, result.spec.seed): result for result in results}
    infinity = next((s for s in summaries if s.attention_type == "infinity" and s.max_length == WHOLE_HISTORY), None)
    if infinity is None:
        return ["No finished ∞-former whole-history run yet: no verdict."]
    mean_auroc = statistics.fmean(infinity.auroc)
    lines = []
    if infinity.oracle_all is not None:
        gap = infinity.oracle_all - mean_auroc
        verdict = "within" if gap <= tolerance else "not within"
        lines.append(
            f"- ∞-former, whole histories: AUROC {_format_mean_std(infinity.auroc)} over seeds {infinity.seeds}; the "
            f"whole-history oracle is {infinity.oracle_all:.4f}, a gap of {gap:.4f}: **{verdict} {tolerance}**."
        )
    for full in (s for s in summaries if s.attention_type == "full"):
        seeds = [seed for seed in infinity.seeds if seed in full.seeds]
        if not seeds:
            continue
        differences = [
            by_spec[("infinity", WHOLE_HISTORY, seed)].auroc - by_spec[("full", full.max_length, seed)].auroc
            for seed in seeds
        ]
        mean, _ = mean_std(differences)
        wins = sum(difference > 0 for difference in differences)
        lines.append(
            f"- against full attention on the {full.context} events, same seeds {seeds}: AUROC difference "
            f"{', '.join(f'{d:+.4f}' for d in differences)} (mean {mean:+.4f}; ∞-former higher in {wins} of "
            f"{len(seeds)})."
        )
    return lines


def plot_results(summaries: list[GroupSummary], figures_dir: Path) -> list[Path]:
    """AUROC against context length (whole histories at the right end) with the oracles, and cost against length."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figures_dir.mkdir(parents=True, exist_ok=True)
    finite = sorted({s.max_length for s in summaries if s.max_length != WHOLE_HISTORY}) or [256]
    whole_x = finite[-1] * 4

    def x_of(summary: GroupSummary) -> int:
        return whole_x if summary.max_length == WHOLE_HISTORY else summary.max_length

    kinds = list(dict.fromkeys(s.attention_type for s in summaries))
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for kind in kinds:
        points = sorted((s for s in summaries if s.attention_type == kind), key=x_of)
        means = [statistics.fmean(s.auroc) for s in points]
        errors = [mean_std(s.auroc)[1] or 0.0 for s in points]
        axis.errorbar([x_of(s) for s in points], means, yerr=errors, marker="o", capsize=3, label=kind)
    oracle_points = sorted(
        {(x_of(s), s.oracle_window) for s in summaries if s.oracle_window is not None}, key=lambda point: point[0]
    )
    if oracle_points:
        axis.plot(*zip(*oracle_points, strict=True), "k--", linewidth=1, label="oracle, same window")
    oracle_all = next((s.oracle_all for s in summaries if s.oracle_all is not None), None)
    if oracle_all is not None:
        axis.axhline(oracle_all, color="k", linestyle=":", linewidth=1, label="oracle, all events")
    ticks = [*finite, whole_x]
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [*(str(length) for length in finite), "whole"])
    axis.set(xlabel="context (most recent events)", ylabel="held-out AUROC")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    auroc_path = figures_dir / "results_auroc_vs_context.png"
    figure.savefig(auroc_path, dpi=90)
    pyplot.close(figure)

    figure, (speed_axis, memory_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
    for kind in kinds:
        points = sorted((s for s in summaries if s.attention_type == kind), key=x_of)
        xs = [x_of(s) for s in points]
        speed_axis.plot(xs, [s.events_per_s or math.nan for s in points], marker="o", label=kind)
        memory_axis.plot(xs, [s.peak_memory_mib or math.nan for s in points], marker="o", label=kind)
    for axis, label in ((speed_axis, "training events/s"), (memory_axis, "peak memory of the process (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [*(str(length) for length in finite), "whole"])
        axis.set(xlabel="context (most recent events)", ylabel=label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    cost_path = figures_dir / "results_cost_vs_context.png"
    figure.savefig(cost_path, dpi=90)
    pyplot.close(figure)
    return [auroc_path, cost_path]


def format_report(
    config: CompareConfig,
    results: list[RunResult],
    unfinished: list[RunSpec],
    command: str,
    figure_paths: list[Path],
    report_path: Path,
) -> str:
    """`docs/results.md`."""
    summaries = summarize(results)
    hardware = next((result.hardware for result in results if result.hardware), None) or {}
    machine = (
        f"{hardware.get('cpu_model', '?')}, {hardware.get('cpu_count', '?')} CPUs, "
        f"{(hardware.get('memory_total_mib') or 0) / 1024:.0f} GiB, GPUs: {hardware.get('gpu_names') or 'none'}"
    )
    lines = [
        "# Results: quality and cost of each attention kind",
        "",
        "Generated by `scripts/compare.py` (do not edit by hand); rerun to update. Command:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Machine of the runs: {machine}. Every run trains the default model (hidden 64, 2 layers) with "
        f"`scripts/train.py` on the default synthetic data (8,000 customers, of which the labelled ones are split "
        f"90/10 into training and held out), {config.num_train_epochs:g} epochs, {config.effective_batch_size} "
        "histories per optimizer step, length-grouped batches (`--group_by_length`), the profiling callback on; the "
        "seeds vary initialisation and order, not the data. AUROC and accuracy are on the held-out customers. The "
        "oracles are the exact Bayes posteriors of the generator on the same customers: with the same window of "
        "most recent events as the model, and with all events. Events/s: real (non-padding) events over step time, "
        "all steps. Peak memory: the training process's peak resident set (CPU) or CUDA allocation, as the profiling "
        "callback records it (on CPU it includes the dataset and the Python process). The speed and memory of each "
        "kind against length, measured alone and side by side with its peers, are in "
        f"[docs/benchmark.md]({os.path.relpath(BENCHMARK_DOC, report_path.parent)}).",
        "",
        *results_table(summaries),
        "",
        "## The ∞-former goals (issue 4)",
        "",
        *infinity_verdict(summaries, results),
        "",
    ]
    relative = [os.path.relpath(path, report_path.parent) for path in figure_paths]
    lines += [f"![{Path(path).stem}]({path})" for path in relative]
    if unfinished:
        lines += ["", "## Not run yet", ""]
        lines += [f"- {spec.attention_type}, {spec.context}, seed {spec.seed}" for spec in unfinished]
    return "\n".join(lines) + "\n"


def write_report(config: CompareConfig, unfinished: list[RunSpec], command: str) -> Path:
    """Collects the finished runs and writes the report and its plots."""
    results = collect_results(config)
    report_path = Path(config.report)
    figure_paths = plot_results(summarize(results), Path(config.figures_dir)) if results else []
    report = format_report(config, results, unfinished, command, figure_paths, report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report, encoding="utf-8")
    return report_path
