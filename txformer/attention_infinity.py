"""∞-former attention: exact short-term attention within a segment plus a continuous long-term memory (LTM).

Martins et al., "∞-former: Infinite Memory Transformer" (ACL 2022). The memory of every row is a signal on [0, 1]
written as coefficients on N Gaussian radial basis functions. Each segment of L events is fitted onto the basis by
ridge regression; the old signal is sampled at M points and contracted into [0, τ] so the memory stays N x hidden
whatever the length of the history. Queries read the memory through a Gaussian density over [0, 1] in closed form.

Functional core first (basis, ridge fits, closed-form weights, resampling), then the config fields
(`InfinitySettings`), the attention module and the kind's entry (`INFINITY_ATTENTION`). The memory is explicit,
per-row state ([`InfinityMemoryState`]), passed in and returned, never stored on the module; the model reads a
history segment by segment, carrying it (`Streaming`).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import initialization as init

from .attention_full import (
    EXACT_ATTENTION_BACKENDS,
    AttentionKind,
    Streaming,
    TxFormerSelfAttention,
    apply_rotary_pos_emb,
)


if TYPE_CHECKING:
    from .configuration_txformer import TxFormerConfig


MIN_DENSITY_VARIANCE = 1e-4
KL_PRIOR_STD = 0.05
# Work of one chunk of the memory read, in elements of its `[rows, L, N]` weights (4 MiB in float32): written,
# exponentiated and multiplied while in cache, rather than a batch's worth many times larger (docs/infinity_former.md).
READ_CHUNK_NUM_ELEMENTS = 2**20


def basis_centers_and_widths(
    num_basis: int, widths: list[float], dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the N basis functions: `N / len(widths)` centres evenly spaced on [0, 1] and the widths. Basis
    function `k * len(widths) + w` is centre k with width w (centre-major, widths interleaved)."""
    num_centers = num_basis // len(widths)
    centers = torch.linspace(0.0, 1.0, num_centers, dtype=dtype, device="cpu")
    return centers, torch.tensor(widths, dtype=dtype, device="cpu")


def continuous_attention_weights(
    mean: torch.Tensor, variance: torch.Tensor, centers: torch.Tensor, widths: torch.Tensor
) -> torch.Tensor:
    """r_j = E_{t ~ N(mean, variance)}[ψ_j(t)] = N(mean; c_j, variance + s_j²) in closed form, for the basis on the
    grid `centers [C]` × `widths [S]`: `[...]` -> `[..., C * S]` (centre-major)."""
    return width_major_weights(mean, variance, centers, widths).transpose(-2, -1).flatten(-2)


def width_major_weights(
    mean: torch.Tensor,
    variance: torch.Tensor,
    centers: torch.Tensor,
    widths: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights of `continuous_attention_weights` laid out `[..., S, C]` (width-major), written into `out` when
    given.

    The variance terms are computed once per width and the distances once per centre, so that only one fused
    multiply-add and the exponential run over all N basis functions, with the C centres innermost (with the S widths
    innermost, the broadcast runs loops of S elements, and its backward sums over them, several times slower).
    """
    precision = 1.0 / (variance[..., None] + widths**2)
    log_normalizer = 0.5 * torch.log(precision / (2 * math.pi))
    distance = mean[..., None] - centers
    exponent = torch.addcmul(
        log_normalizer[..., :, None], (distance * distance)[..., None, :], precision[..., :, None], value=-0.5, out=out
    )
    return exponent.exp_()


def continuous_attention_read(
    mean: torch.Tensor, variance: torch.Tensor, centers: torch.Tensor, widths: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Σ_j r_j value_j for the weights r of `continuous_attention_weights`: `mean`, `variance` `[..., L]` and
    `value [..., C * S, d]` (the same leading dimensions; rows centre-major, as the basis) -> `[..., L, d]`.

    The weights stay width-major and the value rows are put in that order instead (N rows rather than L x N weights).
    They are computed for a chunk of rows at a time (`READ_CHUNK_NUM_ELEMENTS`), so that each chunk's weights are
    written, exponentiated and multiplied while in cache. With gradients (in eager) the read is one autograd node
    ([`ContinuousAttentionRead`]) whose backward reduces over the basis in two products instead of differentiating
    every elementwise step; inside a graph (`torch.compile`, `torch.export`) autograd differentiates the steps."""
    num_centers, num_widths = centers.shape[0], widths.shape[0]
    length, num_basis = mean.shape[-1], value.shape[-2]
    width_major_value = (
        value.unflatten(-2, (num_centers, num_widths)).transpose(-3, -2).reshape(-1, num_basis, value.shape[-1])
    )
    mean, variance = mean.reshape(-1, length), variance.reshape(-1, length)
    differentiated = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (mean, variance, width_major_value)
    )
    if differentiated and not torch.compiler.is_compiling():
        context, _ = ContinuousAttentionRead.apply(mean, variance, centers, widths, width_major_value)
    else:
        context = torch.cat(
            [
                torch.matmul(width_major_weights(mean[rows], variance[rows], centers, widths).flatten(-2), value_rows)
                for rows, value_rows in zip(*read_chunks(mean, width_major_value), strict=True)
            ]
        )
    return context.view(*value.shape[:-2], length, value.shape[-1])


def read_chunks(mean: torch.Tensor, value: torch.Tensor) -> tuple[list[slice], list[torch.Tensor]]:
    """The row slices of `mean [rows, L]` whose `[rows, L, N]` weights hold about `READ_CHUNK_NUM_ELEMENTS`, and the
    matching rows of `value [rows, N, d]`."""
    chunk = max(1, READ_CHUNK_NUM_ELEMENTS // (mean.shape[1] * value.shape[1]))
    slices = [slice(start, start + chunk) for start in range(0, mean.shape[0], chunk)]
    return slices, [value[rows] for rows in slices]


class ContinuousAttentionRead(torch.autograd.Function):
    """The memory read `(context, weights) = (r value, r)` of `mean`, `variance` `[rows, L]` and width-major `value`
    `[rows, N, d]`, with the weights `r [rows, L, N]` kept for the backward (not differentiable as an output).

    With `log r_sc = ½ log(p_s / 2π) − ½ p_s (μ − c_c)²` and `p_s = 1 / (σ² + s²)`, the gradients of `A = (∂ℓ/∂context
    valueᵀ) ⊙ r` reduce over the centres through its products with `(1, c, c²)` (`T0, T1, T2 [rows, L, S]`):
    `∂ℓ/∂μ = −Σ_s p_s (μ T0 − T1)` and `∂ℓ/∂σ² = ½ Σ_s p_s (p_s (μ² T0 − 2μ T1 + T2) − T0)`. Autograd through the
    elementwise steps makes about ten passes over the `[rows, L, N]` weights; this backward makes one elementwise
    pass and three products."""

    @staticmethod
    def forward(mean, variance, centers, widths, value):
        weights = mean.new_empty(mean.shape[0], mean.shape[1], widths.shape[0], centers.shape[0])
        context = mean.new_empty(mean.shape[0], mean.shape[1], value.shape[2])
        for rows, value_rows in zip(*read_chunks(mean, value), strict=True):
            width_major_weights(mean[rows], variance[rows], centers, widths, out=weights[rows])
            torch.matmul(weights[rows].flatten(-2), value_rows, out=context[rows])
        return context, weights.flatten(-2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mean, variance, centers, widths, value = inputs
        ctx.save_for_backward(mean, variance, centers, widths, value, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_context, _):
        if grad_context is None:
            return None, None, None, None, None
        mean, variance, centers, widths, value, weights = ctx.saved_tensors
        grad_context = grad_context.contiguous()
        grad_mean, grad_variance = torch.empty_like(mean), torch.empty_like(variance)
        grad_value = torch.empty_like(value)
        powers = torch.stack([torch.ones_like(centers), centers, centers * centers], dim=1)
        slices, value_chunks = read_chunks(mean, value)
        # One chunk's `(∂ℓ/∂context valueᵀ) ⊙ r`, reused: a fresh buffer per chunk costs its page faults each time.
        buffer = weights.new_empty(weights[slices[0]].shape)
        for rows, value_rows in zip(slices, value_chunks, strict=True):
            chunk_weights, chunk_grad = weights[rows], grad_context[rows]
            torch.matmul(chunk_weights.transpose(1, 2), chunk_grad, out=grad_value[rows])
            weighted = buffer[: chunk_weights.shape[0]]
            torch.matmul(chunk_grad, value_rows.transpose(1, 2), out=weighted).mul_(chunk_weights)
            moments = torch.matmul(weighted.unflatten(-1, (widths.shape[0], centers.shape[0])), powers)
            first, second, third = moments.unbind(-1)
            chunk_mean = mean[rows][..., None]
            precision = 1.0 / (variance[rows][..., None] + widths**2)
            grad_mean[rows] = -(precision * (chunk_mean * first - second)).sum(-1)
            spread = chunk_mean * (chunk_mean * first - 2 * second) + third
            grad_variance[rows] = 0.5 * (precision * (precision * spread - first)).sum(-1)
        return grad_mean, grad_variance, None, None, grad_value


def evaluate_basis(positions: torch.Tensor, centers: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """ψ_j(t) for every position (the weights of a point mass at t): `positions [..., P]` -> `[..., P, N]`."""
    return continuous_attention_weights(positions, torch.zeros_like(positions), centers, widths)


def reference_padding(num_points: int, shift: float) -> torch.Tensor:
    """Zero-target padding points as the reference code lays them out: `num_points` evenly spaced on
    [-0.5 + shift, 1.5 - shift], those outside [0, 1] (float64)."""
    grid = torch.linspace(-0.5 + shift, 1.5 - shift, num_points, dtype=torch.float64, device="cpu")
    return grid[(grid < 0) | (grid > 1)]


@dataclass
class RidgeFit:
    """Ridge regression of signal samples at fixed positions onto the basis. Computed in float64; the module keeps
    the solution in float32 and the normal equations (design, prior) in float64 for the partial fits.

    Args:
        solution: `G [P, N]`; the coefficients of samples `X [P, e]` are `Gᵀ X` when every sample is present.
        design: `F [N, P]`, the basis at the sample positions.
        prior: `F_pad F_padᵀ + λ I [N, N]`: the zero-target padding points and the penalty, the part of the normal
            equations that does not depend on which samples are present.
        normal: `prior + F Fᵀ [N, N]`, the normal matrix when every sample is present.
        suffix_solutions: `[P + 1, P, N]`, optional: entry `j` is the solution when the first `j` samples are missing
            (the first segment of an end-aligned history), zero rows for them; computed like `solution`.
    """

    solution: torch.Tensor
    design: torch.Tensor
    prior: torch.Tensor
    normal: torch.Tensor
    suffix_solutions: torch.Tensor | None = None


def ridge_fit(
    positions: torch.Tensor,
    padding: torch.Tensor,
    centers: torch.Tensor,
    widths: torch.Tensor,
    ridge_penalty: float,
) -> RidgeFit:
    """Precompute the ridge regression for samples at `positions`, with zero targets at the `padding` positions so
    the fit does not bend at the edges of [0, 1] (float64, Cholesky)."""
    design = evaluate_basis(positions.double(), centers, widths).T
    padding_design = evaluate_basis(padding.double(), centers, widths).T
    prior = padding_design @ padding_design.T + ridge_penalty * torch.eye(
        design.shape[0], dtype=torch.float64, device="cpu"
    )
    normal = prior + design @ design.T
    solution = torch.cholesky_solve(design, torch.linalg.cholesky(normal)).T
    return RidgeFit(solution=solution, design=design, prior=prior, normal=normal)


def suffix_solutions(fit: RidgeFit) -> torch.Tensor:
    """The ridge solutions `[P + 1, P, N]` of `fit` with the first `j` samples missing, for every `j` (float64): one
    batched Cholesky solve of the normal equations `prior + Σ_{p >= j} F_p F_pᵀ`."""
    num_positions = fit.design.shape[1]
    outer = torch.einsum("np,mp->pnm", fit.design, fit.design)
    suffix_gram = outer.flip(0).cumsum(0).flip(0)
    normal = fit.prior + torch.cat([suffix_gram, torch.zeros_like(suffix_gram[:1])])
    positions = torch.arange(num_positions, device=fit.design.device)
    present = positions[None, :] >= torch.arange(num_positions + 1, device=fit.design.device)[:, None]
    right_hand_side = fit.design * present[:, None, :].to(fit.design.dtype)
    return torch.cholesky_solve(right_hand_side, torch.linalg.cholesky(normal)).transpose(1, 2)


def fit_coefficients(samples: torch.Tensor, sample_mask: torch.Tensor, fit: RidgeFit) -> torch.Tensor:
    """Basis coefficients `[batch, N, e]` of `samples [batch, P, e]` where `sample_mask [batch, P]` is True.

    Rows with every sample present use the precomputed solution. Rows whose first samples are missing (the first
    segment of a history, padding on its left) use the precomputed solution for that many missing samples
    (`fit.suffix_solutions`). Other rows with samples missing are solved on their own from the fit's float64 normal
    equations (`solve_partial_rows`). Either way the missing positions are left out of the fit instead of being
    fitted as zeros. Rows with no sample get zeros.
    """
    samples = samples.masked_fill(~sample_mask[..., None], 0.0)
    partial = sample_mask.any(dim=1) & ~sample_mask.all(dim=1)
    if fit.suffix_solutions is None or not any_row(partial):
        coefficients = torch.matmul(fit.solution.T.to(samples.dtype), samples)
    else:
        num_missing = sample_mask.shape[1] - sample_mask.sum(dim=1)
        solutions = fit.suffix_solutions.index_select(0, num_missing).to(samples.dtype)
        coefficients = torch.matmul(solutions.transpose(1, 2), samples)
        positions = torch.arange(sample_mask.shape[1], device=sample_mask.device)
        partial = partial & (sample_mask != (positions[None, :] >= num_missing[:, None])).any(dim=1)
    if not any_row(partial):
        return coefficients
    return solve_partial_rows(coefficients, samples, sample_mask, partial, fit)


def solve_partial_rows(
    coefficients: torch.Tensor, samples: torch.Tensor, sample_mask: torch.Tensor, partial: torch.Tensor, fit: RidgeFit
) -> torch.Tensor:
    """`coefficients [batch, N, e]` with the rows where `partial [batch]` is True replaced by the solution of the fit's
    float64 normal equations over their present samples (`samples [batch, P, e]`, zero where `sample_mask` is False):
    the same float64 system the precomputed solution was derived from.

    Only the partial rows are solved, gathered by `nonzero` (which `torch.export` captures with a data-dependent row
    count). Under `torch.compile`, which cannot trace that count without a graph break, every row is solved and the
    partial ones are kept: the same numbers, at the cost of a solve per row.
    """
    if torch.compiler.is_dynamo_compiling():
        solved = solve_normal_equations(samples, sample_mask, fit)
        return torch.where(partial[:, None, None], solved.to(coefficients.dtype), coefficients)
    rows = partial.nonzero().squeeze(1)
    solved = solve_normal_equations(samples[rows], sample_mask[rows], fit)
    return coefficients.index_put((rows,), solved.to(coefficients.dtype))


def solve_normal_equations(samples: torch.Tensor, sample_mask: torch.Tensor, fit: RidgeFit) -> torch.Tensor:
    """Coefficients `[rows, N, e]` fitted to the present `samples [rows, P, e]` alone (`sample_mask [rows, P]`), from
    the fit's normal equations `(prior + F_present F_presentᵀ) B = F_present X_present`, in float64 (Cholesky).

    Each row's normal matrix is summed over at most half of the positions: its present samples, added to the prior,
    or, when more than half are present, its missing ones, subtracted from the full normal matrix `fit.normal`.
    """
    num_summed = sample_mask.shape[1] // 2
    from_missing = sample_mask.sum(dim=1) > num_summed
    summed = sample_mask != from_missing[:, None]
    # The positions each row sums over first (at most `num_summed` of them), the others after, as zero columns.
    positions = torch.argsort(summed.to(torch.uint8), dim=1, descending=True, stable=True)[:, :num_summed]
    columns = fit.design.T[positions] * summed.gather(1, positions)[..., None].to(fit.design.dtype)
    gram = columns.transpose(1, 2) @ columns
    normal_matrix = torch.where(from_missing[:, None, None], fit.normal - gram, fit.prior + gram)
    present_samples = samples.masked_fill(~sample_mask[..., None], 0.0).to(fit.design.dtype)
    return torch.cholesky_solve(fit.design @ present_samples, torch.linalg.cholesky(normal_matrix))


def any_row(flags: torch.Tensor) -> bool:
    """Whether work that only the rows flagged in `flags [batch]` need must run: in eager, only if a row is flagged;
    inside a graph (`torch.compile`, `torch.export`), where control flow cannot depend on values, always. The caller
    keeps the result for the flagged rows only (`torch.where`), so both give the same numbers."""
    return torch.compiler.is_compiling() or bool(flags.any())


def density_bin_mass(mean: torch.Tensor, variance: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Probability mass of N(mean, variance) in each of `num_bins` equal bins of [0, 1]: `[...]` -> `[..., bins]`."""
    edges = torch.linspace(0.0, 1.0, num_bins + 1, device=mean.device, dtype=mean.dtype)
    cdf = torch.special.ndtr((edges - mean[..., None]) / variance.sqrt()[..., None])
    return cdf.diff(dim=-1)


def sample_from_histogram(bin_mass: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Positions on [0, 1] at the given `quantiles [batch, M]` (sorted, in (0, 1)) of the piecewise-uniform density
    with `bin_mass [batch, bins]` on equal bins (inverse CDF: a bin is drawn in proportion to its mass, the position
    is uniform inside it). Rows without mass fall back to uniform bins."""
    num_bins = bin_mass.shape[-1]
    total = bin_mass.sum(dim=-1, keepdim=True)
    bin_mass = torch.where(total > 0, bin_mass / total.clamp(min=torch.finfo(bin_mass.dtype).tiny), 1.0 / num_bins)
    cdf = bin_mass.cumsum(dim=-1)
    bins = torch.searchsorted(cdf, quantiles).clamp(max=num_bins - 1)
    mass_before = cdf.gather(-1, bins) - bin_mass.gather(-1, bins)
    within_bin = (quantiles - mass_before) / bin_mass.gather(-1, bins).clamp(min=torch.finfo(bin_mass.dtype).tiny)
    return (bins + within_bin.clamp(0.0, 1.0)) / num_bins


def kl_divergence_to_prior(variance: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(μ, σ₀²)) = ½(σ²/σ₀² − log(σ²/σ₀²) − 1), elementwise."""
    ratio = variance / KL_PRIOR_STD**2
    return 0.5 * (ratio - torch.log(ratio) - 1)


@dataclass
class InfinityMemoryState:
    """The long-term memory of one layer for every row of a batch.

    Args:
        coefficients: basis coefficients of each row's memory signal, `[batch, N, hidden]`, float32.
        has_memory: `[batch]`, False for rows whose memory holds no event yet.
        attention_mass: sticky memories only: where the last segment's queries looked, `[batch, bins]`.
        divergence_sum: with the KL regulariser: its sum over the heads and events read so far, `[batch]`.
        num_divergences: the number of terms in `divergence_sum`, `[batch]`.
        held_input, held_mask: with `ltm_read_current_segment=False`: the last segment read, end-aligned in
            `segment_length` slots, `[batch, segment_length, hidden]` and `[batch, segment_length]`; written into the
            memory when the next segment is read.
    """

    coefficients: torch.Tensor
    has_memory: torch.Tensor
    attention_mass: torch.Tensor | None = None
    divergence_sum: torch.Tensor | None = None
    num_divergences: torch.Tensor | None = None
    held_input: torch.Tensor | None = None
    held_mask: torch.Tensor | None = None

    @property
    def regularization_loss(self) -> torch.Tensor | None:
        """The KL regulariser averaged over every (head, event) read so far, all segments alike (None when off)."""
        if self.divergence_sum is None:
            return None
        return self.divergence_sum.sum() / self.num_divergences.sum().clamp(min=1)

    def detach(self) -> "InfinityMemoryState":
        """The same memory without autograd history."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return InfinityMemoryState(
            **{name: None if value is None else value.detach() for name, value in values.items()}
        )


# A pytree node, so that the state can be an output (and input) of a `torch.export` program.
torch.export.register_dataclass(
    InfinityMemoryState, serialized_type_name=f"{InfinityMemoryState.__module__}.{InfinityMemoryState.__qualname__}"
)


@dataclass(kw_only=True)
class InfinitySettings:
    """Config fields of `attention_type="infinity"`.

    Args:
        segment_length: events per segment (short-term attention span and memory update).
        ltm_num_basis: Gaussian RBF basis functions N (a multiple of the number of widths).
        ltm_basis_widths: basis widths (standard deviations on [0, 1]).
        ltm_num_samples: samples M taken from the old signal at each update.
        ltm_contraction: τ, the part of [0, 1] the old signal is contracted into.
        ltm_ridge_penalty: λ of the ridge regression onto the basis.
        ltm_sticky_memories, ltm_sticky_bins: sample the old signal where it was attended to.
        ltm_kl_weight: weight of the KL regulariser on the attention densities (0 = off).
        ltm_gating: gate the memory input with a width-3 convolution.
        ltm_detach_memory: detach the memory carried between segments (bounded memory in training).
        ltm_read_current_segment: a segment's queries read a memory that already holds the segment (True), or only
            the segments before it, as the reference code does (False: a history's first segment reads no memory
            and each segment is written when the next one is read).
    """

    segment_length: int = 256
    ltm_num_basis: int = 128
    ltm_basis_widths: list[float] = field(default_factory=lambda: [0.01, 0.05])
    ltm_num_samples: int = 256
    ltm_contraction: float = 0.75
    ltm_ridge_penalty: float = 1.0
    ltm_sticky_memories: bool = False
    ltm_sticky_bins: int = 128
    ltm_kl_weight: float = 0.0
    ltm_gating: bool = True
    ltm_detach_memory: bool = True
    ltm_read_current_segment: bool = True


def validate_infinity_settings(config: InfinitySettings) -> None:
    """Raises a `ValueError` for invalid ∞-former fields."""
    for name in ("segment_length", "ltm_num_samples", "ltm_sticky_bins"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}.")
    num_widths = len(config.ltm_basis_widths)
    if num_widths == 0 or config.ltm_num_basis % num_widths != 0:
        raise ValueError(
            f"ltm_num_basis ({config.ltm_num_basis}) must be a multiple of the number of ltm_basis_widths "
            f"({num_widths})."
        )
    if config.ltm_num_basis < 2 * num_widths:
        raise ValueError(f"ltm_num_basis ({config.ltm_num_basis}) needs at least two centres per width.")
    if not 0.0 < config.ltm_contraction < 1.0:
        raise ValueError(f"ltm_contraction must lie in (0, 1), got {config.ltm_contraction}.")
    if any(width <= 0 for width in config.ltm_basis_widths) or config.ltm_ridge_penalty <= 0:
        raise ValueError("ltm_basis_widths and ltm_ridge_penalty must be positive.")
    if config.ltm_kl_weight < 0:
        raise ValueError(f"ltm_kl_weight must be >= 0 (0 = off), got {config.ltm_kl_weight}.")


class TxFormerInfinityAttention(TxFormerSelfAttention):
    """∞-former attention: `Z = Z_STM + Z_LTM`. The short-term part is the inherited exact attention within the
    segment; the long-term part reads the memory of every segment read so far: the current one included (the memory
    is updated before it is read), or with `ltm_read_current_segment=False` the ones before it (the segment is held
    in the state and written when the next one is read, as in the reference code). Shares the query projection with
    the short-term part."""

    # The basis arithmetic needs float32 (centre spacing ~1/64, σ² + s² ~ 1e-4); the normal equations of the
    # partial fits are ill-conditioned and are solved in float64, like the precomputed solutions.
    float32_buffers = (
        "basis_centers",
        "basis_widths",
        "segment_solution",
        "segment_suffix_solutions",
        "memory_solution",
        "memory_transition",
        "sample_basis",
    )
    float64_buffers = (
        "segment_design",
        "segment_prior",
        "segment_normal",
        "memory_design",
        "memory_prior",
        "memory_normal",
    )

    def __init__(self, config: "TxFormerConfig", layer_idx: int):
        super().__init__(config, layer_idx)
        self.segment_length = config.segment_length
        self.num_samples = config.ltm_num_samples
        self.contraction = config.ltm_contraction
        self.sticky_memories = config.ltm_sticky_memories
        self.sticky_bins = config.ltm_sticky_bins
        self.kl_weight = config.ltm_kl_weight
        self.read_current_segment = config.ltm_read_current_segment
        num_basis = config.ltm_num_basis
        # No biases, as in the reference: a value bias would enter the context multiplied by Σ_j r_j.
        self.ltm_k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ltm_v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ltm_o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mean_proj = nn.Linear(num_basis, 1, bias=False)
        self.variance_proj = nn.Linear(num_basis, 1, bias=False)
        self.gate = (
            nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=3, padding=1) if config.ltm_gating else None
        )
        # Derived from the config (not saved), with a fixed dtype whatever the module's (`float32_buffers`,
        # `float64_buffers`).
        memory_points = self.num_samples + self.segment_length
        for name, shape in (
            ("basis_centers", (num_basis // len(config.ltm_basis_widths),)),
            ("basis_widths", (len(config.ltm_basis_widths),)),
            ("segment_solution", (self.segment_length, num_basis)),
            ("segment_suffix_solutions", (self.segment_length + 1, self.segment_length, num_basis)),
            ("segment_design", (num_basis, self.segment_length)),
            ("segment_prior", (num_basis, num_basis)),
            ("segment_normal", (num_basis, num_basis)),
            ("memory_solution", (memory_points, num_basis)),
            ("memory_design", (num_basis, memory_points)),
            ("memory_prior", (num_basis, num_basis)),
            ("memory_normal", (num_basis, num_basis)),
            ("memory_transition", (num_basis, num_basis)),
            ("sample_basis", (self.num_samples, num_basis)),
        ):
            dtype = torch.float64 if name in self.float64_buffers else torch.float32
            self.register_buffer(name, torch.empty(shape, dtype=dtype), persistent=False)
        self.reset_buffers()

    def compute_buffers(self) -> dict[str, torch.Tensor]:
        """The basis grid, the two ridge fits (first segment; old samples plus a new segment), the basis at the
        uniform sample points and the map from old to new coefficients through them, in float64 on the CPU."""
        config = self.config
        length, num_samples = self.segment_length, self.num_samples
        centers, widths = basis_centers_and_widths(config.ltm_num_basis, config.ltm_basis_widths)
        # Midpoints of L equal cells, extended by L // 2 cells of zero targets on each side.
        cells = torch.arange(1 - length // 2, length + length // 2 + 1, dtype=torch.float64, device="cpu")
        cells = (cells - 0.5) / length
        inside = (cells > 0) & (cells < 1)
        segment = ridge_fit(cells[inside], cells[~inside], centers, widths, config.ltm_ridge_penalty)
        steps = torch.arange(1, num_samples + 1, dtype=torch.float64, device="cpu") / num_samples
        new_positions = torch.arange(1, length + 1, dtype=torch.float64, device="cpu") / length
        positions = torch.cat([self.contraction * steps, self.contraction + (1 - self.contraction) * new_positions])
        padding = reference_padding(2 * (num_samples + length), 1.0 / (2 * length + num_samples))
        memory = ridge_fit(positions, padding, centers, widths, config.ltm_ridge_penalty)
        sample_basis = evaluate_basis(steps, centers, widths)
        return {
            "basis_centers": centers,
            "basis_widths": widths,
            "segment_solution": segment.solution,
            # Entry 0 (no sample missing) is the solution itself, so full rows get the same numbers on either path.
            "segment_suffix_solutions": torch.cat([segment.solution[None], suffix_solutions(segment)[1:]]),
            "segment_design": segment.design,
            "segment_prior": segment.prior,
            "segment_normal": segment.normal,
            "memory_solution": memory.solution,
            "memory_design": memory.design,
            "memory_prior": memory.prior,
            "memory_normal": memory.normal,
            "memory_transition": memory.solution[:num_samples].T @ sample_basis,
            "sample_basis": sample_basis,
        }

    def reset_buffers(self) -> None:
        """Fill the derived buffers (a no-op on meta tensors, as `transformers.initialization` does)."""
        if self.basis_centers.is_meta:
            return
        for name, value in self.compute_buffers().items():
            buffer = getattr(self, name)
            value = value.to(device=buffer.device, dtype=buffer.dtype)
            # Entries that round to subnormal numbers (below 1e-38 in float32) are zeroed: they slow every product.
            init.copy_(buffer, value.masked_fill(value.abs() < torch.finfo(value.dtype).tiny, 0.0))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_state: InfinityMemoryState | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, InfinityMemoryState]:
        """One segment: `hidden_states [batch, segment, hidden]`, masks as in [`TxFormerSelfAttention`],
        `past_state` the memory before this segment (None: empty memory). Returns the output, the short-term
        attention weights (eager only) and the memory after this segment."""
        batch_size, length, _ = hidden_states.shape
        if length > self.segment_length:
            raise ValueError(f"A segment holds at most segment_length={self.segment_length} events, got {length}.")
        if past_state is not None and past_state.coefficients.shape[0] != batch_size:
            raise ValueError(
                f"past_state holds the memory of {past_state.coefficients.shape[0]} rows, the batch has {batch_size}."
            )
        query, key, value = self.project(hidden_states)
        # Rotary positions order the events inside the segment; the memory is read by content (unrotated query).
        short_query, short_key = query, key
        if position_embeddings is not None:
            short_query, short_key = apply_rotary_pos_emb(query, key, *position_embeddings)
        short_term, attn_weights = self.attend(short_query, short_key, value, attention_mask, key_mask, **kwargs)
        short_term = self.o_proj(short_term.reshape(batch_size, length, -1))

        if past_state is None:
            past_state = self.empty_state(hidden_states)
        if self.read_current_segment:
            state = self.update_memory(hidden_states, key_mask, past_state)
        else:
            state = self.write_held_segment(past_state, key_mask.any(dim=1))
        if any_row(state.has_memory):
            long_term, state = self.read_long_term(query, key_mask, state)
            short_term = short_term + long_term.to(short_term.dtype)
        if not self.read_current_segment:
            state = self.hold_segment(state, hidden_states, key_mask)
        return short_term, attn_weights, state

    def read_long_term(
        self, query: torch.Tensor, key_mask: torch.Tensor, state: InfinityMemoryState
    ) -> tuple[torch.Tensor, InfinityMemoryState]:
        """The long-term part of the output, `[batch, length, hidden]` (zero for rows without a memory), and `state`
        with the sticky histogram and the KL regulariser's sums of the events that read a memory."""
        long_term, mean, variance = self.read_memory(query, state)
        long_term = self.ltm_o_proj(long_term)
        if any_row(~state.has_memory):
            long_term = torch.where(state.has_memory[:, None, None], long_term, 0.0)
        read = key_mask & state.has_memory[:, None]
        if self.sticky_memories:
            mass = (density_bin_mass(mean, variance, self.sticky_bins) * read[:, None, :, None]).sum((1, 2))
            state = dataclasses.replace(
                state, attention_mass=torch.where(read.any(dim=1)[:, None], mass, state.attention_mass)
            )
        if self.kl_weight > 0:
            divergence = torch.where(read[:, None, :], kl_divergence_to_prior(variance), 0.0)
            state = dataclasses.replace(
                state,
                divergence_sum=state.divergence_sum + divergence.sum((1, 2)),
                num_divergences=state.num_divergences + read.sum(dim=1) * self.num_heads,
            )
        return long_term, state

    def empty_state(self, hidden_states: torch.Tensor) -> InfinityMemoryState:
        """The memory of rows that have read nothing yet."""
        batch_size, _, hidden_size = hidden_states.shape
        zeros = hidden_states.new_zeros(batch_size, dtype=torch.float32)
        return InfinityMemoryState(
            coefficients=hidden_states.new_zeros(
                batch_size, self.segment_solution.shape[1], hidden_size, dtype=torch.float32
            ),
            has_memory=torch.zeros(batch_size, dtype=torch.bool, device=hidden_states.device),
            attention_mass=(
                hidden_states.new_zeros(batch_size, self.sticky_bins, dtype=torch.float32)
                if self.sticky_memories
                else None
            ),
            divergence_sum=zeros if self.kl_weight > 0 else None,
            num_divergences=zeros if self.kl_weight > 0 else None,
            held_input=None
            if self.read_current_segment
            else hidden_states.new_zeros(batch_size, self.segment_length, hidden_size),
            held_mask=None
            if self.read_current_segment
            else torch.zeros(batch_size, self.segment_length, dtype=torch.bool, device=hidden_states.device),
        )

    def write_held_segment(self, state: InfinityMemoryState, reads: torch.Tensor) -> InfinityMemoryState:
        """The memory after writing the held segment of the rows that read events now (`reads [batch]`): the others
        keep theirs, and their held segment, for the call that reads their next events."""
        writes = state.held_mask & reads[:, None]
        if not any_row(writes.any(dim=1)):
            return state
        return self.update_memory(state.held_input, writes, state)

    def hold_segment(
        self, state: InfinityMemoryState, hidden_states: torch.Tensor, key_mask: torch.Tensor
    ) -> InfinityMemoryState:
        """`state` holding this segment, end-aligned in `segment_length` slots, for rows that read events in it."""
        padding = self.segment_length - hidden_states.shape[1]
        held_input = nn.functional.pad(hidden_states.masked_fill(~key_mask[..., None], 0.0), (0, 0, padding, 0))
        held_mask = nn.functional.pad(key_mask, (padding, 0), value=False)
        reads = key_mask.any(dim=1)
        return dataclasses.replace(
            state,
            held_input=torch.where(reads[:, None, None], held_input.to(state.held_input.dtype), state.held_input),
            held_mask=torch.where(reads[:, None], held_mask, state.held_mask),
        )

    def update_memory(
        self, hidden_states: torch.Tensor, key_mask: torch.Tensor, past_state: InfinityMemoryState
    ) -> InfinityMemoryState:
        """Write the segment into each row's memory: the first segment of a row is fitted alone; later ones after the
        old signal sampled at M points and contracted into [0, τ]. Rows without events in the segment keep theirs."""
        length = hidden_states.shape[1]
        memory_input = hidden_states.masked_fill(~key_mask[..., None], 0.0)
        if self.gate is not None:
            gate = self.gate(memory_input.transpose(1, 2)).transpose(1, 2)
            memory_input = memory_input * torch.sigmoid(gate)
        # Short segments (the last one of a call) sit at the end of the positions, as in a full segment.
        mask = key_mask
        if length < self.segment_length:
            memory_input = nn.functional.pad(memory_input, (0, 0, self.segment_length - length, 0))
            mask = nn.functional.pad(key_mask, (self.segment_length - length, 0), value=False)

        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            memory_input = memory_input.float()
            has_memory = past_state.has_memory
            coefficients = past_state.coefficients
            if any_row(~has_memory):
                first = fit_coefficients(memory_input, mask & ~has_memory[:, None], self.fit("segment"))
                coefficients = torch.where(has_memory[:, None, None], coefficients, first)
            if any_row(has_memory):
                continued = self.continue_memory(past_state, memory_input, mask)
                coefficients = torch.where(has_memory[:, None, None], continued, coefficients)
            read_any = mask.any(dim=1)
            coefficients = torch.where(read_any[:, None, None], coefficients, past_state.coefficients)
        return dataclasses.replace(past_state, coefficients=coefficients, has_memory=has_memory | read_any)

    def continue_memory(
        self, state: InfinityMemoryState, memory_input: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The memory after a new segment `memory_input [batch, L, hidden]` for rows with a memory: `G_infᵀ [X_past;
        X_new]`, split into the old part, `G_oldᵀ Ψ B_past` (a fixed N x N map for uniform samples), and the new part.
        Rows whose segment is partial are solved from the float64 normal equations, as `fit_coefficients` does."""
        old_solution, new_solution = self.memory_solution.split([self.num_samples, self.segment_length])
        partial = state.has_memory & mask.any(dim=1) & ~mask.all(dim=1)
        old_samples = self.sample_old_signal(state) if self.sticky_memories or any_row(partial) else None
        if self.sticky_memories:
            coefficients = torch.matmul(old_solution.T, old_samples)
        else:
            coefficients = torch.matmul(self.memory_transition, state.coefficients)
        coefficients = coefficients + torch.matmul(new_solution.T, memory_input)
        if any_row(partial):
            samples = torch.cat([old_samples, memory_input], dim=1)
            sample_mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, self.num_samples), mask], dim=1)
            coefficients = solve_partial_rows(coefficients, samples, sample_mask, partial, self.fit("memory"))
        return coefficients

    def fit(self, name: str) -> RidgeFit:
        """The precomputed ridge fit `"segment"` (a first segment) or `"memory"` (old samples and a new segment)."""
        return RidgeFit(
            solution=getattr(self, f"{name}_solution"),
            design=getattr(self, f"{name}_design"),
            prior=getattr(self, f"{name}_prior"),
            normal=getattr(self, f"{name}_normal"),
            suffix_solutions=getattr(self, f"{name}_suffix_solutions", None),
        )

    def sample_old_signal(self, state: InfinityMemoryState) -> torch.Tensor:
        """The old signal at M points, `[batch, M, hidden]`: uniform points, or with sticky memories points drawn
        where the previous segment's queries looked (random in training; evenly spaced quantiles in evaluation)."""
        if not self.sticky_memories:
            return torch.matmul(self.sample_basis, state.coefficients)
        batch_size = state.coefficients.shape[0]
        device = state.coefficients.device
        if self.training:
            quantiles = torch.rand(batch_size, self.num_samples, device=device).sort(dim=-1).values
        else:
            quantiles = (torch.arange(self.num_samples, device=device, dtype=torch.float32) + 0.5) / self.num_samples
            quantiles = quantiles.expand(batch_size, -1).contiguous()
        positions = sample_from_histogram(state.attention_mass, quantiles)
        basis = evaluate_basis(positions, self.basis_centers, self.basis_widths)
        return torch.matmul(basis, state.coefficients)

    def read_memory(
        self, query: torch.Tensor, state: InfinityMemoryState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continuous attention of `query [batch, heads, length, head_dim]` over each row's memory. Returns the
        context `[batch, length, hidden]` and the density mean and variance `[batch, heads, length]`."""
        batch_size, _, length, _ = query.shape
        value = self.split_heads(self.ltm_v_proj(state.coefficients.to(self.ltm_v_proj.weight.dtype)))
        with torch.autocast(device_type=query.device.type, enabled=False):
            # μ and σ² are linear read-outs w_μᵀ s, w_σᵀ s of the scores s_j = q · K_j / √d over the basis, so they
            # equal q · (Kᵀ w) / √d: two keys per head instead of the N x length score matrix.
            readout = torch.cat([self.mean_proj.weight, self.variance_proj.weight]).float()
            keys = nn.functional.linear(torch.matmul(readout, state.coefficients), self.ltm_k_proj.weight.float())
            mean_logit, variance_logit = (
                torch.matmul(self.split_heads(keys), query.float().transpose(2, 3)) * self.scaling
            ).unbind(2)
            mean = torch.sigmoid(mean_logit)
            variance = nn.functional.softplus(variance_logit).clamp(min=MIN_DENSITY_VARIANCE)
            context = continuous_attention_read(mean, variance, self.basis_centers, self.basis_widths, value.float())
        context = context.transpose(1, 2).reshape(batch_size, length, -1).to(query.dtype)
        return context, mean, variance

    def auxiliary_loss(self, state: InfinityMemoryState) -> torch.Tensor | None:
        """`ltm_kl_weight` times the KL regulariser averaged over every (head, event) read so far (None when off)."""
        if self.kl_weight <= 0:
            return None
        return self.kl_weight * state.regularization_loss


INFINITY_ATTENTION = AttentionKind(
    name="infinity",
    attention_class=TxFormerInfinityAttention,
    label="∞-former",
    summary="∞-former: exact attention inside segments of `segment_length` events plus a continuous long-term "
    "memory, so whole histories of any length are read in bounded memory.",
    hub_tag="infinity-former",
    settings=InfinitySettings,
    validate_settings=validate_infinity_settings,
    attn_implementations=EXACT_ATTENTION_BACKENDS,
    streaming=Streaming(
        # Functions rather than `operator.attrgetter`, which `torch.compile` cannot trace.
        segment_length=lambda config: config.segment_length,
        detach_state=lambda config: config.ltm_detach_memory,
        state_class=InfinityMemoryState,
    ),
)
