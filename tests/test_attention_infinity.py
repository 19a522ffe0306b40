"""∞-former: the continuous memory's closed forms against numerical references, and the model's state rules
(per row, padding and batch invariant, streaming equals one call, whole history read)."""

import math

import pytest
import torch
from conftest import random_batch, select_rows, tiny_config

from txformer import TxFormerForSequenceClassification, TxFormerModel
from txformer.attention_infinity import (
    InfinityMemoryState,
    TxFormerInfinityAttention,
    basis_centers_and_widths,
    continuous_attention_read,
    continuous_attention_weights,
    density_bin_mass,
    evaluate_basis,
    fit_coefficients,
    kl_divergence_to_prior,
    reference_padding,
    ridge_fit,
    sample_from_histogram,
    solve_normal_equations,
    suffix_solutions,
)


# The ∞-former's fields in the tiny config of every test (`conftest.tiny_config`).
TINY_SETTINGS = {"segment_length": 4, "ltm_num_basis": 8, "ltm_num_samples": 8}


def build(config, **kwargs):
    torch.manual_seed(0)
    return TxFormerForSequenceClassification(config, **kwargs).eval()


def segment_fit(num_basis: int = 128, length: int = 256, penalty: float = 1.0):
    centers, widths = basis_centers_and_widths(num_basis, [0.01, 0.05])
    positions = (torch.arange(1, length + 1, dtype=torch.float64) - 0.5) / length
    offsets = torch.arange(1, length // 2 + 1, dtype=torch.float64) / length
    padding = torch.cat([positions.min() - offsets, positions.max() + offsets])
    return positions, centers, widths, ridge_fit(positions, padding, centers, widths, penalty)


def normal_density(x: torch.Tensor, mean: float, variance: float) -> torch.Tensor:
    return torch.exp(-0.5 * (x - mean) ** 2 / variance) / math.sqrt(2 * math.pi * variance)


def test_basis_is_centre_major_with_widths_interleaved():
    centers, widths = basis_centers_and_widths(6, [0.01, 0.05])
    torch.testing.assert_close(centers, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    positions = torch.tensor([0.1, 0.45, 0.8], dtype=torch.float64)
    expected = torch.stack(
        [normal_density(positions, center, width**2) for center in (0.0, 0.5, 1.0) for width in (0.01, 0.05)], dim=-1
    )
    torch.testing.assert_close(evaluate_basis(positions, centers, widths), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("mean", "variance"), [(0.3, 1e-4), (0.5, 0.02), (0.97, 0.3), (0.0, 2.0)])
def test_closed_form_weights_match_numerical_quadrature(mean, variance):
    centers, widths = basis_centers_and_widths(8, [0.01, 0.05])
    closed_form = continuous_attention_weights(
        torch.tensor(mean, dtype=torch.float64), torch.tensor(variance, dtype=torch.float64), centers, widths
    )
    spread = math.sqrt(variance + 0.05**2)
    grid = torch.linspace(min(mean, 0.0) - 12 * spread, max(mean, 1.0) + 12 * spread, 400_001, dtype=torch.float64)
    integrand = normal_density(grid, mean, variance)[:, None] * evaluate_basis(grid, centers, widths)
    quadrature = torch.trapezoid(integrand, grid, dim=0)
    assert (closed_form - quadrature).abs().max() <= 1e-8


def test_jacobian_of_the_weights_matches_finite_differences():
    centers, widths = basis_centers_and_widths(8, [0.01, 0.05])
    mean = torch.tensor([0.2, 0.55, 0.9], dtype=torch.float64, requires_grad=True)
    variance = torch.tensor([1e-3, 0.01, 0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda mu, var: continuous_attention_weights(mu, var, centers, widths), (mean, variance)
    )


def test_reconstruction_of_a_smooth_signal():
    """A smooth signal that vanishes at the edges (as the zero-target padding assumes) comes back from its
    coefficients to a relative error below 1e-3 at the default N = 128, L = 256."""
    positions, centers, widths, fit = segment_fit()
    signal = torch.sin(math.pi * positions) ** 4 * (
        torch.sin(2 * math.pi * positions) + 0.5 * torch.cos(6 * math.pi * positions)
    )
    coefficients = fit.solution.T @ signal
    reconstruction = evaluate_basis(positions, centers, widths) @ coefficients
    assert (reconstruction - signal).norm() / signal.norm() < 1e-3


def test_ridge_fit_is_the_padded_regression_it_claims():
    """G equals the normal-equation solution of the padded design with zero targets at the padding points."""
    positions, centers, widths, fit = segment_fit(num_basis=16, length=12)
    samples = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spacing = 1.0 / 12
    padding = torch.cat(
        [positions.min() - spacing * torch.arange(1, 7), positions.max() + spacing * torch.arange(1, 7)]
    ).double()
    design = evaluate_basis(torch.cat([positions, padding]), centers, widths)
    targets = torch.cat([samples, torch.zeros(12, 3, dtype=torch.float64)])
    expected = torch.linalg.solve(design.T @ design + torch.eye(16, dtype=torch.float64), design.T @ targets)
    # Coefficients are ill-conditioned (the basis overlaps); the fitted signal is what must agree.
    basis = evaluate_basis(positions, centers, widths)
    torch.testing.assert_close(basis @ (fit.solution.T @ samples), basis @ expected, rtol=1e-6, atol=1e-9)


def test_masked_fit_leaves_missing_samples_out():
    """A row with padding is fitted on its present samples only: equal to the regression without those points,
    whatever values sit at the padded positions."""
    positions, centers, widths, fit = segment_fit(num_basis=16, length=12)
    samples = torch.randn(2, 12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False
    coefficients = fit_coefficients(samples, mask, fit)
    garbage = samples.clone()
    garbage[1, :5] = 1e6
    torch.testing.assert_close(fit_coefficients(garbage, mask, fit), coefficients)
    torch.testing.assert_close(coefficients[0], fit.solution.T @ samples[0])
    present = fit.design[:, 5:]
    expected = torch.linalg.solve(fit.prior + present @ present.T, present @ samples[1, 5:])
    torch.testing.assert_close(coefficients[1], expected)
    assert not torch.allclose(coefficients[1], fit.solution.T @ samples[1].masked_fill(~mask[1, :, None], 0))


def test_bin_mass_and_histogram_sampling():
    mass = density_bin_mass(torch.tensor([0.5]), torch.tensor([1e-6]), num_bins=4)
    torch.testing.assert_close(mass.sum(), torch.tensor(1.0))
    quantiles = ((torch.arange(8) + 0.5) / 8)[None]
    concentrated = sample_from_histogram(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), quantiles)
    assert ((concentrated >= 0.5) & (concentrated <= 0.75)).all()
    assert (concentrated.diff() > 0).all()
    torch.testing.assert_close(sample_from_histogram(torch.zeros(1, 4), quantiles), quantiles)


def test_buffers_stay_float32_when_the_model_is_cast():
    config = tiny_config("infinity")
    model = TxFormerModel(config)
    reference = model.layers[0].self_attn.segment_solution.clone()
    model.to(torch.bfloat16)
    attention = model.layers[0].self_attn
    assert attention.q_proj.weight.dtype == torch.bfloat16
    assert attention.segment_solution.dtype == torch.float32
    torch.testing.assert_close(attention.segment_solution, reference)


@pytest.mark.parametrize(
    ("embedding_sum_readout", "read_current_segment"), [(False, True), (True, True), (True, False)]
)
def test_streaming_equals_one_call(embedding_sum_readout, read_current_segment):
    """Reading a history in two calls (the second a whole number of segments) equals reading it at once (the state
    carries the embedding readout's sum too, and with `ltm_read_current_segment=False` the segment still to write)."""
    config = tiny_config(
        "infinity", embedding_sum_readout=embedding_sum_readout, ltm_read_current_segment=read_current_segment
    )
    model = build(config)
    if embedding_sum_readout:
        model.txformer.embedding_readout.running_mean.normal_(generator=torch.Generator().manual_seed(1))
    batch = random_batch(config, [13, 10, 7], seed=3)
    one_call = model(**batch)
    cut = torch.tensor([5, 2, 3])
    second_length = 8
    first = {key: value.clone() for key, value in batch.items()}
    first_mask = torch.arange(13)[None, :] < cut[:, None]
    for key in first:
        first[key] = first[key] * first_mask.view(3, 13, *([1] * (first[key].dim() - 2))).to(first[key].dtype)
    first["attention_mask"] = first_mask.long()
    index = (cut[:, None] + torch.arange(second_length)[None, :]).clamp(max=12)
    second_mask = (cut[:, None] + torch.arange(second_length)[None, :]) < batch["attention_mask"].sum(1)[:, None]
    second = {}
    for key, value in batch.items():
        gathered = value.gather(
            1, index.view(3, second_length, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
        )
        second[key] = gathered * second_mask.view(3, second_length, *([1] * (value.dim() - 2))).to(value.dtype)
    second["attention_mask"] = second_mask.long()
    state = model(**first).past_state
    streamed = model(**second, past_state=state)
    torch.testing.assert_close(streamed.logits, one_call.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("read_current_segment", [True, False])
def test_the_prediction_reads_the_whole_history(read_current_segment):
    """Changing the first events of a history several segments long changes the representation of its last event
    (the one `pooling="last"` predicts from): only the memory can carry it there."""
    config = tiny_config("infinity", pooling="last", ltm_read_current_segment=read_current_segment)
    model = build(config)
    batch = random_batch(config, [14, 14])
    changed = {key: value.clone() for key, value in batch.items()}
    changed["numeric_values"][1, :2] *= -50
    changed["input_ids"][1, :2] = 2
    original = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]
    modified = model(**changed, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(modified[0], original[0])
    assert (modified[1] - original[1]).abs().max() > 1e-4


def test_memory_is_per_row_and_bounded():
    config = tiny_config("infinity")
    model = TxFormerModel(config).eval()
    short = model(**random_batch(config, [3, 5]))
    long = model(**random_batch(config, [40, 5]))
    for short_layer, long_layer in zip(short.past_state.layer_states, long.past_state.layer_states, strict=True):
        assert isinstance(long_layer, InfinityMemoryState)
        assert long_layer.coefficients.shape == short_layer.coefficients.shape == (2, 8, config.hidden_size)
        assert long_layer.has_memory.all()
    # Row 1 is the same history in both batches: its memory does not see row 0.
    batch = random_batch(config, [40, 5])
    other = random_batch(config, [9, 5])
    other["input_ids"][1], other["numeric_values"][1], other["event_time"][1] = (
        batch["input_ids"][1, :9],
        batch["numeric_values"][1, :9],
        batch["event_time"][1, :9],
    )
    first, second = model(**batch).past_state, model(**other).past_state
    for first_layer, second_layer in zip(first.layer_states, second.layer_states, strict=True):
        torch.testing.assert_close(first_layer.coefficients[1], second_layer.coefficients[1], rtol=1e-5, atol=1e-5)


def test_carried_memory_is_detached_by_default_and_kept_on_request():
    batch = random_batch(tiny_config("infinity"), [11, 6])
    detached = TxFormerModel(tiny_config("infinity"))(**batch).past_state.layer_states[0]
    assert not detached.coefficients.requires_grad
    kept = TxFormerModel(tiny_config("infinity", ltm_detach_memory=False))(**batch).past_state.layer_states[0]
    assert kept.coefficients.requires_grad


@pytest.mark.parametrize("read_current_segment", [True, False])
def test_sticky_memories_and_kl_regulariser(read_current_segment):
    settings = {"ltm_sticky_memories": True, "ltm_sticky_bins": 6, "ltm_read_current_segment": read_current_segment}
    config = tiny_config("infinity", ltm_kl_weight=0.1, **settings)
    model = build(config)
    batch = random_batch(config, [11, 6, 9])
    labels = torch.tensor([0, 1, 1])
    outputs = model(**batch, labels=labels)
    assert outputs.past_state.layer_states[0].attention_mass.shape == (3, 6)
    without_kl = build(tiny_config("infinity", **settings))(**batch, labels=labels)
    assert outputs.loss > without_kl.loss
    torch.testing.assert_close(outputs.logits, without_kl.logits)
    permutation = [2, 0, 1]
    permuted = model(**{key: value[permutation] for key, value in batch.items()})
    torch.testing.assert_close(permuted.logits, outputs.logits[permutation], rtol=1e-5, atol=1e-5)
    alone = model(**select_rows(batch, [1], 6)).logits
    torch.testing.assert_close(alone, outputs.logits[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("read_current_segment", [True, False])
def test_training_step_runs_and_reaches_every_memory_parameter(read_current_segment):
    """With the memory detached between segments (the default), the write path still trains: the last segment
    writes itself (or the segment held before it) with gradient."""
    config = tiny_config(
        "infinity", ltm_sticky_memories=True, ltm_kl_weight=1e-3, ltm_read_current_segment=read_current_segment
    )
    model = TxFormerForSequenceClassification(config).train()
    outputs = model(**random_batch(config, [11, 6]), labels=torch.tensor([0, 1]))
    outputs.loss.backward()
    attention = model.txformer.layers[0].self_attn
    for parameter in (attention.ltm_k_proj.weight, attention.mean_proj.weight, attention.gate.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_a_state_for_another_batch_size_is_rejected():
    config = tiny_config("infinity")
    model = build(config)
    state = model(**random_batch(config, [5, 6])).past_state
    with pytest.raises(ValueError, match="past_state holds the memory of 2 rows"):
        model(**random_batch(config, [4, 4, 4]), past_state=state)


def test_direct_segment_longer_than_segment_length_is_rejected():
    config = tiny_config("infinity")
    attention = TxFormerInfinityAttention(config, layer_idx=0)
    hidden = torch.randn(1, config.segment_length + 1, config.hidden_size)
    with pytest.raises(ValueError, match="segment_length"):
        attention(hidden, None, torch.ones(1, config.segment_length + 1, dtype=torch.bool))


def test_skipping_the_per_event_outputs_keeps_the_pooled_output():
    config = tiny_config("infinity")
    model = TxFormerModel(config).eval()
    batch = random_batch(config, [13, 6])
    full = model(**batch)
    lean = model(**batch, output_last_hidden_state=False)
    assert lean.last_hidden_state is None and full.last_hidden_state.shape == (2, 13, config.hidden_size)
    torch.testing.assert_close(lean.pooler_output, full.pooler_output)


def test_memory_projections_have_no_bias():
    """As in the reference layers: a value bias would enter every context multiplied by Σ_j r_j."""
    attention = TxFormerInfinityAttention(tiny_config("infinity"), layer_idx=0)
    for projection in (
        attention.ltm_k_proj,
        attention.ltm_v_proj,
        attention.ltm_o_proj,
        attention.mean_proj,
        attention.variance_proj,
    ):
        assert projection.bias is None
    assert not any(
        name.startswith(("ltm_", "mean_", "variance_")) and "bias" in name for name, _ in attention.named_parameters()
    )


def reference_solution(positions: torch.Tensor, num_padding: int, num_basis: int, penalty: float) -> torch.Tensor:
    """The reference code's `compute_G` in float64: G = Fᵀ (F Fᵀ + λ I)⁻¹ over all points, the middle rows kept."""
    centers, widths = torch.linspace(0, 1, num_basis // 2, dtype=torch.float64), (0.01, 0.05)
    design = torch.stack(
        [normal_density(positions, center.item(), width**2) for center in centers for width in widths]
    )
    solution = design.T @ torch.linalg.inv(design @ design.T + penalty * torch.eye(num_basis, dtype=torch.float64))
    return solution[num_padding:-num_padding]


@pytest.mark.parametrize(("num_samples", "length"), [(6, 4), (5, 4), (8, 6)])
def test_ridge_fits_use_the_reference_padding_layout(num_samples, length):
    """Both fits equal the reference formulas, padding points included: for the first segment L // 2 points each
    side at spacing 1/L; for the memory update the points of linspace(-0.5 + h, 1.5 - h, 2 (M + L)) outside [0, 1]
    with h = 1 / (2 L + M), as written in the reference code."""
    config = tiny_config("infinity", segment_length=length, ltm_num_samples=num_samples, ltm_contraction=0.75)
    buffers = TxFormerInfinityAttention(config, layer_idx=0).compute_buffers()
    num_basis, penalty, contraction = config.ltm_num_basis, config.ltm_ridge_penalty, config.ltm_contraction

    if length % 2:
        grid = torch.linspace(-0.5 + 1 / length, 1.5 - 1 / length, 2 * length - 1, dtype=torch.float64)
    else:
        grid = torch.linspace(-0.5 + 1 / (2 * length), 1.5 - 1 / (2 * length), 2 * length, dtype=torch.float64)
    expected = reference_solution(grid, length // 2, num_basis, penalty)
    torch.testing.assert_close(buffers["segment_solution"], expected, rtol=1e-9, atol=1e-12)

    old = torch.arange(1, num_samples + 1, dtype=torch.float64) * contraction / num_samples
    new = contraction + (1 - contraction) * torch.arange(1, length + 1, dtype=torch.float64) / length
    shift = 1 / (2 * length + num_samples)
    grid = torch.linspace(-0.5 + shift, 1.5 - shift, 2 * (length + num_samples), dtype=torch.float64)
    positions = torch.cat([grid[grid < 0], old, new, grid[grid > 1]])
    total = num_samples + length
    expected = reference_solution(positions, (total - total % 2) // 2, num_basis, penalty)
    torch.testing.assert_close(buffers["memory_solution"], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        reference_padding(2 * total, shift), torch.cat([grid[grid < 0], grid[grid > 1]]), rtol=0, atol=0
    )


def test_kl_regulariser_averages_over_every_segment():
    """The auxiliary loss is `ltm_kl_weight` times the KL term averaged over the real (head, event) pairs of all
    segments, each layer's average summed over layers: not the last segment's alone."""
    config = tiny_config("infinity", ltm_kl_weight=0.1)
    model = build(config)
    recorded = {index: [] for index in range(config.num_hidden_layers)}
    for index, layer in enumerate(model.txformer.layers):
        attention = layer.self_attn
        # Spread the densities (at initialisation every variance is about softplus(0)).
        torch.nn.init.normal_(attention.variance_proj.weight, std=3.0)
        torch.nn.init.normal_(attention.ltm_k_proj.weight, std=1.0)

        def read_memory(query, state, attention=attention, index=index):
            context, mean, variance = type(attention).read_memory(attention, query, state)
            recorded[index].append(variance)
            return context, mean, variance

        def record_mask(module, args, kwargs, index=index):
            recorded[index].append(kwargs["key_mask"])

        attention.read_memory = read_memory
        attention.register_forward_pre_hook(record_mask, with_kwargs=True)
    batch = random_batch(config, [11, 6])
    aux_loss = model.txformer(**batch).aux_loss
    expected, last_only = 0.0, 0.0
    for entries in recorded.values():
        masks, variances = entries[0::2], entries[1::2]
        assert len(variances) == 3
        terms = [
            kl_divergence_to_prior(variance)[mask[:, None, :].expand_as(variance)]
            for mask, variance in zip(masks, variances, strict=True)
        ]
        expected = expected + config.ltm_kl_weight * torch.cat(terms).mean()
        last_only = last_only + config.ltm_kl_weight * terms[-1].mean()
    torch.testing.assert_close(aux_loss, expected)
    assert not torch.allclose(aux_loss, last_only)


def test_partial_rows_match_the_float64_solve():
    """A row with missing samples gets the solution of the float64 normal equations the precomputed solution comes
    from (float64 buffers, kept under casts), not of float32-rounded ones: a row missing its first samples (the first
    segment of a history) through the precomputed solution for that many missing samples, any other row through its
    own solve; both match the float64 solve to float32 rounding of the result."""
    config = tiny_config("infinity", segment_length=128, ltm_num_basis=128, ltm_num_samples=8)
    attention = TxFormerInfinityAttention(config, layer_idx=0).to(torch.bfloat16)
    assert attention.segment_design.dtype == attention.memory_prior.dtype == torch.float64
    assert attention.segment_suffix_solutions.dtype == torch.float32
    exact = attention.compute_buffers()
    samples = torch.randn(3, 128, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 128, dtype=torch.bool)
    mask[1, :40] = False
    mask[2, 30:70] = False
    coefficients = fit_coefficients(samples, mask, attention.fit("segment")).double()
    for row in (1, 2):
        present = exact["segment_design"][:, mask[row]]
        expected = torch.linalg.solve(
            exact["segment_prior"] + present @ present.T, present @ samples[row, mask[row]].double()
        )
        # Float32-rounded normal equations would be about ten times off this tolerance.
        torch.testing.assert_close(coefficients[row], expected, rtol=1e-6, atol=1e-7)
    full = exact["segment_solution"].T @ samples[0].double()
    torch.testing.assert_close(coefficients[0], full, rtol=1e-5, atol=1e-6)


def test_suffix_solutions_solve_every_number_of_missing_samples():
    """Entry j of the precomputed suffix solutions is the ridge solution with the first j samples left out (zero rows
    for them), from the full solution (j = 0) to no sample at all (zeros)."""
    _, _, _, fit = segment_fit(num_basis=16, length=12)
    solutions = suffix_solutions(fit)
    assert solutions.shape == (13, 12, 16)
    for num_missing in range(13):
        present = fit.design[:, num_missing:]
        expected = torch.zeros(12, 16, dtype=torch.float64)
        if num_missing < 12:
            expected[num_missing:] = torch.linalg.solve(fit.prior + present @ present.T, present).T
        torch.testing.assert_close(solutions[num_missing], expected)
    torch.testing.assert_close(solutions[0], fit.solution)


@pytest.mark.parametrize("sticky_memories", [False, True])
def test_memory_update_equals_the_fit_of_old_samples_and_new_segment(sticky_memories):
    """The update `G_oldᵀ Ψ B_past + G_newᵀ X_new` equals the ridge fit of `[X_past; X_new]` (full and partial
    segments alike)."""
    config = tiny_config("infinity", ltm_sticky_memories=sticky_memories, ltm_sticky_bins=6)
    attention = TxFormerInfinityAttention(config, layer_idx=0).eval()
    generator = torch.Generator().manual_seed(0)
    state = attention.empty_state(torch.zeros(3, 4, config.hidden_size))
    state.coefficients = torch.randn(state.coefficients.shape, generator=generator)
    state.has_memory = torch.ones(3, dtype=torch.bool)
    if sticky_memories:
        state.attention_mass = torch.rand(3, 6, generator=generator)
    memory_input = torch.randn(3, 4, config.hidden_size, generator=generator)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, :2] = False
    updated = attention.continue_memory(state, memory_input, mask)
    samples = torch.cat([attention.sample_old_signal(state), memory_input], dim=1)
    sample_mask = torch.cat([torch.ones(3, config.ltm_num_samples, dtype=torch.bool), mask], dim=1)
    torch.testing.assert_close(updated, fit_coefficients(samples, sample_mask, attention.fit("memory")))


def test_density_parameters_read_the_scores_over_the_basis():
    """μ = sigmoid(w_μᵀ s) and σ² = softplus(w_σᵀ s) with the scores s = K q / √d over the N basis functions, as in
    the reference, although the scores are never formed."""
    config = tiny_config("infinity")
    attention = TxFormerInfinityAttention(config, layer_idx=0)
    generator = torch.Generator().manual_seed(0)
    for parameter in attention.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    state = attention.empty_state(torch.zeros(2, 4, config.hidden_size))
    state.coefficients = torch.randn(state.coefficients.shape, generator=generator)
    query = torch.randn(2, config.num_attention_heads, 4, 8, generator=generator)
    _, mean, variance = attention.read_memory(query, state)
    keys = attention.split_heads(attention.ltm_k_proj(state.coefficients))
    scores = query @ keys.transpose(2, 3) / math.sqrt(8)
    torch.testing.assert_close(mean, torch.sigmoid(attention.mean_proj(scores)).squeeze(-1))
    expected_variance = torch.nn.functional.softplus(attention.variance_proj(scores)).squeeze(-1).clamp(min=1e-4)
    torch.testing.assert_close(variance, expected_variance)


@pytest.mark.parametrize("read_current_segment", [True, False])
def test_rows_starting_later_are_left_out_of_early_segments_exactly(read_current_segment):
    """Rows whose history starts in a later segment are skipped there; compiled (one graph, whose shapes cannot depend
    on the data), every row runs every segment: both give the same outputs and state."""
    config = tiny_config("infinity", ltm_kl_weight=0.1, ltm_read_current_segment=read_current_segment)
    model = build(config)
    batch = random_batch(config, [14, 3, 7, 0])
    skipped = model.txformer(**batch)
    every_row = torch.compile(model.txformer, backend="eager", fullgraph=True)(**batch)
    torch.testing.assert_close(skipped.last_hidden_state, every_row.last_hidden_state)
    torch.testing.assert_close(skipped.pooler_output, every_row.pooler_output)
    torch.testing.assert_close(skipped.aux_loss, every_row.aux_loss)
    for first, second in zip(skipped.past_state.layer_states, every_row.past_state.layer_states, strict=True):
        torch.testing.assert_close(first.coefficients, second.coefficients)
        torch.testing.assert_close(first.has_memory, second.has_memory)
        torch.testing.assert_close(first.held_input, second.held_input)


def test_the_memory_read_is_the_weighted_sum_of_the_values():
    """The read (weights kept width-major, value rows reordered) equals the centre-major weights times the values."""
    centers, widths = basis_centers_and_widths(8, [0.01, 0.05])
    generator = torch.Generator().manual_seed(0)
    mean = torch.rand(2, 3, 5, generator=generator, dtype=torch.float64)
    variance = torch.rand(2, 3, 5, generator=generator, dtype=torch.float64) * 0.05 + 1e-4
    value = torch.randn(2, 3, 8, 4, generator=generator, dtype=torch.float64)
    expected = continuous_attention_weights(mean, variance, centers, widths) @ value
    torch.testing.assert_close(continuous_attention_read(mean, variance, centers, widths, value), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_memory_read_has_the_gradients_of_its_formula(dtype, monkeypatch):
    """With gradients the read is one autograd node (`ContinuousAttentionRead`, here over several chunks of rows):
    its values and gradients equal autograd's through the weights' formula (float64: to rounding; float32: to its
    resolution), and float64 passes `gradcheck`."""
    monkeypatch.setattr("txformer.attention_infinity.READ_CHUNK_NUM_ELEMENTS", 5 * 16)
    centers, widths = basis_centers_and_widths(16, [0.01, 0.05], dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    mean = torch.rand(2, 3, 5, generator=generator, dtype=dtype).requires_grad_()
    variance = (torch.rand(2, 3, 5, generator=generator, dtype=dtype) * 0.05 + 1e-4).requires_grad_()
    value = torch.randn(2, 3, 16, 4, generator=generator, dtype=dtype).requires_grad_()
    read = continuous_attention_read(mean, variance, centers, widths, value)
    expected = continuous_attention_weights(mean, variance, centers, widths) @ value
    assert read.grad_fn.next_functions[0][0].name() == "ContinuousAttentionReadBackward"
    grad_output = torch.randn(read.shape, generator=generator, dtype=dtype)
    gradients = torch.autograd.grad(read, (mean, variance, value), grad_output)
    expected_gradients = torch.autograd.grad(expected, (mean, variance, value), grad_output)
    tolerance = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(read, expected, **tolerance)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        scale = expected_gradient.abs().max()
        torch.testing.assert_close(gradient / scale, expected_gradient / scale, **tolerance)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda *inputs: continuous_attention_read(inputs[0], inputs[1], centers, widths, inputs[2]),
            (mean, variance, value),
        )


def test_float32_buffers_hold_no_subnormal_numbers():
    """Entries of the precomputed fits that round below float32's smallest normal number are zero: products with
    subnormal numbers run many times slower on CPUs."""
    attention = TxFormerModel(tiny_config("infinity", segment_length=64, ltm_num_basis=32)).layers[0].self_attn
    for name in attention.float32_buffers:
        buffer = getattr(attention, name)
        assert not ((buffer != 0) & (buffer.abs() < torch.finfo(torch.float32).tiny)).any(), name


def test_normal_equations_over_present_or_missing_samples_are_the_regression_on_the_present_ones():
    """Whichever half a row's normal matrix is summed over (its present samples, or its missing ones subtracted from
    the full normal matrix), the solution is the float64 regression on the present samples, whatever the missing
    positions hold."""
    _, _, _, fit = segment_fit(num_basis=16, length=24)
    generator = torch.Generator().manual_seed(0)
    num_present = torch.tensor([1, 5, 11, 12, 13, 20, 23, 24])
    # Suffixes, as the model lays out a history's first segment, and one scattered mask.
    mask = torch.arange(24)[None, :] >= 24 - num_present[:, None]
    mask[-1] = torch.rand(24, generator=generator) > 0.5
    samples = torch.randn(len(mask), 24, 3, generator=generator, dtype=torch.float64)
    solved = solve_normal_equations(samples.masked_fill(~mask[..., None], 1e6), mask, fit)
    for row, row_mask in enumerate(mask):
        present = fit.design[:, row_mask]
        expected = torch.linalg.solve(fit.prior + present @ present.T, present @ samples[row, row_mask])
        torch.testing.assert_close(solved[row], expected, rtol=1e-9, atol=1e-12)


def test_without_the_current_segment_a_first_segment_reads_no_memory():
    """With `ltm_read_current_segment=False` (the reference's order) a history of one segment is read by the
    short-term attention alone: the memory's weights do not change it; a longer one reads its earlier segments, and
    its memory holds every segment but the last, which the state holds."""
    config = tiny_config("infinity", ltm_read_current_segment=False)
    model = build(config)
    batch = random_batch(config, [4, 3, 10])
    before = model(**batch).logits
    for layer in model.txformer.layers:
        torch.nn.init.normal_(layer.self_attn.ltm_o_proj.weight, std=1.0)
    after = model(**batch)
    torch.testing.assert_close(after.logits[:2], before[:2])
    assert (after.logits[2] - before[2]).abs().max() > 1e-4
    state = after.past_state.layer_states[0]
    assert state.has_memory.tolist() == [False, False, True]
    assert state.held_mask.sum(dim=1).tolist() == [4, 3, 4]
