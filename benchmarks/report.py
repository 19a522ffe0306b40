"""The benchmark's outputs: CSV of every point, a Markdown report with the ratios and the ∞-former verdict, log-log
plots of time and memory against length, and a JSON record of the machine, versions and settings."""

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

from txformer.machine import describe_machine

from .models import EXACT_REFERENCE, METHODS, PEERS, peer_versions
from .suite import CHECK_LEVEL, LEVEL_TITLES, LEVELS, BenchmarkConfig, BenchmarkResult, BenchmarkRow, safe_ratio


CSV_FILE = "benchmark.csv"
MARKDOWN_FILE = "benchmark.md"
JSON_FILE = "benchmark.json"
TIMING_METHOD = (
    "Time: `torch.utils.benchmark.Timer.blocked_autorange`, a warm-up run, then blocks of runs (one run per block "
    "once a run outlasts the clock's overhead) for at least {min_run_time:g} s; the median time per run."
)
MEMORY_METHOD = (
    "Peak memory: on CPU the rise of the process's resident set (VmHWM after resetting it through "
    "/proc/self/clear_refs, freed heap first returned with malloc_trim) above its level just before a timed block, so "
    "model weights and inputs made before are excluded while everything the block allocates counts; on CUDA the rise "
    "of `max_memory_allocated`. Median over the timed blocks, each measured from just before it."
)
TENSOR_MEMORY_METHOD = (
    "Peak tensor memory (check only): the highest sum of live tensor bytes allocated during one extra, untimed run, "
    "from the allocation and free events of the PyTorch profiler (`profile_memory=True`): exact, page- and "
    "allocator-independent, but blind to memory outside tensors."
)


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: the formatted number and its suffix, or a dash when unknown."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec) + suffix


def _label(method: str) -> str:
    return METHODS[method].label


def level_table(rows: list[BenchmarkRow]) -> list[str]:
    """Markdown table of one level's rows (by length, then method)."""
    exact, peer_of = _label(EXACT_REFERENCE), {ours: _label(peers[0]) for ours, peers in PEERS.items()}
    lines = [
        "| method | length | time (ms) | peak memory (MiB) | events/s | µs/event vs first length "
        f"| time vs {exact} | memory vs {exact} | time vs peer | memory vs peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peer = f" ({peer_of[row.method]})" if row.time_vs_peer is not None else ""
        lines.append(
            f"| {_label(row.method)} | {row.length:,} | {1e3 * row.time_s:,.1f} | {_cell(row.peak_memory_mib, ',.1f')} "
            f"| {row.tokens_per_s:,.0f} | {_cell(row.us_per_event_vs_first, '.2f')} "
            f"| {_cell(row.time_vs_exact, '.2f', '×')} | {_cell(row.memory_vs_exact, '.2f', '×')} "
            f"| {_cell(row.time_vs_peer, '.2f', '×')}{peer} | {_cell(row.memory_vs_peer, '.2f', '×')} |"
        )
    return lines


def check_table(rows: list[BenchmarkRow]) -> list[str]:
    """Markdown table of the ∞-former check."""
    lines = [
        "| method | length | time (s) | µs/event | µs/event vs first | peak memory (MiB) | memory vs first "
        "| peak tensor memory (MiB) | tensor memory vs first |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {_label(row.method)} | {row.length:,} | {row.time_s:,.2f} | {row.us_per_event:,.1f} "
            f"| {_cell(row.us_per_event_vs_first, '.2f')} | {_cell(row.peak_memory_mib, ',.1f')} "
            f"| {_cell(row.memory_vs_first, '.2f', '×')} | {_cell(row.tensor_peak_mib, ',.1f')} "
            f"| {_cell(row.tensor_memory_vs_first, '.2f', '×')} |"
        )
    return lines


def check_verdict(rows: list[BenchmarkRow], goal: float) -> list[str]:
    """The ∞-former memory goal and time linearity, from its first and longest check lengths."""
    infinity = sorted((row for row in rows if row.method == "infinity"), key=lambda row: row.length)
    if len(infinity) < 2:
        return ["The ∞-former was measured at fewer than two check lengths: no verdict."]
    first, last = infinity[0], infinity[-1]
    lines = []
    for name, ratio in (("resident", last.memory_vs_first), ("tensor", last.tensor_memory_vs_first)):
        if ratio is None:
            continue
        verdict = "meets" if ratio <= goal else "misses"
        lines.append(
            f"- ∞-former peak {name} memory at L={last.length:,} / at L={first.length:,}: **{ratio:.2f}×** "
            f"({verdict} the goal ≤ {goal:g}×)."
        )
    lines.append(
        f"- ∞-former time per event at L={last.length:,} / at L={first.length:,}: **{last.us_per_event_vs_first:.2f}** "
        f"(1 = linear in length; the time ratio is {last.time_s / first.time_s:.1f} for a length ratio of "
        f"{last.length / first.length:.1f})."
    )
    for method in sorted({row.method for row in rows} - {"infinity"}):
        longest = max((row for row in rows if row.method == method), key=lambda row: row.length)
        lines.append(
            f"- {_label(method)}: measured up to L={longest.length:,} ({longest.time_s:.2f} s, "
            f"{_cell(longest.peak_memory_mib, ',.0f')} MiB resident, {_cell(longest.tensor_peak_mib, ',.0f')} MiB "
            f"tensors; memory vs its first length {_cell(longest.memory_vs_first, '.2f', '×')})."
        )
    return lines


def peer_ratio(rows: list[BenchmarkRow], ours: str, peer: str) -> list[str]:
    """Ours against one peer at the longest length where both were measured (none if there is no such length)."""
    peer_rows = {row.length: row for row in rows if row.method == peer}
    paired = [row for row in rows if row.method == ours and row.length in peer_rows]
    if not paired:
        return []
    row = max(paired, key=lambda row: row.length)
    theirs = peer_rows[row.length]
    memory = safe_ratio(row.peak_memory_mib, theirs.peak_memory_mib)
    return [
        f"{_label(ours)} vs {_label(peer)} at L={row.length:,}: {row.time_s / theirs.time_s:.2f}× the time, "
        f"{_cell(memory, '.2f', '×')} the memory"
    ]


def headline(rows: list[BenchmarkRow], levels: list[str]) -> list[str]:
    """Per level, the ratios at the longest length where both sides were measured: ours against each of our peers,
    every method against exact SDPA."""
    lines = []
    for level in levels:
        level_rows = [row for row in rows if row.level == level]
        parts = []
        for ours, peers in PEERS.items():
            for peer in peers:
                parts += peer_ratio(level_rows, ours, peer)
        against_exact = [row for row in level_rows if row.time_vs_exact is not None]
        if against_exact:
            longest = max(row.length for row in against_exact)
            ratios = ", ".join(
                f"{_label(row.method)} {row.time_vs_exact:.2f}× / {_cell(row.memory_vs_exact, '.2f', '×')}"
                for row in against_exact
                if row.length == longest
            )
            parts.append(f"time / memory vs {_label(EXACT_REFERENCE)} at L={longest:,}: {ratios}")
        if parts:
            lines.append(f"- {level}: " + "; ".join(parts) + ".")
    return lines


def format_markdown(result: BenchmarkResult, config: BenchmarkConfig, command: str) -> str:
    """The whole report."""
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in peer_versions().items())
    lines = [
        "# Benchmark: speed and memory against length",
        "",
        f"Command: `{command}`",
        "",
        f"Run {result.started}, {result.wall_time_s / 60:.1f} min on {result.device}. Machine: {describe_machine()}; "
        f"{versions}. "
        f"Load average (1/5/15 min) at start {result.load_average['start']}, at end {result.load_average['end']}.",
        "",
        f"Model: the default `TxFormerConfig` ({config.config_overrides or 'no overrides'}), batch {config.batch_size}, "
        f"{config.dtype}. {TIMING_METHOD.format(min_run_time=config.min_run_time)} Every history has exactly "
        "`length` events (no padding). Ratios compare methods measured side by side at the same length in this run "
        "(< 1× = faster or smaller); µs/event vs first length = 1 means linear time.",
        "",
        MEMORY_METHOD,
        "",
    ]
    summary = headline(result.rows, config.model_levels())
    if summary:
        lines += ["## Headline ratios", "", *summary, ""]
    for level in LEVELS:
        level_rows = sorted(
            (row for row in result.rows if row.level == level), key=lambda row: (row.length, config_order(row))
        )
        if not level_rows:
            continue
        lines += [f"## {LEVEL_TITLES[level]}", ""]
        if level == CHECK_LEVEL:
            lines += [
                TENSOR_MEMORY_METHOD,
                "",
                *check_table(level_rows),
                "",
                *check_verdict(level_rows, config.check_memory_goal),
            ]
        else:
            lines += level_table(level_rows)
        notes = [skip for skip in result.skipped if skip[0] == level]
        seen = set()
        for _, method, _, reason in notes:
            if method not in seen:
                seen.add(method)
                lines.append(f"\n{_label(method)} not measured {reason}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def config_order(row: BenchmarkRow) -> int:
    """Position of a row's method in the method list (for stable tables)."""
    return list(METHODS).index(row.method)


def level_figure_name(level: str) -> str:
    """The file of a level's time-and-memory-against-length figure."""
    return f"benchmark_{level}.png"


def plot_results(result: BenchmarkResult, output_dir: Path) -> list[Path]:
    """One PNG per level: time and peak memory against length, log-log, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    paths = []
    for level in sorted({row.level for row in result.rows}, key=list(LEVEL_TITLES).index):
        rows = [row for row in result.rows if row.level == level]
        figure, (time_axis, memory_axis) = pyplot.subplots(1, 2, figsize=(10, 4))
        for method in sorted({row.method for row in rows}, key=list(METHODS).index):
            points = sorted((row for row in rows if row.method == method), key=lambda row: row.length)
            lengths = [row.length for row in points]
            color = f"C{list(METHODS).index(method)}"  # the same colour for a method in every plot
            time_axis.plot(lengths, [row.time_s for row in points], marker="o", color=color, label=_label(method))
            memory_axis.plot(
                lengths, [row.peak_memory_mib for row in points], marker="o", color=color, label=_label(method)
            )
            if level == CHECK_LEVEL and not all(math.isnan(row.tensor_peak_mib) for row in points):
                memory_axis.plot(
                    lengths,
                    [row.tensor_peak_mib for row in points],
                    marker="x",
                    linestyle="--",
                    color=color,
                    label=f"{_label(method)} (tensors)",
                )
        time_axis.set(xscale="log", yscale="log", xlabel="length (events)", ylabel="time (s)")
        memory_axis.set(xscale="log", yscale="log", xlabel="length (events)", ylabel="peak memory (MiB)")
        for axis in (time_axis, memory_axis):
            axis.grid(True, which="both", alpha=0.3)
        memory_axis.legend(fontsize=7)
        figure.suptitle(LEVEL_TITLES[level], fontsize=10)
        figure.tight_layout()
        path = output_dir / level_figure_name(level)
        figure.savefig(path, dpi=90)
        pyplot.close(figure)
        paths.append(path)
    return paths


def write_results(
    result: BenchmarkResult, config: BenchmarkConfig, command: str, output_dir: str | Path
) -> list[Path]:
    """Writes the CSV, the Markdown report, the JSON record and the plots; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(result, config, command)
    paths = [output_dir / CSV_FILE, output_dir / MARKDOWN_FILE, output_dir / JSON_FILE]
    with open(paths[0], "w", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=list(BenchmarkRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in result.rows)
    paths[1].write_text(markdown, encoding="utf-8")
    record = {
        "command": command,
        "config": asdict(config),
        "machine": describe_machine(),
        "peers": peer_versions(),
        "started": result.started,
        "wall_time_s": result.wall_time_s,
        "load_average": result.load_average,
        "skipped": result.skipped,
    }
    paths[2].write_text(json.dumps(record, indent=2), encoding="utf-8")
    return paths + plot_results(result, output_dir)
