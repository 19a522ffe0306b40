"""Attention-op benchmark, forward + backward over sequence lengths: FAVOR+ (ours) against performer-pytorch's
`FastAttention` (when installed), our sliding-window attention, exact SDPA and a naive softmax attention. Reports
time, peak memory, tokens/s, the ratios that matter (every method's time vs SDPA, ours vs performer-pytorch, tokens/s
at each length vs a reference length), the fraction of the machine's GEMM throughput reached, and the length from
which FAVOR+ and the sliding window beat SDPA."""

import csv
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional

from txformer.attention_local import local_attention
from txformer.attention_performer import draw_orthogonal_features, favor_attention

from .measure import measure_forward_backward, measure_matmul_flops


OURS = "favor+ (ours)"
PERFORMER_PYTORCH = "performer-pytorch"
SDPA = "sdpa (exact)"
NAIVE = "naive softmax (exact)"
LOCAL = "sliding window (ours)"
LINEAR_METHODS = (OURS, PERFORMER_PYTORCH)
CSV_FILE = "attention_benchmark.csv"
MARKDOWN_FILE = "attention_benchmark.md"


@dataclass
class AttentionBenchmarkConfig:
    """What to measure. Exact methods stop at their own maximum length (quadratic time; naive: quadratic memory)."""

    lengths: list[int] = field(
        default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192, 16384, 32768],
        metadata={"help": "Sequence lengths (events per history)."},
    )
    max_sdpa_length: int = field(default=8192, metadata={"help": "Longest length measured for SDPA."})
    max_naive_length: int = field(default=4096, metadata={"help": "Longest length for the naive softmax attention."})
    batch_size: int = field(default=4, metadata={"help": "Histories per batch."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    head_dim: int = field(default=32, metadata={"help": "Head dimension d (also of the values)."})
    num_features: int = field(default=128, metadata={"help": "Random features m of FAVOR+."})
    min_run_time: float = field(
        default=1.0,
        metadata={
            "help": "Seconds of timed runs per point after a warm-up run (Timer.blocked_autorange; the median)."
        },
    )
    local_window: int = field(default=128, metadata={"help": "Window w of the sliding window (events on each side)."})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda."})
    reference_length: int = field(default=1024, metadata={"help": "Length the tokens/s ratios refer to."})
    seed: int = field(default=0, metadata={"help": "Seed of the inputs and of the projection."})


@dataclass
class BenchmarkRow:
    """One method at one length. Ratios are None where their reference was not measured."""

    method: str
    length: int
    time_ms: float
    peak_memory_mib: float
    tokens_per_s: float
    gemm_roofline_fraction: float
    time_vs_sdpa: float | None = None
    tokens_per_s_vs_reference: float | None = None
    speedup_vs_performer_pytorch: float | None = None
    memory_vs_performer_pytorch: float | None = None


def favor_flops(config: AttentionBenchmarkConfig, length: int) -> float:
    """GEMM FLOPs of a non-causal FAVOR+ forward + backward (self-attention, values of width d), without recomputation:
    forward Q′, K′ (L·d·m each), K′ᵀ[V|1] and Q′S (L·m·(d+1) each); backward dQ′, dS, dK′ (L·m·(d+1) each), dV
    (L·m·d), dQ and dK (L·m·d each)."""
    head_dim, num_features = config.head_dim, config.num_features
    per_row = 2 * num_features * (4 * head_dim + 5 * (head_dim + 1) + head_dim)
    return config.batch_size * config.num_heads * length * per_row


def exact_attention_flops(config: AttentionBenchmarkConfig, length: int) -> float:
    """GEMM FLOPs of an exact attention forward (QKᵀ, PV) + backward (dV, dP, dQ, dK), 2·L²·d each."""
    return config.batch_size * config.num_heads * 6 * 2 * length**2 * config.head_dim


def local_attention_flops(config: AttentionBenchmarkConfig, length: int) -> float:
    """GEMM FLOPs of the sliding window's exact attention over blocks (each query against 3w keys)."""
    return exact_attention_flops(config, length) * min(1.0, 3 * config.local_window / length)


def naive_softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with the full score matrix materialised."""
    scores = torch.matmul(query, key.transpose(-2, -1)) * query.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def build_methods(config: AttentionBenchmarkConfig) -> dict[str, tuple[Callable[..., torch.Tensor], int]]:
    """Each method's callable `(query, key, value) -> output` and its maximum length. FAVOR+ and performer-pytorch
    share one projection matrix."""
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(config.seed)
    projection = draw_orthogonal_features(config.num_features, config.head_dim, generator=generator, device=device)
    max_length = max(config.lengths)
    methods: dict[str, tuple[Callable[..., torch.Tensor], int]] = {
        OURS: (lambda query, key, value: favor_attention(query, key, value, projection), max_length)
    }
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        FastAttention = None
    if FastAttention is not None:
        fast_attention = FastAttention(dim_heads=config.head_dim, nb_features=config.num_features).to(device)
        fast_attention.projection_matrix.copy_(projection)
        methods[PERFORMER_PYTORCH] = (fast_attention, max_length)
    methods[LOCAL] = (lambda query, key, value: local_attention(query, key, value, config.local_window), max_length)
    methods[SDPA] = (functional.scaled_dot_product_attention, config.max_sdpa_length)
    methods[NAIVE] = (naive_softmax_attention, config.max_naive_length)
    return methods


def random_inputs(config: AttentionBenchmarkConfig, length: int) -> list[torch.Tensor]:
    """Queries and keys ~ 0.5 N(0, 1) (moderate attention), values ~ N(0, 1), all requiring gradients."""
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, config.num_heads, length, config.head_dim)
    scales = (0.5, 0.5, 1.0)
    return [(scale * torch.randn(shape, generator=generator)).to(config.device).requires_grad_() for scale in scales]


def add_ratios(rows: list[BenchmarkRow], reference_length: int) -> None:
    """Fills the ratio columns: time against SDPA at the same length, tokens/s against the same method at
    `reference_length`, and ours against performer-pytorch at the same length (time: theirs / ours; memory: ours /
    theirs)."""
    by_key = {(row.method, row.length): row for row in rows}
    for row in rows:
        sdpa = by_key.get((SDPA, row.length))
        if sdpa is not None:
            row.time_vs_sdpa = row.time_ms / sdpa.time_ms
        reference = by_key.get((row.method, reference_length))
        if reference is not None:
            row.tokens_per_s_vs_reference = row.tokens_per_s / reference.tokens_per_s
        theirs = by_key.get((PERFORMER_PYTORCH, row.length))
        if row.method == OURS and theirs is not None:
            row.speedup_vs_performer_pytorch = theirs.time_ms / row.time_ms
            row.memory_vs_performer_pytorch = row.peak_memory_mib / theirs.peak_memory_mib


def crossover_length(rows: list[BenchmarkRow], method: str = OURS) -> int | None:
    """Smallest measured length from which `method` is faster than SDPA at every longer length measured for both;
    None if SDPA is faster at the longest common length."""
    times = {(row.method, row.length): row.time_ms for row in rows}
    common = sorted(length for name, length in times if name == SDPA and (method, length) in times)
    crossover = None
    for length in reversed(common):
        if times[(method, length)] >= times[(SDPA, length)]:
            break
        crossover = length
    return crossover


def run_attention_benchmark(
    config: AttentionBenchmarkConfig, log: Callable[[str], None] = print
) -> tuple[list[BenchmarkRow], dict[str, float | int | None]]:
    """Measures every method at every length up to its maximum; returns the rows and a summary (GEMM FLOP/s of the
    machine, crossover length against SDPA)."""
    device = torch.device(config.device)
    gemm_flops_per_s = measure_matmul_flops(device)
    log(f"achieved GEMM throughput (float32 2048² matmul): {gemm_flops_per_s / 1e9:.1f} GFLOP/s")
    methods = build_methods(config)
    rows = []
    for length in sorted(config.lengths):
        inputs = random_inputs(config, length)
        tokens = config.batch_size * length
        for method, (function, max_length) in methods.items():
            if length > max_length:
                continue
            measurement = measure_forward_backward(function, inputs, config.min_run_time)
            if method in LINEAR_METHODS:
                flops = favor_flops(config, length)
            elif method == LOCAL:
                flops = local_attention_flops(config, length)
            else:
                flops = exact_attention_flops(config, length)
            rows.append(
                BenchmarkRow(
                    method=method,
                    length=length,
                    time_ms=1e3 * measurement.seconds,
                    peak_memory_mib=measurement.peak_memory_mib,
                    tokens_per_s=tokens / measurement.seconds,
                    gemm_roofline_fraction=flops / measurement.seconds / gemm_flops_per_s,
                )
            )
            log(f"{method:>22} L={length:>6}: {rows[-1].time_ms:9.1f} ms {rows[-1].peak_memory_mib:8.1f} MiB")
        del inputs
    add_ratios(rows, config.reference_length)
    summary = {
        "gemm_gflops_per_s": gemm_flops_per_s / 1e9,
        "crossover_length_vs_sdpa": crossover_length(rows),
        "local_crossover_length_vs_sdpa": crossover_length(rows, LOCAL),
    }
    return rows, summary


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: the formatted number and its suffix, or a dash when unknown."""
    return "–" if value is None or math.isnan(value) else format(value, spec) + suffix


def format_markdown(
    rows: list[BenchmarkRow],
    summary: dict[str, float | int | None],
    config: AttentionBenchmarkConfig,
    machine: str,
    command: str,
) -> str:
    """The results as a Markdown report: setup, one table, the crossover length."""
    reference = config.reference_length
    lines = [
        "# Attention benchmark (forward + backward)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Achieved GEMM throughput: {summary['gemm_gflops_per_s']:.1f} GFLOP/s (float32).",
        "",
        f"batch {config.batch_size}, heads {config.num_heads}, head dim {config.head_dim}, "
        f"random features {config.num_features}, sliding window {config.local_window}, float32. Time: median per run of "
        f"`torch.utils.benchmark.Timer.blocked_autorange` (a warm-up run, then at least {config.min_run_time:g} s of "
        "runs). Peak memory: rise of the peak allocated (CUDA) or resident (CPU) memory during a timed block, inputs "
        "excluded.",
        "",
        f"| method | length | time (ms) | time vs SDPA | peak memory (MiB) | tokens/s | tokens/s vs L={reference} "
        "| speedup vs performer-pytorch | memory vs performer-pytorch | GEMM roofline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.method} | {row.length} | {row.time_ms:.1f} | {_cell(row.time_vs_sdpa, '.2f', '×')} "
            f"| {_cell(row.peak_memory_mib, '.1f')} "
            f"| {row.tokens_per_s:,.0f} | {_cell(row.tokens_per_s_vs_reference, '.2f')} "
            f"| {_cell(row.speedup_vs_performer_pytorch, '.2f', '×')} "
            f"| {_cell(row.memory_vs_performer_pytorch, '.2f', '×')} | {row.gemm_roofline_fraction:.0%} |"
        )
    lines += [
        "",
        "GEMM roofline: the algorithmic GEMM FLOPs of the method (FAVOR+: without the features recomputed in the "
        "backward; sliding window: each query against the 3w keys of its blocks) per second, as a fraction of the "
        "achieved GEMM throughput.",
        "",
    ]
    for name, key in (
        ("FAVOR+", "crossover_length_vs_sdpa"),
        ("The sliding window", "local_crossover_length_vs_sdpa"),
    ):
        crossover = summary[key]
        if crossover is None:
            lines.append(f"- {name}: SDPA is faster at the longest length measured for both.")
        else:
            lines.append(f"- {name} is faster than SDPA from length {crossover} on (every longer length measured).")
    return "\n".join(lines) + "\n"


def write_results(rows: list[BenchmarkRow], markdown: str, output_dir: str | Path) -> tuple[Path, Path]:
    """Writes the rows as CSV and the Markdown report; returns both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, markdown_path = output_dir / CSV_FILE, output_dir / MARKDOWN_FILE
    with open(csv_path, "w", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    markdown_path.write_text(markdown, encoding="utf-8")
    return csv_path, markdown_path
