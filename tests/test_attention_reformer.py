"""Reformer LSH attention: the functional core against transformers' `LSHSelfAttention` with the same rotations
(float64, values and gradients), against shared-QK exact attention when one chunk holds the history, exact padding,
O(length × chunk) scores, the module against the core, the rotations buffer and its per-step rehash, and bad
settings."""

import pytest
import torch
from conftest import random_batch, tiny_config
from transformers import ReformerConfig, TrainerControl, TrainerState
from transformers.models.reformer.modeling_reformer import LSHSelfAttention

from txformer import TxFormerConfig, TxFormerForSequenceClassification
from txformer.attention_full import apply_rotary_pos_emb
from txformer.attention_reformer import TxFormerReformerAttention, draw_rotations, hash_buckets, lsh_attention
from txformer.callbacks import AttentionStepCallback


# The Reformer's fields in the tiny config of every test (`conftest.tiny_config`): chunks shorter than the test
# histories, two rounds of four buckets.
TINY_SETTINGS = {"lsh_num_hashes": 2, "lsh_num_buckets": 4, "lsh_chunk_length": 4}
HASH_SEED = 5


def transformers_lsh(num_heads: int, head_dim: int, num_hashes: int, num_buckets: int, chunk_length: int):
    """transformers' `LSHSelfAttention` in float64 (evaluation, no dropout), its rotations drawn under `HASH_SEED`,
    and those rotations (`torch.manual_seed(hash_seed)`, then `torch.randn` of `[heads, d, hashes, buckets / 2]` in
    the dtype of the vectors: what it draws before hashing)."""
    config = ReformerConfig(
        hidden_size=num_heads * head_dim,
        num_attention_heads=num_heads,
        attention_head_size=head_dim,
        num_hashes=num_hashes,
        num_buckets=num_buckets,
        lsh_attn_chunk_length=chunk_length,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        lsh_attention_probs_dropout_prob=0.0,
        is_decoder=False,
        hash_seed=HASH_SEED,
    )
    torch.manual_seed(0)
    attention = LSHSelfAttention(config).double().eval()
    torch.manual_seed(HASH_SEED)
    rotations = torch.randn(num_heads, head_dim, num_hashes, num_buckets // 2, dtype=torch.float64)
    return attention, rotations


def split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch_size, length, hidden_size = states.shape
    return states.view(batch_size, length, num_heads, hidden_size // num_heads).transpose(1, 2)


def ours_on_transformers_weights(attention: LSHSelfAttention, hidden_states, rotations, chunk_length, key_mask=None):
    """`lsh_attention` on the shared vectors and values of transformers' projections, heads merged."""
    num_heads = attention.num_attention_heads
    shared = split_heads(attention.query_key(hidden_states), num_heads)
    value = split_heads(attention.value(hidden_states), num_heads)
    return lsh_attention(shared, value, rotations, chunk_length, key_mask).flatten(2)


# (heads, head_dim, hashes, buckets, chunk, length): several chunks per round, one round, more rounds than chunks,
# and histories no longer than a chunk (transformers' unhashed path).
SHAPES = [(2, 8, 2, 4, 8, 32), (2, 8, 3, 8, 16, 64), (4, 4, 4, 6, 4, 48), (2, 8, 1, 4, 8, 40), (2, 8, 2, 4, 16, 12)]


@pytest.mark.parametrize(("num_heads", "head_dim", "num_hashes", "num_buckets", "chunk_length", "length"), SHAPES)
def test_lsh_attention_reproduces_transformers_lsh_self_attention_with_gradients(
    num_heads, head_dim, num_hashes, num_buckets, chunk_length, length
):
    attention, rotations = transformers_lsh(num_heads, head_dim, num_hashes, num_buckets, chunk_length)
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(3, length, num_heads * head_dim, generator=generator, dtype=torch.float64)
    theirs_input, ours_input = hidden_states.clone().requires_grad_(), hidden_states.clone().requires_grad_()
    theirs = attention(theirs_input).hidden_states
    ours = ours_on_transformers_weights(attention, ours_input, rotations, chunk_length)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    weights = torch.randn(ours.shape, generator=generator, dtype=torch.float64)
    (theirs * weights).sum().backward()
    (ours * weights).sum().backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, rtol=1e-10, atol=1e-12)


def test_padded_rows_equal_transformers_on_the_unpadded_history():
    """Chunks are cut from the real events of each round: a padded row gives the output of its real events alone."""
    attention, rotations = transformers_lsh(2, 8, 3, 4, 4)
    lengths, padded_length = [24, 12, 4, 8], 27
    hidden_states = torch.randn(len(lengths), padded_length, 16, generator=torch.Generator().manual_seed(2)).double()
    key_mask = torch.arange(padded_length)[None, :] < torch.tensor(lengths)[:, None]
    ours = ours_on_transformers_weights(attention, hidden_states, rotations, 4, key_mask)
    assert torch.isfinite(ours).all()
    for row, length in enumerate(lengths):
        alone = attention(hidden_states[row : row + 1, :length]).hidden_states[0]
        torch.testing.assert_close(ours[row, :length], alone, rtol=1e-12, atol=1e-12)


def random_shared_and_values(lengths: list[int], num_heads: int = 2, head_dim: int = 4, seed: int = 0):
    """Float64 shared vectors and values `[batch, heads, max(lengths), head_dim]` and the key mask of right-padded
    rows."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), num_heads, max(lengths), head_dim)
    shared, value = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    key_mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return shared, value, key_mask


def test_padding_anywhere_and_its_content_change_no_real_output_and_get_no_gradient():
    shared, value, key_mask = random_shared_and_values([13, 7, 1])
    rotations = draw_rotations(2, 4, 3, 4, torch.Generator().manual_seed(0), dtype=torch.float64)
    output = lsh_attention(shared, value, rotations, 3, key_mask)
    # Every other event padded, the padding holding values of the size of real ones.
    garbage = torch.randn(3, 2, 26, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    spread_mask = torch.zeros(3, 26, dtype=torch.bool)
    spread_mask[:, ::2] = key_mask
    spread = [garbage.clone(), -garbage]
    for states, source in zip(spread, (shared, value), strict=True):
        states[:, :, ::2] = source
    spread_output = lsh_attention(*spread, rotations, 3, spread_mask)
    torch.testing.assert_close(spread_output[spread_mask], output[key_mask], rtol=0, atol=1e-12)
    assert torch.isfinite(spread_output).all()
    value = value.clone().requires_grad_()
    lsh_attention(shared, value, rotations, 3, key_mask)[key_mask].sum().backward()
    assert torch.all(value.grad.transpose(1, 2)[~key_mask] == 0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_with_padding_several_rounds_and_dropout(dropout):
    """The written-out backward of the chunks (scores, weights, the rounds' log-sum-exp) against finite differences."""
    shared, value, key_mask = random_shared_and_values([7, 4], head_dim=3)
    rotations = draw_rotations(2, 3, 2, 4, torch.Generator().manual_seed(0), dtype=torch.float64)

    def attention(shared: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout at every call
        return lsh_attention(shared, value, rotations, 3, key_mask, dropout)[key_mask]

    assert torch.autograd.gradcheck(attention, (shared.requires_grad_(), value.requires_grad_()))


def shared_qk_exact_attention(shared: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The definition when every event is in reach: softmax over the other real events of `q · k / ‖k‖` (the event
    itself only when it is alone), `[batch, length, heads, d]`."""
    keys = shared / shared.pow(2).sum(dim=-1, keepdim=True).add(shared.shape[-1] * 1e-6).sqrt()
    scores = torch.matmul(shared, keys.transpose(-1, -2))
    alone = key_mask.sum(dim=-1) == 1
    others = key_mask[:, None, None, :] & ~torch.eye(shared.shape[2], dtype=torch.bool)
    allowed = torch.where(alone[:, None, None, None], key_mask[:, None, None, :], others)
    weights = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)
    return torch.matmul(weights, value).transpose(1, 2)


@pytest.mark.parametrize("num_hashes", [1, 3])
def test_one_chunk_holding_the_history_is_exact_shared_qk_attention_without_self(num_hashes):
    shared, value, key_mask = random_shared_and_values([9, 5, 1])
    rotations = draw_rotations(2, 4, num_hashes, 6, torch.Generator().manual_seed(0), dtype=torch.float64)
    output = lsh_attention(shared, value, rotations, 9, key_mask)
    expected = shared_qk_exact_attention(shared, value, key_mask)
    torch.testing.assert_close(output[key_mask], expected[key_mask], rtol=1e-12, atol=1e-12)
    # The event alone in its history attends to itself.
    torch.testing.assert_close(output[2, 0], value[2, :, 0], rtol=1e-12, atol=1e-12)


def test_scores_stay_the_size_of_two_chunks_per_event_whatever_the_length(monkeypatch):
    """O(length × chunk): the score matrix holds 2 × chunk_length keys per event and round."""
    shared, value, key_mask = random_shared_and_values([1000, 700], head_dim=2)
    rotations = draw_rotations(2, 2, 3, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    products, matmul = [], torch.matmul

    def recording_matmul(left, right, **kwargs):
        products.append(left.shape[-2] * right.shape[-1] * left.shape[:-2].numel())
        return matmul(left, right, **kwargs)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    lsh_attention(shared, value, rotations, 8, key_mask)
    batch_heads_rounds = 2 * 2 * 3
    assert len(products) == 2  # the scores, then the weighted values
    assert products[0] == batch_heads_rounds * 1000 * 2 * 8


def test_buckets_are_the_argmax_of_the_rotated_vector_and_its_opposite_and_padding_gets_the_last():
    shared, _, key_mask = random_shared_and_values([6, 3])
    rotations = draw_rotations(2, 4, 2, 6, torch.Generator().manual_seed(0), dtype=torch.float64)
    buckets = hash_buckets(shared, rotations, key_mask)
    assert buckets.shape == (2, 2, 2, 6)
    rotated = torch.einsum("bhld,hdrk->bhrlk", shared, rotations)
    expected = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    real = key_mask[:, None, None, :].expand_as(buckets)
    assert torch.equal(buckets[real], expected[real])
    assert torch.all(buckets[~real] == 6)


def test_module_output_equals_the_functional_call_on_the_rotated_shared_vectors():
    config = tiny_config("reformer")
    layer = TxFormerReformerAttention(config, layer_idx=0).eval()
    assert not hasattr(layer, "k_proj")  # shared QK: no key projection
    hidden_states = torch.randn(3, 11, config.hidden_size, generator=torch.Generator().manual_seed(0))
    key_mask = torch.arange(11)[None, :] < torch.tensor([11, 6, 2])[:, None]
    head_dim = config.hidden_size // config.num_attention_heads
    angles = torch.arange(11)[:, None] * 10000 ** (-torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.cat([angles, angles], dim=-1)[None, None]
    cos, sin = angles.cos(), angles.sin()
    output, weights, state = layer(hidden_states, None, key_mask, position_embeddings=(cos, sin))
    shared = layer.split_heads(layer.q_proj(hidden_states))
    rotated, _ = apply_rotary_pos_emb(shared, shared, cos, sin)
    value = layer.split_heads(layer.v_proj(hidden_states))
    expected = lsh_attention(rotated, value, layer.rotations, config.lsh_chunk_length, key_mask)
    expected = layer.o_proj(expected.reshape(hidden_states.shape))
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert weights is None and state is None


def test_rotations_are_a_persistent_float32_buffer_redrawn_at_every_step_in_training_only():
    config = tiny_config("reformer", lsh_seed=3)
    layer = TxFormerReformerAttention(config, layer_idx=1)
    assert layer.rotations.shape == (2, 8, 2, 2) and layer.rotations.dtype == torch.float32
    assert "rotations" in layer.state_dict()
    assert torch.equal(layer.rotations, layer.draw_rotations(0))
    assert not torch.equal(layer.rotations, TxFormerReformerAttention(config, layer_idx=0).rotations)
    layer.train()
    drawn = []
    for step in (1, 2, 3):
        layer.begin_optimizer_step(step)
        drawn.append(layer.rotations.clone())
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])
    replica = TxFormerReformerAttention(config, layer_idx=1).train()  # another process of a distributed run
    replica.begin_optimizer_step(2)
    assert torch.equal(replica.rotations, drawn[1])
    layer.eval()
    layer.begin_optimizer_step(4)
    assert torch.equal(layer.rotations, drawn[2])


def test_step_callback_rehashes_every_reformer_layer_and_a_saved_model_keeps_its_rotations(tmp_path):
    config = tiny_config("reformer")
    model = TxFormerForSequenceClassification(config).train()
    AttentionStepCallback().on_step_begin(None, TrainerState(global_step=7), TrainerControl(), model=model)
    layers = [module for module in model.modules() if isinstance(module, TxFormerReformerAttention)]
    assert len(layers) == config.num_hidden_layers
    assert all(torch.equal(layer.rotations, layer.draw_rotations(7)) for layer in layers)
    model.eval()
    batch = random_batch(config, [10, 5])
    logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = TxFormerForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=0)
    assert all(
        torch.equal(module.rotations, layer.rotations)
        for module, layer in zip(loaded.modules(), model.modules(), strict=True)
        if isinstance(module, TxFormerReformerAttention)
    )


def test_reset_buffers_draws_the_step_zero_rotations_after_meta_device_init():
    config = tiny_config("reformer")
    with torch.device("meta"):
        layer = TxFormerReformerAttention(config, layer_idx=1)
    assert layer.rotations.is_meta
    layer.to_empty(device="cpu")
    layer.reset_buffers()
    assert torch.equal(layer.rotations, layer.draw_rotations(0))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lsh_num_hashes": 0}, "lsh_num_hashes"),
        ({"lsh_num_buckets": 5}, "lsh_num_buckets"),
        ({"lsh_num_buckets": 0}, "lsh_num_buckets"),
        ({"lsh_chunk_length": 0}, "lsh_chunk_length"),
    ],
)
def test_invalid_settings_are_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TxFormerConfig(attention_type="reformer", **overrides)


def test_the_functional_core_refuses_values_of_another_shape():
    shared, value, key_mask = random_shared_and_values([6])
    rotations = draw_rotations(2, 4, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not match"):
        lsh_attention(shared, value[:, :, :4], rotations, 2, key_mask)
    with pytest.raises(ValueError, match="chunk_length"):
        lsh_attention(shared, value, rotations, 0, key_mask)
