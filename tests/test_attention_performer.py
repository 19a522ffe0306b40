"""FAVOR+ attention: accuracy against exact attention, equivalence with performer-pytorch, exact padding, gradients,
mixed precision, orthogonal features, and the projection buffer and redraw policy of the module."""

import math

import pytest
import torch
from conftest import random_batch, tiny_config
from torch import nn
from transformers import TrainerControl, TrainerState

from txformer import TxFormerForSequenceClassification
from txformer.attention_performer import (
    KERNELS,
    TxFormerPerformerAttention,
    draw_orthogonal_features,
    favor_attention,
)
from txformer.callbacks import AttentionStepCallback


# Spec §11: relative Frobenius error bounds of the output at d = 64, σ <= 0.35, averaged over a few seeds.
ERROR_BOUNDS = {64: 0.35, 128: 0.25, 256: 0.18}
# The Performer's fields in the tiny config of every test (`conftest.tiny_config`).
TINY_SETTINGS = {"performer_num_random_features": 16}
ACCURACY_HEAD_DIM = 64
ACCURACY_LENGTH = 256
ACCURACY_SEEDS = range(4)


def random_qkv(
    batch_size: int,
    num_heads: int,
    length: int,
    head_dim: int,
    sigma: float = 1.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys ~ σ N(0, 1), values ~ N(0, 1), `[batch, heads, length, head_dim]`."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, num_heads, length, head_dim)
    query = sigma * torch.randn(shape, generator=generator, dtype=dtype)
    key = sigma * torch.randn(shape, generator=generator, dtype=dtype)
    return query, key, torch.randn(shape, generator=generator, dtype=dtype)


def projection(num_features: int, head_dim: int, seed: int = 0, dtype=torch.float64, **kwargs) -> torch.Tensor:
    """A projection drawn with our recipe from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return draw_orthogonal_features(num_features, head_dim, generator=generator, dtype=dtype, **kwargs)


def exact_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v."""
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    return torch.softmax(scores, dim=-1) @ value


def mean_relative_error(sigma: float, num_features: int, **draw_kwargs) -> float:
    """‖FAVOR+ − exact‖ / ‖exact‖, averaged over seeds of the data and of the projection."""
    errors = []
    for seed in ACCURACY_SEEDS:
        query, key, value = random_qkv(1, 2, ACCURACY_LENGTH, ACCURACY_HEAD_DIM, sigma, seed=seed)
        weights = projection(num_features, ACCURACY_HEAD_DIM, seed=100 + seed, **draw_kwargs)
        exact = exact_attention(query, key, value)
        errors.append(((favor_attention(query, key, value, weights) - exact).norm() / exact.norm()).item())
    return sum(errors) / len(errors)


def padding_mask(lengths: list[int], max_length: int) -> torch.Tensor:
    """Bool `[batch, max_length]`, True on the first `length` positions of each row."""
    return torch.arange(max_length)[None, :] < torch.tensor(lengths)[:, None]


# (1) Accuracy against exact softmax attention.


@pytest.mark.parametrize("sigma", [0.25, 0.35])
@pytest.mark.parametrize("num_features", sorted(ERROR_BOUNDS))
def test_error_against_exact_attention_is_within_the_spec_bounds(sigma, num_features):
    assert mean_relative_error(sigma, num_features) <= ERROR_BOUNDS[num_features]


def test_error_falls_with_the_number_of_features_at_larger_norms():
    errors = [mean_relative_error(0.5, num_features) for num_features in sorted(ERROR_BOUNDS)]
    assert errors[0] > errors[1] > errors[2]


def test_orthogonal_features_beat_iid_features_on_average():
    orthogonal = sum(mean_relative_error(0.35, num_features) for num_features in ERROR_BOUNDS)
    iid = sum(mean_relative_error(0.35, num_features, orthogonal=False) for num_features in ERROR_BOUNDS)
    assert orthogonal < iid


# (2) Equivalence of the compatibility mode with performer-pytorch 1.1.4.


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 1e-9, 1e-12), (torch.float32, 1e-4, 1e-5)])
def test_compat_mode_matches_performer_pytorch_outputs_and_gradients(kernel, with_mask, dtype, rtol, atol):
    performer_pytorch = pytest.importorskip("performer_pytorch")
    head_dim, num_features = 16, 24
    fast_attention = performer_pytorch.FastAttention(
        dim_heads=head_dim, nb_features=num_features, generalized_attention=kernel == "relu"
    ).to(dtype)
    weights = projection(num_features, head_dim, dtype=dtype)
    fast_attention.projection_matrix.copy_(weights)  # after the cast, so that W is not rounded to float32
    inputs = [tensor.requires_grad_() for tensor in random_qkv(2, 3, 11, head_dim, sigma=0.8, dtype=dtype)]
    mask = padding_mask([11, 6], 11) if with_mask else None
    ours = favor_attention(*inputs, weights, mask, kernel=kernel, compat_performer_pytorch=True)
    query, key, value = inputs
    # performer-pytorch's SelfAttention masks by zeroing the padded values before FastAttention.
    masked_value = value if mask is None else value.masked_fill(~mask[:, None, :, None], 0.0)
    theirs = fast_attention(query, key, masked_value)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)
    output_grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    our_grads = torch.autograd.grad(ours, inputs, output_grad)
    their_grads = torch.autograd.grad(theirs, inputs, output_grad)
    for our_grad, their_grad in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(our_grad, their_grad, rtol=rtol, atol=atol)


# (3) Exact padding.


@pytest.mark.parametrize("kernel", KERNELS)
def test_real_rows_equal_the_unpadded_computation(kernel):
    lengths = [13, 7, 1]
    query, key, value = random_qkv(3, 2, 13, 8, sigma=0.7)
    weights = projection(16, 8)
    output = favor_attention(query, key, value, weights, padding_mask(lengths, 13), kernel=kernel, chunk_length=4)
    for row, length in enumerate(lengths):
        alone = favor_attention(
            query[row : row + 1, :, :length],
            key[row : row + 1, :, :length],
            value[row : row + 1, :, :length],
            weights,
            kernel=kernel,
        )
        torch.testing.assert_close(output[row : row + 1, :, :length], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_padded_keys_values_and_queries_change_nothing_and_stay_finite(kernel):
    lengths = [13, 7, 0]
    query, key, value = random_qkv(3, 2, 13, 8, sigma=0.7)
    mask = padding_mask(lengths, 13)
    weights = projection(16, 8)
    output = favor_attention(query, key, value, weights, mask, kernel=kernel, chunk_length=4)
    real = mask[:, None, :, None]
    generator = torch.Generator().manual_seed(5)
    garbage = [torch.randn(query.shape, generator=generator, dtype=query.dtype) * scale for scale in (1e3, 1e3, 1e6)]
    noisy_query, noisy_key, noisy_value = (
        torch.where(real, tensor, noise) for tensor, noise in zip((query, key, value), garbage, strict=True)
    )
    noisy_keys_output = favor_attention(query, noisy_key, noisy_value, weights, mask, kernel=kernel, chunk_length=4)
    torch.testing.assert_close(noisy_keys_output, output, rtol=0, atol=0)
    noisy_output = favor_attention(noisy_query, noisy_key, noisy_value, weights, mask, kernel=kernel, chunk_length=4)
    assert torch.isfinite(noisy_output).all()
    torch.testing.assert_close(noisy_output * real, output * real, rtol=0, atol=0)
    assert torch.equal(output[2], torch.zeros_like(output[2]))  # a row with no real key gets 0, not NaN


def test_chunking_and_the_running_key_max_do_not_change_results():
    query, key, value = random_qkv(2, 2, 23, 8, sigma=0.6)
    key = key * torch.linspace(0.5, 3.0, 23, dtype=key.dtype)[:, None]  # the key max grows from chunk to chunk
    weights = projection(12, 8)
    mask = padding_mask([23, 17], 23)
    reference = favor_attention(query, key, value, weights, mask)
    for chunk_length in (1, 4, 9):
        chunked = favor_attention(query, key, value, weights, mask, chunk_length=chunk_length)
        torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-12)


# (4) Hand-written backward.


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_with_a_padding_mask_and_several_chunks(kernel):
    inputs = [tensor.requires_grad_() for tensor in random_qkv(2, 2, 5, 4, sigma=0.8)]
    weights = projection(6, 4).requires_grad_()
    mask = padding_mask([5, 3], 5)

    def attention(query, key, value, projection_matrix):
        return favor_attention(query, key, value, projection_matrix, mask, kernel=kernel, chunk_length=2)

    assert torch.autograd.gradcheck(attention, (*inputs, weights))


# (5) Mixed precision.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_at_length_16384_is_finite_and_computed_in_float32(dtype):
    inputs = [tensor.requires_grad_() for tensor in random_qkv(1, 2, 16384, 16, sigma=1.5, dtype=torch.float32)]
    weights = projection(32, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        half_inputs = [tensor.to(dtype) for tensor in inputs]
        output = favor_attention(*half_inputs, weights)
    assert output.dtype == dtype
    assert torch.isfinite(output).all()
    output.float().square().mean().backward()
    assert all(torch.isfinite(tensor.grad).all() for tensor in inputs)
    float32_output = favor_attention(*(tensor.detach().float() for tensor in half_inputs), weights)
    torch.testing.assert_close(output.float(), float32_output, rtol=1e-2, atol=1e-2)


# (6) Orthogonal random features.


@pytest.mark.parametrize("scaling", [0, 1])
def test_orthogonal_blocks_have_orthonormal_directions(scaling):
    head_dim, num_features = 8, 20  # two full blocks and 4 rows of a third
    weights = projection(num_features, head_dim, scaling=scaling)
    assert weights.shape == (num_features, head_dim)
    directions = weights / weights.norm(dim=-1, keepdim=True)
    for block in directions.split(head_dim):
        torch.testing.assert_close(block @ block.T, torch.eye(len(block), dtype=block.dtype), rtol=0, atol=1e-12)


def test_row_norms_are_sqrt_d_for_scaling_1_and_chi_d_for_scaling_0():
    head_dim = 8
    norms_1 = projection(64, head_dim, scaling=1).norm(dim=-1)
    torch.testing.assert_close(norms_1, torch.full_like(norms_1, math.sqrt(head_dim)))
    squared_norms_0 = projection(8000, head_dim, scaling=0).norm(dim=-1).square()
    assert squared_norms_0.std() > 1.0  # χ²_d spread (std √(2d) = 4), not a constant
    assert abs(squared_norms_0.mean().item() - head_dim) < 0.3  # E χ²_d = d; the standard error is 0.045


def test_haar_sign_fix_makes_the_block_diagonals_symmetric():
    """Plain Householder QR makes Q[0, 0] negative every time and about 27% of diagonal entries positive at d = 4;
    with the sign fix the blocks are Haar-distributed, so each entry is positive half the time."""
    head_dim = 4
    blocks = projection(4000 * head_dim, head_dim, scaling=1).view(4000, head_dim, head_dim)
    diagonals = torch.diagonal(blocks, dim1=-2, dim2=-1)
    assert 0.45 < (diagonals[:, 0] > 0).double().mean().item() < 0.55
    assert 0.47 < (diagonals > 0).double().mean().item() < 0.53


def test_draws_depend_only_on_the_generator():
    first = projection(10, 4, seed=3)
    torch.manual_seed(123)  # the global generator is not used
    torch.testing.assert_close(projection(10, 4, seed=3), first, rtol=0, atol=0)
    assert not torch.equal(projection(10, 4, seed=4), first)


# (7) The module: projection buffer, redraw policy, functional equivalence.


def test_projection_is_a_persistent_float32_buffer_drawn_from_seed_and_layer():
    config = tiny_config("performer", performer_seed=7)
    layer = TxFormerPerformerAttention(config, layer_idx=0)
    head_dim = config.hidden_size // config.num_attention_heads
    assert layer.projection_matrix.shape == (config.performer_num_random_features, head_dim)
    assert layer.projection_matrix.dtype == torch.float32
    assert "projection_matrix" in layer.state_dict()
    assert torch.equal(layer.projection_matrix, TxFormerPerformerAttention(config, layer_idx=0).projection_matrix)
    assert not torch.equal(layer.projection_matrix, TxFormerPerformerAttention(config, layer_idx=1).projection_matrix)
    other_seed = tiny_config("performer", performer_seed=8)
    assert not torch.equal(layer.projection_matrix, TxFormerPerformerAttention(other_seed, 0).projection_matrix)


def test_redraws_happen_in_training_at_positive_multiples_of_the_interval_only():
    config = tiny_config("performer", performer_redraw_interval=3)
    layer = TxFormerPerformerAttention(config, layer_idx=1).train()
    initial = layer.projection_matrix.clone()
    for step in (0, 1, 2, 4, 5):
        layer.begin_optimizer_step(step)
        assert torch.equal(layer.projection_matrix, initial)
    layer.begin_optimizer_step(3)
    step_3 = layer.projection_matrix.clone()
    assert not torch.equal(step_3, initial)
    replica = TxFormerPerformerAttention(config, layer_idx=1).train()  # another process of a distributed run
    replica.begin_optimizer_step(3)
    assert torch.equal(replica.projection_matrix, step_3)
    layer.begin_optimizer_step(6)
    assert not torch.equal(layer.projection_matrix, step_3)
    layer.eval()
    evaluated = layer.projection_matrix.clone()
    layer.begin_optimizer_step(9)
    assert torch.equal(layer.projection_matrix, evaluated)


def test_interval_zero_never_redraws():
    layer = TxFormerPerformerAttention(tiny_config("performer", performer_redraw_interval=0), layer_idx=0).train()
    initial = layer.projection_matrix.clone()
    for step in (1, 2, 1000, 10**6):
        layer.begin_optimizer_step(step)
    assert torch.equal(layer.projection_matrix, initial)


def test_reset_buffers_draws_the_step_zero_matrix_after_meta_device_init():
    config = tiny_config("performer", performer_redraw_interval=2)
    with torch.device("meta"):
        layer = TxFormerPerformerAttention(config, layer_idx=1)
    assert layer.projection_matrix.is_meta
    layer.to_empty(device="cpu")
    layer.reset_buffers()
    assert torch.equal(layer.projection_matrix, TxFormerPerformerAttention(config, layer_idx=1).projection_matrix)


@pytest.mark.parametrize("kernel", KERNELS)
def test_module_output_equals_the_functional_call(kernel):
    config = tiny_config("performer", performer_kernel=kernel)
    layer = TxFormerPerformerAttention(config, layer_idx=0).eval()
    hidden_states = torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(0))
    key_mask = padding_mask([9, 4], 9)
    output, weights, state = layer(hidden_states, None, key_mask)
    query, key, value = (layer.split_heads(proj(hidden_states)) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    expected = favor_attention(query, key, value, layer.projection_matrix, key_mask, kernel=kernel)
    expected = layer.o_proj(expected.transpose(1, 2).reshape(hidden_states.shape))
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert weights is None and state is None


def test_step_callback_redraws_every_performer_layer_when_due():
    config = tiny_config("performer", performer_redraw_interval=2)
    model = nn.ModuleList(TxFormerPerformerAttention(config, layer_idx) for layer_idx in range(2)).train()
    callback = AttentionStepCallback()
    callback.on_step_begin(None, TrainerState(global_step=1), TrainerControl(), model=model)
    assert all(torch.equal(layer.projection_matrix, layer.draw_projection(0)) for layer in model)
    callback.on_step_begin(None, TrainerState(global_step=2), TrainerControl(), model=model)
    assert all(torch.equal(layer.projection_matrix, layer.draw_projection(2)) for layer in model)


# Model level.


def test_model_init_draws_the_step_zero_projection_of_each_layer():
    model = TxFormerForSequenceClassification(tiny_config("performer"))
    layers = [module for module in model.modules() if isinstance(module, TxFormerPerformerAttention)]
    assert len(layers) == model.config.num_hidden_layers
    assert all(torch.equal(layer.projection_matrix, layer.draw_projection(0)) for layer in layers)


def test_save_and_load_keep_a_redrawn_projection(tmp_path):
    config = tiny_config("performer", performer_redraw_interval=5)
    model = TxFormerForSequenceClassification(config).train()
    model.begin_optimizer_step(5)
    model.eval()
    batch = random_batch(config, [6, 3])
    logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = TxFormerForSequenceClassification.from_pretrained(tmp_path).eval()
    pairs = [
        (saved, restored)
        for saved, restored in zip(model.modules(), loaded.modules(), strict=True)
        if isinstance(saved, TxFormerPerformerAttention)
    ]
    for saved, restored in pairs:
        assert not torch.equal(saved.projection_matrix, saved.draw_projection(0))
        assert torch.equal(restored.projection_matrix, saved.projection_matrix)
    torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=0)
