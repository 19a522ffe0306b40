"""Reformer LSH attention: shared-QK attention within chunks of events sorted by angular locality-sensitive hash,
over several hashing rounds (Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020).

Layout: the functional core (`draw_rotations`, `hash_buckets`, `lsh_attention`: time and memory linear in the
length for a fixed chunk length), the config fields (`ReformerSettings`), the module that owns the random rotations
and rehashes at each optimizer step (`TxFormerReformerAttention`) and the kind's entry (`REFORMER_ATTENTION`). The
numerics, and where they depart from transformers' `ReformerModel`, are described in `docs/reformer.md`.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init

from .attention_full import AttentionKind, TxFormerSelfAttention
from .attention_performer import projection_seed


if TYPE_CHECKING:
    from .configuration_txformer import TxFormerConfig


# Scores of masked pairs, those of transformers' `LSHSelfAttention` in float32: finite, so that a row without a real
# key stays finite, and far enough below any real score that exp() of a masked score is exactly 0 next to a real key.
# The event itself (a shared-QK query's best match) is masked less than padding: it is attended to only when its
# chunks hold no other real event.
PADDING_SCORE = -1e9
SELF_SCORE = -1e5
# ε of the key normalisation k / sqrt(mean(k²) + ε) / sqrt(d), as in the Reformer's code and transformers'.
KEY_NORM_EPS = 1e-6


def draw_rotations(
    num_heads: int,
    head_dim: int,
    num_hashes: int,
    num_buckets: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random rotations of the hash, `[heads, head_dim, num_hashes, num_buckets // 2]` i.i.d. N(0, 1) (the layout of
    transformers' `LSHSelfAttention`), drawn on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    shape = (num_heads, head_dim, num_hashes, num_buckets // 2)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def hash_buckets(vectors: torch.Tensor, rotations: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Angular LSH (Andoni et al., 2015): the bucket of each vector in each round is the argmax of `[xR, −xR]`.

    Args:
        vectors: `[batch, heads, length, head_dim]`.
        rotations: `[heads, head_dim, num_hashes, num_buckets // 2]` (`draw_rotations`).
        key_mask: bool `[batch, length]`, True = real event; padded events get the extra bucket `num_buckets`, so
            that sorting puts them after every real event of the round.

    Returns:
        long `[batch, heads, num_hashes, length]` in `[0, num_buckets]`, without gradient. Computed in float32 at
        least, outside autocast, so that a bf16 forward hashes as a float32 one (up to the rounding of `vectors`).
    """
    dtype = torch.promote_types(vectors.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(vectors.device.type, enabled=False):
        rotated = torch.einsum("bhld,hdrk->bhrlk", vectors.to(dtype), rotations.to(dtype))
        buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    if key_mask is not None:
        buckets = buckets.masked_fill(~key_mask.bool()[:, None, None, :], 2 * rotations.shape[-1])
    return buckets


class _ChunkAttentionFunction(torch.autograd.Function):
    """Softmax attention of the queries of each chunk over its keys, returning the output and the log-sum-exp of the
    scores (the weight of the round), with a backward written out: autograd of `logsumexp` and `exp(s − lse)` would
    make and keep several score-sized tensors more.

    Inputs `[..., c, d]` queries, `[..., k, d]` keys and values, bool `padded_keys` `[..., 1, k]` and `is_self`
    `[..., c, k]`, the dropout probability. Masked scores are the constants `PADDING_SCORE` and `SELF_SCORE` (no
    gradient). Computed in float32 at least, outside autocast; the output in the dtype of `value`, the log-sum-exp
    `[..., c, 1]` in the compute dtype.
    """

    @staticmethod
    def forward(ctx, query, key, value, padded_keys, is_self, dropout):
        ctx.input_dtypes, ctx.dropout = (query.dtype, key.dtype, value.dtype), dropout
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            query, key, value = (tensor.to(compute_dtype) for tensor in (query, key, value))
            scores = torch.matmul(query, key.transpose(-1, -2))
            scores.masked_fill_(padded_keys, PADDING_SCORE).masked_fill_(is_self, SELF_SCORE)
            row_max = scores.amax(dim=-1, keepdim=True)
            weights = scores.sub_(row_max).exp_()
            row_sum = weights.sum(dim=-1, keepdim=True)
            weights.div_(row_sum)
            logsumexp = row_sum.log_().add_(row_max)
            kept = None
            if dropout > 0:
                kept = torch.rand_like(weights) >= dropout
                output = torch.matmul(weights * kept / (1 - dropout), value)
            else:
                output = torch.matmul(weights, value)
        ctx.save_for_backward(query, key, value, padded_keys, is_self, weights, output, kept)
        return output.to(ctx.input_dtypes[2]), logsumexp

    @staticmethod
    @once_differentiable
    def backward(ctx, output_grad, logsumexp_grad):
        query, key, value, padded_keys, is_self, weights, output, kept = ctx.saved_tensors
        with torch.autocast(query.device.type, enabled=False):
            output_grad = output_grad.to(output.dtype)
            dropped = weights if kept is None else weights * kept / (1 - ctx.dropout)
            value_grad = torch.matmul(dropped.transpose(-1, -2), output_grad)
            weights_grad = torch.matmul(output_grad, value.transpose(-1, -2))
            if kept is not None:
                weights_grad.mul_(kept).div_(1 - ctx.dropout)
            # d score = p (d p − Σ p d p + d lse), and Σ_j p_j d p_j = output_grad · output (dropout included).
            shift = (output_grad * output).sum(dim=-1, keepdim=True) - logsumexp_grad
            scores_grad = weights_grad.sub_(shift).mul_(weights)
            scores_grad.masked_fill_(padded_keys, 0.0).masked_fill_(is_self, 0.0)
            query_grad = torch.matmul(scores_grad, key)
            key_grad = torch.matmul(scores_grad.transpose(-1, -2), query)
        query_dtype, key_dtype, value_dtype = ctx.input_dtypes
        return query_grad.to(query_dtype), key_grad.to(key_dtype), value_grad.to(value_dtype), None, None, None


def lsh_attention(
    shared: torch.Tensor,
    value: torch.Tensor,
    rotations: torch.Tensor,
    chunk_length: int,
    key_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Reformer LSH self-attention with shared queries and keys, in O(length × chunk_length) time and memory.

    In each hashing round, the events are sorted by bucket (`hash_buckets`; stable: by position within a bucket) and
    the sorted real events are cut into chunks of `chunk_length`. Each chunk attends to itself and to the chunk
    before it; the chunk before a round's first chunk is the last chunk of the previous round (cyclically: round 0
    looks back into the last round). An event attends to itself only where its two chunks hold no other real event.
    Scores are `q · k / ‖k‖` with `k = q` (keys normalised, queries not; the key norm has the ε of `KEY_NORM_EPS`).
    The rounds' outputs are merged with the weights `softmax` over rounds of each round's log-sum-exp of scores.

    With every event real and `length` a multiple of `chunk_length` this is transformers' `LSHSelfAttention`
    (`lsh_num_chunks_before=1`, `lsh_num_chunks_after=0`, not a decoder) given the same rotations. With padding it
    differs by design: chunks are cut from the real events of each round, so a padded event changes no real event's
    output (transformers' chunks also count the padded events of the previous round).

    Args:
        shared: the shared queries and keys, `[batch, heads, length, head_dim]`.
        value: `[batch, heads, length, head_dim]`.
        rotations: `[heads, head_dim, num_hashes, num_buckets // 2]` random rotations of the hash.
        chunk_length: c, the events of a chunk.
        key_mask: bool `[batch, length]`, True = real event (anywhere in the row). Output rows of padded events are
            finite but meaningless.
        dropout: dropout probability of the attention weights (pass 0 in evaluation).

    Returns:
        `[batch, length, heads, head_dim]`, the layout of transformers' attention functions, in the dtype of `value`.
        Scores, weights and the merge of the rounds are computed in float32 at least.
    """
    batch_size, num_heads, length, head_dim = shared.shape
    if value.shape[:3] != shared.shape[:3]:
        raise ValueError(f"lsh_attention: shared {tuple(shared.shape)} and value {tuple(value.shape)} do not match.")
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be positive, got {chunk_length}.")
    if key_mask is None:
        key_mask = torch.ones(batch_size, length, dtype=torch.bool, device=shared.device)
    key_mask = key_mask.bool()
    num_hashes = rotations.shape[2]
    num_chunks = math.ceil(length / chunk_length)
    fill = num_chunks * chunk_length - length
    chunked = (batch_size, num_heads, num_hashes, num_chunks, chunk_length)

    # The sort of each round; real events come first (padding has the last bucket), so slot s is real iff s < n.
    order = torch.sort(hash_buckets(shared, rotations, key_mask), dim=-1, stable=True).indices
    num_real = key_mask.sum(dim=-1)
    real_slots = torch.arange(num_chunks * chunk_length, device=shared.device) < num_real[:, None]
    real_slots = real_slots.view(batch_size, 1, 1, num_chunks, chunk_length).expand(chunked)
    positions = nn.functional.pad(order, (0, fill), value=-1).view(chunked)
    last_real_chunk = (num_real - 1).clamp(min=0) // chunk_length

    def sorted_chunks(states: torch.Tensor) -> torch.Tensor:
        """`[batch, heads, length, d]` -> `[batch, heads, rounds, chunks, chunk_length, d]` in each round's order."""
        index = order.flatten(2)[..., None].expand(-1, -1, -1, states.shape[-1])
        gathered = states.gather(2, index).view(batch_size, num_heads, num_hashes, length, -1)
        return nn.functional.pad(gathered, (0, 0, 0, fill)).view(*chunked, -1)

    def with_previous_chunk(chunks: torch.Tensor) -> torch.Tensor:
        """`[..., rounds, chunks, chunk_length, *rest]` -> `[..., rounds, chunks, 2 * chunk_length, *rest]`: the
        chunk before each chunk, then the chunk; before a round's first chunk, the previous round's last real one."""
        rest = chunks.shape[5:]
        index = last_real_chunk.view(batch_size, 1, 1, 1, 1, *(1 for _ in rest))
        index = index.expand(-1, num_heads, num_hashes, 1, chunk_length, *rest)
        wrapped = chunks.roll(1, dims=2).gather(3, index)
        previous = torch.cat([wrapped, chunks[:, :, :, :-1]], dim=3)
        return torch.cat([previous, chunks], dim=4)

    queries = sorted_chunks(shared)
    keys = queries * torch.rsqrt(queries.pow(2).mean(dim=-1, keepdim=True) + KEY_NORM_EPS) / math.sqrt(head_dim)
    padded_keys = ~with_previous_chunk(real_slots)[..., None, :]
    is_self = positions[..., :, None] == with_previous_chunk(positions)[..., None, :]
    chunk_output, chunk_logsumexp = _ChunkAttentionFunction.apply(
        queries, with_previous_chunk(keys), with_previous_chunk(sorted_chunks(value)), padded_keys, is_self, dropout
    )

    # Back to event order, then the rounds merged with their normalised log-sum-exp weights.
    undo = torch.empty_like(order).scatter_(-1, order, torch.arange(length, device=order.device).expand_as(order))
    sorted_output = chunk_output.flatten(3, 4)[:, :, :, :length]
    output = sorted_output.gather(3, undo[..., None].expand(-1, -1, -1, -1, head_dim))
    logits = chunk_logsumexp.flatten(3, 5)[..., :length].gather(3, undo)
    round_weights = torch.softmax(logits, dim=2)[..., None]
    merged = (output.to(round_weights.dtype) * round_weights).sum(dim=2)
    return merged.transpose(1, 2).to(value.dtype)


@dataclass(kw_only=True)
class ReformerSettings:
    """Config fields of `attention_type="reformer"`.

    Args:
        lsh_num_hashes: hashing rounds; each event attends within its chunks of every round.
        lsh_num_buckets: buckets of the angular hash (even); about 2 × length / lsh_chunk_length suits a length.
        lsh_chunk_length: events of a chunk of the sorted sequence; each event attends to at most
            2 × lsh_chunk_length events per round.
        lsh_seed: base seed of the rotations, redrawn before every optimizer step in training (a draw is a function
            of seed, layer and step).
    """

    lsh_num_hashes: int = 2
    lsh_num_buckets: int = 32
    lsh_chunk_length: int = 64
    lsh_seed: int = 0


def validate_reformer_settings(config: ReformerSettings) -> None:
    """Raises a `ValueError` for invalid LSH fields."""
    if config.lsh_num_hashes < 1:
        raise ValueError(f"lsh_num_hashes must be positive, got {config.lsh_num_hashes}.")
    if config.lsh_num_buckets < 2 or config.lsh_num_buckets % 2 != 0:
        raise ValueError(f"lsh_num_buckets must be even and at least 2, got {config.lsh_num_buckets}.")
    if config.lsh_chunk_length < 1:
        raise ValueError(f"lsh_chunk_length must be positive, got {config.lsh_chunk_length}.")


class TxFormerReformerAttention(TxFormerSelfAttention):
    """Reformer LSH self-attention: shared-QK (the query projection also makes the keys, so there is no key
    projection; rotary positions rotate the shared vectors before hashing) around `lsh_attention`, with the random
    rotations as a persistent float32 buffer, redrawn before every optimizer step in training."""

    float32_buffers = ("rotations",)

    def __init__(self, config: "TxFormerConfig", layer_idx: int):
        super().__init__(config, layer_idx)
        del self.k_proj
        self.chunk_length = config.lsh_chunk_length
        self.seed = config.lsh_seed
        rotations = torch.empty(
            self.num_heads, self.head_dim, config.lsh_num_hashes, config.lsh_num_buckets // 2, dtype=torch.float32
        )
        self.register_buffer("rotations", rotations, persistent=True)
        self.reset_buffers()

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared queries and keys (twice) and the values, `[batch, heads, length, head_dim]`."""
        shared = self.split_heads(self.q_proj(hidden_states))
        return shared, shared, self.split_heads(self.v_proj(hidden_states))

    def draw_rotations(self, step: int) -> torch.Tensor:
        """The rotations of this layer at optimizer step `step`, a function of `(lsh_seed, layer_idx, step)`."""
        generator = torch.Generator(device="cpu").manual_seed(projection_seed(self.seed, self.layer_idx, step))
        num_heads, head_dim, num_hashes, half_buckets = self.rotations.shape
        return draw_rotations(num_heads, head_dim, num_hashes, 2 * half_buckets, generator)

    def reset_buffers(self) -> None:
        """Draw the step-0 rotations into the buffer (a no-op on meta tensors; a loaded buffer is left alone)."""
        init.copy_(self.rotations, self.draw_rotations(step=0).to(self.rotations.device))

    @torch.no_grad()
    def begin_optimizer_step(self, step: int) -> None:
        """Rehash: draw the rotations of optimizer step `step`, in training only; the draw depends only on the seed,
        layer and step, so every process of a distributed run hashes alike."""
        if self.training:
            self.rotations.copy_(self.draw_rotations(step).to(self.rotations.device))

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_mask: torch.Tensor,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """LSH attention over the shared vectors `query` (`key` is the same): `[batch, heads, length, head_dim]`
        inputs -> `[batch, length, heads, head_dim]`, no weights. The exact-attention `attention_mask` is not used
        (`key_mask` is)."""
        dropout = self.attention_dropout if self.training else 0.0
        return lsh_attention(query, value, self.rotations, self.chunk_length, key_mask, dropout), None


REFORMER_ATTENTION = AttentionKind(
    name="reformer",
    attention_class=TxFormerReformerAttention,
    label="LSH",
    summary="Reformer LSH attention: shared-QK attention within chunks of events sorted by a random-rotation hash, "
    "over several hashing rounds, in time and memory linear in the history length.",
    hub_tag="reformer",
    settings=ReformerSettings,
    validate_settings=validate_reformer_settings,
)


__all__ = [
    "REFORMER_ATTENTION",
    "ReformerSettings",
    "TxFormerReformerAttention",
    "draw_rotations",
    "hash_buckets",
    "lsh_attention",
]
