"""∞-former attention: exact short-term attention within a segment plus a continuous long-term memory (LTM).

Martins et al., "∞-former: Infinite Memory Transformer" (ACL 2022). The memory of every row is a signal on [0, 1]
written as coefficients on N Gaussian radial basis functions. Each segment of L events is fitted onto the basis by
ridge regression; the old signal is sampled at M points and contracted into [0, τ] so the memory stays N x hidden
whatever the length of the history. Queries read the memory through a Gaussian density over [0, 1] in closed form.

Functional core first (basis, ridge fits, closed-form weights, resampling), then the attention module. The memory is
explicit, per-row state ([`InfinityMemoryState`]), passed in and returned, never stored on the module.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from .attention_full import TxFormerSelfAttention, apply_rotary_pos_emb
from .configuration_txformer import TxFormerConfig


MIN_DENSITY_VARIANCE = 1e-4
KL_PRIOR_STD = 0.05


def gaussian_density(x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Normal density N(x; mean, variance), broadcasting over all arguments."""
    return torch.exp(-0.5 * (x - mean) ** 2 / variance) / torch.sqrt(2 * math.pi * variance)


def basis_centers_and_widths(
    num_basis: int, widths: list[float], dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres and widths of the N basis functions: `N / len(widths)` centres evenly spaced on [0, 1], every centre
    paired with every width (centre-major, widths interleaved)."""
    num_centers = num_basis // len(widths)
    centers = torch.linspace(0.0, 1.0, num_centers, dtype=dtype, device="cpu").repeat_interleave(len(widths))
    return centers, torch.tensor(widths, dtype=dtype, device="cpu").repeat(num_centers)


def evaluate_basis(positions: torch.Tensor, centers: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """ψ_j(t) for every position: `positions [..., P]` -> `[..., P, N]`."""
    return gaussian_density(positions[..., None], centers, widths**2)


@dataclass
class RidgeFit:
    """Ridge regression of signal samples at fixed positions onto the basis (float64).

    Args:
        solution: `G [P, N]`; the coefficients of samples `X [P, e]` are `Gᵀ X` when every sample is present.
        design: `F [N, P]`, the basis at the sample positions.
        prior: `F_pad F_padᵀ + λ I [N, N]`: the zero-target padding points and the penalty, the part of the normal
            equations that does not depend on which samples are present.
    """

    solution: torch.Tensor
    design: torch.Tensor
    prior: torch.Tensor


def ridge_fit(
    positions: torch.Tensor,
    num_padding: int,
    padding_spacing: float,
    centers: torch.Tensor,
    widths: torch.Tensor,
    ridge_penalty: float,
) -> RidgeFit:
    """Precompute the ridge regression for samples at `positions` (float64, Cholesky).

    `num_padding` zero-target points are added on each side of the positions, `padding_spacing` apart, so the fit
    does not bend at the edges of [0, 1].
    """
    positions = positions.double()
    offsets = padding_spacing * torch.arange(1, num_padding + 1, dtype=torch.float64, device="cpu")
    padding = torch.cat([positions.min() - offsets, positions.max() + offsets])
    design = evaluate_basis(positions, centers, widths).T
    padding_design = evaluate_basis(padding, centers, widths).T
    prior = padding_design @ padding_design.T + ridge_penalty * torch.eye(
        len(centers), dtype=torch.float64, device="cpu"
    )
    normal_matrix = torch.linalg.cholesky(prior + design @ design.T)
    solution = torch.cholesky_solve(design, normal_matrix).T
    return RidgeFit(solution=solution, design=design, prior=prior)


def fit_coefficients(samples: torch.Tensor, sample_mask: torch.Tensor, fit: RidgeFit) -> torch.Tensor:
    """Basis coefficients `[batch, N, e]` of `samples [batch, P, e]` where `sample_mask [batch, P]` is True.

    Rows with every sample present use the precomputed solution. Rows with some samples missing (padding) are solved
    on their own in float64, leaving the missing positions out of the fit instead of fitting zeros there. Rows with
    no sample get zero coefficients.
    """
    samples = samples.masked_fill(~sample_mask[..., None], 0.0)
    coefficients = torch.einsum("pn,bpe->bne", fit.solution.to(samples.dtype), samples)
    partial = sample_mask.any(dim=1) & ~sample_mask.all(dim=1)
    if partial.any():
        rows = partial.nonzero().squeeze(1)
        present = sample_mask[rows].double()
        design = fit.design.double()
        normal_matrix = fit.prior.double() + torch.einsum("np,kp,mp->knm", design, present, design)
        right_hand_side = torch.einsum("np,kpe->kne", design, samples[rows].double() * present[..., None])
        solved = torch.cholesky_solve(right_hand_side, torch.linalg.cholesky(normal_matrix))
        coefficients = coefficients.index_put((rows,), solved.to(coefficients.dtype))
    return coefficients


def continuous_attention_weights(
    mean: torch.Tensor, variance: torch.Tensor, centers: torch.Tensor, widths: torch.Tensor
) -> torch.Tensor:
    """r_j = E_{t ~ N(mean, variance)}[ψ_j(t)] = N(mean; c_j, variance + s_j²), in closed form: `[...]` -> `[..., N]`."""
    return gaussian_density(mean[..., None], centers, variance[..., None] + widths**2)


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


@dataclass
class InfinityMemoryState:
    """The long-term memory of one layer for every row of a batch.

    Args:
        coefficients: basis coefficients of each row's memory signal, `[batch, N, hidden]`, float32.
        has_memory: `[batch]`, False for rows that have not read an event yet.
        attention_mass: sticky memories only: where the last segment's queries looked, `[batch, bins]`.
        regularization_loss: KL regulariser of the last segment's densities (when `ltm_kl_weight > 0`).
    """

    coefficients: torch.Tensor
    has_memory: torch.Tensor
    attention_mass: torch.Tensor | None = None
    regularization_loss: torch.Tensor | None = None

    def detach(self) -> "InfinityMemoryState":
        """The same memory without autograd history (and without the per-segment loss)."""
        return InfinityMemoryState(
            coefficients=self.coefficients.detach(),
            has_memory=self.has_memory,
            attention_mass=None if self.attention_mass is None else self.attention_mass.detach(),
        )


class TxFormerInfinityAttention(TxFormerSelfAttention):
    """∞-former attention: `Z = Z_STM + Z_LTM`. The short-term part is the inherited exact attention within the
    segment; the long-term part reads the memory of every segment read so far, the current one included (the memory
    is updated before it is read). Shares the query projection with the short-term part."""

    # The basis arithmetic needs float32 (centre spacing ~1/64, σ² + s² ~ 1e-4).
    float32_buffers = (
        "basis_centers",
        "basis_widths",
        "segment_solution",
        "segment_design",
        "segment_prior",
        "memory_solution",
        "memory_design",
        "memory_prior",
        "sample_basis",
    )

    def __init__(self, config: TxFormerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.segment_length = config.segment_length
        self.num_samples = config.ltm_num_samples
        self.contraction = config.ltm_contraction
        self.sticky_memories = config.ltm_sticky_memories
        self.sticky_bins = config.ltm_sticky_bins
        self.kl_weight = config.ltm_kl_weight
        num_basis = config.ltm_num_basis
        self.ltm_k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.ltm_v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.ltm_o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.mean_proj = nn.Linear(num_basis, 1)
        self.variance_proj = nn.Linear(num_basis, 1)
        self.gate = (
            nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=3, padding=1) if config.ltm_gating else None
        )
        # Derived from the config (not saved); kept in float32 whatever the module's dtype (`float32_buffers`).
        for name, shape in (
            ("basis_centers", (num_basis,)),
            ("basis_widths", (num_basis,)),
            ("segment_solution", (self.segment_length, num_basis)),
            ("segment_design", (num_basis, self.segment_length)),
            ("segment_prior", (num_basis, num_basis)),
            ("memory_solution", (self.num_samples + self.segment_length, num_basis)),
            ("memory_design", (num_basis, self.num_samples + self.segment_length)),
            ("memory_prior", (num_basis, num_basis)),
            ("sample_basis", (self.num_samples, num_basis)),
        ):
            self.register_buffer(name, torch.empty(shape, dtype=torch.float32), persistent=False)
        self.reset_buffers()

    def compute_buffers(self) -> dict[str, torch.Tensor]:
        """The basis, the two ridge fits (first segment; old samples plus a new segment) and the basis at the uniform
        sample points, computed in float64 on the CPU from the config."""
        config = self.config
        length, num_samples = self.segment_length, self.num_samples
        centers, widths = basis_centers_and_widths(config.ltm_num_basis, config.ltm_basis_widths)
        segment_positions = (torch.arange(1, length + 1, dtype=torch.float64, device="cpu") - 0.5) / length
        segment = ridge_fit(segment_positions, length // 2, 1.0 / length, centers, widths, config.ltm_ridge_penalty)
        old_positions = (
            self.contraction * torch.arange(1, num_samples + 1, dtype=torch.float64, device="cpu") / num_samples
        )
        new_positions = (
            self.contraction
            + (1 - self.contraction) * torch.arange(1, length + 1, dtype=torch.float64, device="cpu") / length
        )
        total = num_samples + length
        memory = ridge_fit(
            torch.cat([old_positions, new_positions]),
            total // 2,
            1.0 / total,
            centers,
            widths,
            config.ltm_ridge_penalty,
        )
        uniform_samples = torch.arange(1, num_samples + 1, dtype=torch.float64, device="cpu") / num_samples
        return {
            "basis_centers": centers,
            "basis_widths": widths,
            "segment_solution": segment.solution,
            "segment_design": segment.design,
            "segment_prior": segment.prior,
            "memory_solution": memory.solution,
            "memory_design": memory.design,
            "memory_prior": memory.prior,
            "sample_basis": evaluate_basis(uniform_samples, centers, widths),
        }

    def reset_buffers(self) -> None:
        """Fill the derived buffers (a no-op on meta tensors, as `transformers.initialization` does)."""
        if self.basis_centers.is_meta:
            return
        for name, value in self.compute_buffers().items():
            buffer = getattr(self, name)
            init.copy_(buffer, value.to(device=buffer.device, dtype=buffer.dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor,
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
        short_term, attn_weights = self.attend(
            short_query, short_key, value, attention_mask, key_padding_mask, **kwargs
        )
        short_term = self.o_proj(short_term.reshape(batch_size, length, -1))

        state = self.update_memory(hidden_states, key_padding_mask, past_state)
        long_term, mean, variance = self.read_memory(query, state)
        long_term = torch.where(state.has_memory[:, None, None], self.ltm_o_proj(long_term), 0.0)

        read_any = key_padding_mask.any(dim=1)
        if self.sticky_memories:
            mass = (density_bin_mass(mean, variance, self.sticky_bins) * key_padding_mask[:, None, :, None]).sum(
                (1, 2)
            )
            state.attention_mass = torch.where(read_any[:, None], mass, state.attention_mass)
        if self.kl_weight > 0:
            state.regularization_loss = self.kl_regularizer(variance, key_padding_mask)
        return short_term + long_term.to(short_term.dtype), attn_weights, state

    def update_memory(
        self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor, past_state: InfinityMemoryState | None
    ) -> InfinityMemoryState:
        """Write the segment into each row's memory: the first segment of a row is fitted alone; later ones after the
        old signal sampled at M points and contracted into [0, τ]. Rows without events in the segment keep theirs."""
        batch_size, length, hidden_size = hidden_states.shape
        if past_state is None:
            past_state = InfinityMemoryState(
                coefficients=hidden_states.new_zeros(
                    batch_size, self.basis_centers.shape[0], hidden_size, dtype=torch.float32
                ),
                has_memory=torch.zeros(batch_size, dtype=torch.bool, device=hidden_states.device),
                attention_mass=(
                    hidden_states.new_zeros(batch_size, self.sticky_bins, dtype=torch.float32)
                    if self.sticky_memories
                    else None
                ),
            )
        memory_input = hidden_states.masked_fill(~key_padding_mask[..., None], 0.0)
        if self.gate is not None:
            gate = self.gate(memory_input.transpose(1, 2)).transpose(1, 2)
            memory_input = memory_input * torch.sigmoid(gate)
        # Short segments (the last one of a call) sit at the end of the positions, as in a full segment.
        memory_input = nn.functional.pad(memory_input, (0, 0, self.segment_length - length, 0))
        mask = nn.functional.pad(key_padding_mask, (self.segment_length - length, 0), value=False)

        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            memory_input = memory_input.float()
            has_memory = past_state.has_memory
            coefficients = past_state.coefficients
            if not has_memory.all():
                first = fit_coefficients(memory_input, mask, self.fit("segment"))
                coefficients = torch.where(has_memory[:, None, None], coefficients, first)
            if has_memory.any():
                old_samples = self.sample_old_signal(past_state)
                samples = torch.cat([old_samples, memory_input], dim=1)
                sample_mask = torch.cat([has_memory[:, None].expand(-1, self.num_samples), mask], dim=1)
                continued = fit_coefficients(samples, sample_mask, self.fit("memory"))
                coefficients = torch.where(has_memory[:, None, None], continued, coefficients)
            read_any = mask.any(dim=1)
            coefficients = torch.where(read_any[:, None, None], coefficients, past_state.coefficients)
        return InfinityMemoryState(
            coefficients=coefficients,
            has_memory=has_memory | read_any,
            attention_mass=past_state.attention_mass,
        )

    def fit(self, name: str) -> RidgeFit:
        """The precomputed ridge fit `"segment"` (a first segment) or `"memory"` (old samples and a new segment)."""
        return RidgeFit(
            solution=getattr(self, f"{name}_solution"),
            design=getattr(self, f"{name}_design"),
            prior=getattr(self, f"{name}_prior"),
        )

    def sample_old_signal(self, state: InfinityMemoryState) -> torch.Tensor:
        """The old signal at M points, `[batch, M, hidden]`: uniform points, or with sticky memories points drawn
        where the previous segment's queries looked (random in training; evenly spaced quantiles in evaluation)."""
        if not self.sticky_memories:
            return torch.einsum("mn,bne->bme", self.sample_basis, state.coefficients)
        batch_size = state.coefficients.shape[0]
        device = state.coefficients.device
        if self.training:
            quantiles = torch.rand(batch_size, self.num_samples, device=device).sort(dim=-1).values
        else:
            quantiles = (torch.arange(self.num_samples, device=device, dtype=torch.float32) + 0.5) / self.num_samples
            quantiles = quantiles.expand(batch_size, -1).contiguous()
        positions = sample_from_histogram(state.attention_mass, quantiles)
        basis = evaluate_basis(positions, self.basis_centers, self.basis_widths)
        return torch.einsum("bmn,bne->bme", basis, state.coefficients)

    def read_memory(
        self, query: torch.Tensor, state: InfinityMemoryState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continuous attention of `query [batch, heads, length, head_dim]` over each row's memory. Returns the
        context `[batch, length, hidden]` and the density mean and variance `[batch, heads, length]`."""
        batch_size, _, length, _ = query.shape
        coefficients = state.coefficients.to(self.ltm_k_proj.weight.dtype)
        key = self.split_heads(self.ltm_k_proj(coefficients))
        value = self.split_heads(self.ltm_v_proj(coefficients))
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * self.scaling
            mean = torch.sigmoid(self.density_parameter(self.mean_proj, scores))
            variance = nn.functional.softplus(self.density_parameter(self.variance_proj, scores))
            variance = variance.clamp(min=MIN_DENSITY_VARIANCE)
            weights = continuous_attention_weights(mean, variance, self.basis_centers, self.basis_widths)
            context = torch.matmul(weights, value.float())
        context = context.transpose(1, 2).reshape(batch_size, length, -1).to(query.dtype)
        return context, mean, variance

    @staticmethod
    def density_parameter(projection: nn.Linear, scores: torch.Tensor) -> torch.Tensor:
        """A float32 linear read-out of the scores over the basis (shared by all heads): `[..., N]` -> `[...]`."""
        return nn.functional.linear(scores, projection.weight.float(), projection.bias.float()).squeeze(-1)

    @staticmethod
    def kl_regularizer(variance: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """Mean over real queries and heads of KL(N(μ, σ²) || N(μ, σ₀²)) = ½(σ²/σ₀² − log(σ²/σ₀²) − 1)."""
        ratio = variance / KL_PRIOR_STD**2
        divergence = 0.5 * (ratio - torch.log(ratio) - 1)
        mask = key_padding_mask[:, None, :].expand_as(divergence)
        return divergence[mask].sum() / mask.sum().clamp(min=1)
