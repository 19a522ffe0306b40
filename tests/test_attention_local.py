"""Sliding-window attention: the blocked functional core against a dense masked float64 reference (values and
gradients), its O(length × window) blocks, the module against the core under SDPA and eager, exact full attention
when the window covers the history, and bad settings."""

import pytest
import torch
from conftest import random_batch, tiny_config

from txformer import TxFormerConfig, TxFormerForSequenceClassification
from txformer.attention_full import apply_rotary_pos_emb
from txformer.attention_local import TxFormerLocalAttention, local_attention


# Local attention's fields in the tiny config of every test (`conftest.tiny_config`): a window shorter than the test
# histories, and a global first event.
TINY_SETTINGS = {"local_window": 2, "local_num_global": 1}
LENGTHS = [13, 7, 1]


def random_qkv(lengths: list[int], num_heads: int = 2, head_dim: int = 4, seed: int = 0):
    """Float64 queries, keys, values `[batch, heads, max(lengths), head_dim]` and the key mask of right-padded rows."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), num_heads, max(lengths), head_dim)
    query, key, value = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    key_mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return query, key, value, key_mask


def dense_reference(query, key, value, window: int, key_mask, num_global: int) -> torch.Tensor:
    """The definition: softmax over the allowed keys of the whole `[length, length]` score matrix."""
    length = query.shape[2]
    positions = torch.arange(length)
    allowed = (positions[:, None] - positions[None, :]).abs() <= window
    allowed = allowed | (positions[None, :] < num_global) | (positions[:, None] < num_global)
    allowed = allowed[None, None] & key_mask[:, None, None, :]
    scores = torch.matmul(query, key.transpose(-2, -1)) * query.shape[-1] ** -0.5
    # The lowest finite value rather than -inf, so that padded queries without a key give no NaN (nor NaN gradients).
    weights = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    return torch.matmul(weights, value).transpose(1, 2)


@pytest.mark.parametrize(("window", "num_global"), [(1, 0), (2, 0), (3, 2), (5, 1), (12, 0), (40, 3), (2, 20)])
def test_local_attention_equals_the_dense_masked_reference_with_gradients(window, num_global):
    query, key, value, key_mask = random_qkv(LENGTHS)
    real = key_mask.transpose(0, 1)  # [length, batch]: the output rows of real events
    inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    references = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    output = local_attention(*inputs, window, key_mask, num_global)
    expected = dense_reference(*references, window, key_mask, num_global)
    assert output.shape == expected.shape == (len(LENGTHS), max(LENGTHS), 2, 4)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output[real.T], expected[real.T], rtol=1e-12, atol=1e-12)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (output * weights)[real.T].sum().backward()
    (expected * weights)[real.T].sum().backward()
    for ours, theirs in zip(inputs, references, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_padded_keys_get_no_gradient_and_padding_content_changes_nothing():
    query, key, value, key_mask = random_qkv(LENGTHS)
    output = local_attention(query, key, value, 2, key_mask, 1)
    # Other values at padded positions (of the size of real ones: the additive mask is finite, as in the model).
    garbage = torch.randn(query.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 10
    padded = ~key_mask[:, None, :, None]
    noisy = [torch.where(padded, garbage, tensor) for tensor in (query, key, value)]
    real = key_mask
    torch.testing.assert_close(local_attention(*noisy, 2, key_mask, 1)[real], output[real], rtol=0, atol=1e-12)
    value = value.clone().requires_grad_()
    local_attention(query, key, value, 2, key_mask, 1)[real].sum().backward()
    assert torch.all(value.grad.transpose(1, 2)[~key_mask] == 0)


def test_blocks_stay_the_size_of_the_window_whatever_the_length():
    """O(length × window): every call of the exact attention sees at most window + 2·window + g keys per query."""
    window, num_global, length = 8, 2, 1000
    query, key, value, key_mask = random_qkv([length, 600], head_dim=2)
    mask_elements = []

    def recording_attention(query, key, value, mask):
        mask_elements.append(mask.numel())
        assert key.shape[2] <= num_global + 3 * window or query.shape[2] == num_global
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)

    local_attention(query, key, value, window, key_mask, num_global, attention=recording_attention)
    assert len(mask_elements) == 2  # the blocks, then the global queries
    batch_size = 2
    assert mask_elements[0] <= batch_size * (length + window) * (num_global + 3 * window)
    assert mask_elements[1] == batch_size * length


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_module_output_equals_the_functional_call(attn_implementation):
    config = tiny_config("local", local_window=3, local_num_global=1)
    config._attn_implementation = attn_implementation
    layer = TxFormerLocalAttention(config, layer_idx=0).eval()
    hidden_states = torch.randn(3, 11, config.hidden_size, generator=torch.Generator().manual_seed(0))
    key_mask = torch.arange(11)[None, :] < torch.tensor([11, 6, 2])[:, None]
    length = hidden_states.shape[1]
    head_dim = config.hidden_size // config.num_attention_heads
    angles = torch.arange(length)[:, None] * 10000 ** (-torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.cat([angles, angles], dim=-1)[None, None]
    cos, sin = angles.cos(), angles.sin()
    output, weights, state = layer(hidden_states, None, key_mask, position_embeddings=(cos, sin))
    query, key, value = layer.project(hidden_states)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    expected = local_attention(query, key, value, 3, key_mask, 1)
    expected = layer.o_proj(expected.reshape(hidden_states.shape))
    torch.testing.assert_close(output[key_mask], expected[key_mask], rtol=1e-5, atol=1e-6)
    assert weights is None and state is None


def test_a_window_covering_the_history_is_full_attention():
    """Local attention has the same weights as full attention; with a window as long as the history, the models agree."""
    # Large initial weights, so that what each event attends to shows in the outputs.
    settings = dict(local_num_global=0, initializer_range=0.5)
    torch.manual_seed(0)
    full_model = TxFormerForSequenceClassification(tiny_config("full", **settings)).eval()
    batch = random_batch(full_model.config, [12, 5, 9])
    with torch.no_grad():
        expected = full_model.txformer(**batch).last_hidden_state
        for window, agrees in ((16, True), (11, True), (1, False)):
            local_model = TxFormerForSequenceClassification(tiny_config("local", local_window=window, **settings))
            local_model.load_state_dict(full_model.state_dict())
            hidden = local_model.eval().txformer(**batch).last_hidden_state
            assert torch.allclose(hidden, expected, rtol=1e-5, atol=1e-5) == agrees, window


@pytest.mark.parametrize(
    ("overrides", "message"), [({"local_window": 0}, "local_window"), ({"local_num_global": -1}, "local_num_global")]
)
def test_invalid_settings_are_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TxFormerConfig(attention_type="local", **overrides)


@pytest.mark.parametrize("attn_implementation", ["flex_attention", "flash_attention_2"])
def test_backends_without_block_masks_are_refused_by_name(attn_implementation):
    config = tiny_config("local")
    config._attn_implementation = attn_implementation
    layer = TxFormerLocalAttention(config, layer_idx=0)
    hidden_states = torch.randn(1, 5, config.hidden_size)
    with pytest.raises(ValueError, match=f"not '{attn_implementation}'"):
        layer(hidden_states, None, torch.ones(1, 5, dtype=torch.bool))


def test_the_functional_core_refuses_cross_attention():
    query, key, value, key_mask = random_qkv([6])
    with pytest.raises(ValueError, match="self-attention"):
        local_attention(query, key[:, :, :4], value[:, :, :4], 2, key_mask)
