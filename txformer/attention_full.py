"""Exact softmax attention (SDPA, eager, flex or flash), and the interface every attention kind implements: the
projection layer whose hooks a kind overrides (`TxFormerSelfAttention`) and the description generic code reads
(`AttentionKind`).

A kind is one module, `attention_<kind>.py`: its functional core, its layer (a subclass of `TxFormerSelfAttention`),
its config fields (a dataclass mixed into `TxFormerConfig`) and its `AttentionKind`, registered by one line in
`ATTENTION_KINDS` (`configuration_txformer.py`). `docs/adding_an_attention_kind.md` is the recipe.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


if TYPE_CHECKING:
    from .configuration_txformer import TxFormerConfig


# Every backend of exact attention: transformers' attention interface and masking utilities take each of them.
EXACT_ATTENTION_BACKENDS = ("sdpa", "eager", "flex_attention", "flash_attention_2")


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax attention. `query`/`key`/`value`: `[batch, heads, length, head_dim]`; `attention_mask` is
    additive and broadcastable to `[batch, heads, query_length, key_length]`. Returns `[batch, length, heads, head_dim]`
    and the attention weights."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def build_attention_mask(
    config: "TxFormerConfig", hidden_states: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor | BlockMask | None:
    """The mask of padded keys in the form `config._attn_implementation` takes, from transformers' masking utilities.
    `hidden_states`: `[batch, length, hidden]`; `key_mask`: `[batch, length]`, True = real event.

    SDPA (boolean) and eager (additive) get one row `[batch, 1, 1, length]` broadcast over the queries (SDPA would
    turn a `[batch, 1, length, length]` mask into a float tensor of that size), or None without padding; flex attention
    a `BlockMask` over every query; flash attention the `[batch, length]` mask it unpads the batch by, or None."""
    # `create_bidirectional_mask` takes the number of query rows from the states it is given.
    query_rows = hidden_states if config._attn_implementation == "flex_attention" else hidden_states[:, :1]
    return create_bidirectional_mask(config, query_rows, key_mask)


def rotate_half(states: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension (the rotation by 90° of each rotary pair)."""
    first, second = states.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (Su et al., RoFormer) of `query`/`key` `[batch, heads, length, head_dim]` with
    `cos`/`sin` broadcastable to them. The product of a rotated query and key depends only on their distance, so it
    works unchanged in front of any kernel: SDPA, FAVOR+ features, the ∞-former's short-term attention."""
    cos, sin = cos.to(query.dtype), sin.to(query.dtype)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


@dataclass(frozen=True)
class Streaming:
    """How the model reads histories in segments for a kind whose layers carry a state from one segment, or one call,
    to the next (each layer takes it as `past_state` and returns the next one).

    Args:
        segment_length: events per segment, from the config.
        detach_state: whether the state carried between segments is detached (training memory bounded by one
            segment), from the config.
        state_class: the dataclass of one layer's state: tensors with the batch first (or None), and `detach()`.
    """

    segment_length: Callable[[Any], int]
    detach_state: Callable[[Any], bool]
    state_class: type


@dataclass(frozen=True)
class AttentionKind:
    """What generic code (the config, the model, cards, callbacks, benchmarks, shared tests) knows of an attention
    kind. Each kind's module defines one; `ATTENTION_KINDS` in `configuration_txformer.py` registers it.

    Args:
        name: its `config.attention_type`.
        attention_class: its layer, a subclass of [`TxFormerSelfAttention`]; the kind's behaviour lives in the hooks
            it overrides (`attend` or `forward`, `reset_buffers`, `begin_optimizer_step`, `auxiliary_loss`).
        label: a few words for tables and plots.
        summary: one sentence for model cards.
        hub_tag: the tag of its models on the Hub.
        settings: a dataclass of its config fields, with defaults, mixed into `TxFormerConfig` (None: no fields).
        validate_settings: raises a `ValueError` for invalid values of those fields; the config calls it.
        attn_implementations: the `attn_implementation` backends its layer computes exact attention with (empty: it
            uses none, and `attn_implementation` has no effect on it).
        attention_weights: the backends under which its layer returns attention weights `[batch, heads, length,
            length]` (`output_attentions=True`); under any other, and for a kind without such weights (empty), the
            model warns and returns `attentions=None`. A streaming kind has none (its layers see one segment).
        time_exponent: how its time grows with the history length (2: quadratic, 1: linear), for benchmark budgets.
        streaming: how the model reads a history in parts when the layers carry a state (None: in one pass).
    """

    name: str
    attention_class: type["TxFormerSelfAttention"]
    label: str
    summary: str
    hub_tag: str
    settings: type | None = None
    validate_settings: Callable[[Any], None] | None = None
    attn_implementations: tuple[str, ...] = ()
    attention_weights: tuple[str, ...] = ()
    time_exponent: int = 1
    streaming: Streaming | None = None

    def __post_init__(self):
        if self.streaming is not None and self.attention_weights:
            raise ValueError(
                f"Attention kind {self.name!r} reads histories in segments (streaming), so it cannot return attention "
                "weights over the whole history: attention_weights must be empty."
            )


class Float32BuffersMixin(nn.Module):
    """Keeps the buffers named in `float32_buffers` in float32 (and those in `float64_buffers` in float64) when the
    module is cast (`model.to(torch.bfloat16)`, `.half()`): they hold constants (frequencies, bases, random
    projections, ill-conditioned systems) that a 16-bit rounding would distort. Create them with their dtype given:
    `from_pretrained(..., dtype=...)` builds the model under that default."""

    float32_buffers: tuple[str, ...] = ()
    float64_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        pinned = {name: torch.float32 for name in self.float32_buffers}
        pinned.update({name: torch.float64 for name in self.float64_buffers})
        originals = {name: self._buffers[name] for name in pinned}
        module = super()._apply(fn, recurse)
        for name, dtype in pinned.items():
            moved = self._buffers[name]
            if moved.dtype != dtype:
                self._buffers[name] = originals[name].to(device=moved.device, dtype=dtype)
        return module


class TxFormerSelfAttention(Float32BuffersMixin):
    """Multi-head self-attention over events, and the interface of every attention kind. Owns the
    query/key/value/output projections; `attend` is the core that each kind replaces (here: exact attention
    dispatched by `config._attn_implementation`), and the hooks below are what a kind adds (here: nothing)."""

    def __init__(self, config: "TxFormerConfig", layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """`[batch, length, hidden]` -> `[batch, heads, length, head_dim]`."""
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value `[batch, heads, length, head_dim]` of `hidden_states` `[batch, length, hidden]`."""
        query = self.split_heads(self.q_proj(hidden_states))
        key = self.split_heads(self.k_proj(hidden_states))
        value = self.split_heads(self.v_proj(hidden_states))
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | BlockMask | None,
        key_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_state: None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """Attend over `hidden_states` `[batch, length, hidden]`. `attention_mask` is the key mask of exact attention
        in the form of its backend (`build_attention_mask`), `key_mask` the boolean `[batch, length]` mask (True =
        real event) used by the other kinds, `position_embeddings` the rotary `(cos, sin)` (None: no order signal).
        Returns the output, the weights (eager only) and the state carried to the next segment (stateless kinds:
        None)."""
        query, key, value = self.project(hidden_states)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        attn_output, attn_weights = self.attend(query, key, value, attention_mask, key_mask, **kwargs)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights, None

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | BlockMask | None,
        key_mask: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exact attention: `[batch, heads, length, head_dim]` inputs -> `[batch, length, heads, head_dim]`."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

    def reset_buffers(self) -> None:
        """Fill the buffers the kind derives from the config (random projections, fixed bases), on whatever device
        they live and leaving loaded ones alone (`transformers.initialization` semantics); `_init_weights` calls it.
        Exact attention has none."""

    def begin_optimizer_step(self, step: int) -> None:
        """Called in training before the first forward pass of optimizer step `step`, for state a kind refreshes
        during training (the Performer redraws its projection). What it does must depend only on the config and
        `step`, so that every process of a distributed run does the same without communicating. Exact attention:
        nothing."""

    def auxiliary_loss(self, state: Any) -> torch.Tensor | None:
        """The weighted regularisation term this layer adds to the training loss, from the state it returned (None:
        none). Exact attention: none."""
        return None


FULL_ATTENTION = AttentionKind(
    name="full",
    attention_class=TxFormerSelfAttention,
    label="exact",
    summary="exact softmax attention over every kept event (memory grows with the square of the history length); "
    'the backend is chosen when loading: `attn_implementation="sdpa"`, `"eager"`, `"flex_attention"` or '
    '`"flash_attention_2"`.',
    hub_tag="full-attention",
    attn_implementations=EXACT_ATTENTION_BACKENDS,
    attention_weights=("eager",),
    time_exponent=2,
)
