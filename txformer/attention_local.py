"""Sliding-window (local) attention: each event attends to the `local_window` events before and after it and,
optionally, to the first `local_num_global` events of its history, which attend to every event (Longformer's
symmetric global attention; Beltagy et al., "Longformer: The Long-Document Transformer", 2020).

Layout: the functional core (`local_attention`, computed in blocks so that time and memory grow as length × window,
not length²), the config fields (`LocalSettings`), the module (`TxFormerLocalAttention`) and the kind's entry
(`LOCAL_ATTENTION`). Measurements: `docs/local_attention.md`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention_full import AttentionKind, TxFormerSelfAttention


if TYPE_CHECKING:
    from .configuration_txformer import TxFormerConfig


# Additive mask value of the blocks: exp() of it is 0 in every float dtype, and it is finite in float16 (unlike
# finfo(float32).min), so a padded query without a real key in its window gets a finite row, not NaN.
MASK_VALUE = -65504.0
# The exact-attention backends that take the blocks' additive `[n, 1, q, k]` mask.
BLOCK_BACKENDS = ("sdpa", "eager")


def sdpa_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact attention of a batch of blocks through `scaled_dot_product_attention`: `[n, heads, q, d]` inputs and an
    additive `[n, 1, q, k]` mask -> `[n, q, heads, d]`."""
    return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


def local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    key_mask: torch.Tensor | None = None,
    num_global: int = 0,
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = sdpa_blocks,
) -> torch.Tensor:
    """Sliding-window self-attention with optional global events, in O(length × window) time and memory.

    Query i attends to the keys j with |i − j| <= `window` and, with `num_global` = g > 0, to the keys j < g; the
    queries i < g attend to every key. Keys where `key_mask` is False are never attended to.

    The queries are cut into blocks of `window` positions; a block attends to its own keys, the `window` keys on each
    side and the g global keys, under an additive band mask, in one call of `attention` over every block at once. The
    g global queries attend to all keys in one more call.

    Args:
        query, key, value: `[batch, heads, length, head_dim]`, one length (self-attention); softmax scale
            `head_dim ** -0.5`, or that of `attention`.
        window: w >= 0, the keys on each side of a query (2w + 1 in all, itself included).
        key_mask: bool `[batch, length]`, True = real event. Output rows of padded queries are finite but meaningless.
        num_global: g >= 0, the leading events that every event attends to and that attend to every event.
        attention: exact attention over a batch of blocks, `attention(query, key, value, mask)` with
            `[n, heads, q, d]` inputs and an additive mask `[n, 1, q, k]`, returning `[n, q, heads, d]` (default:
            `sdpa_blocks`; the module passes its `attn_implementation`).

    Returns:
        `[batch, length, heads, head_dim]`, the layout of transformers' attention functions.
    """
    batch_size, num_heads, length, head_dim = query.shape
    if key.shape[2] != length or value.shape[2] != length:
        raise ValueError(
            f"local_attention is self-attention: query, key and value lengths {length}, {key.shape[2]}, "
            f"{value.shape[2]} differ."
        )
    if window < 0 or num_global < 0:
        raise ValueError(f"window and num_global must be >= 0, got {window} and {num_global}.")
    if key_mask is None:
        key_mask = torch.ones(batch_size, length, dtype=torch.bool, device=query.device)
    key_mask = key_mask.bool()
    window = min(window, max(length - 1, 0))
    num_global = min(num_global, length)
    block = max(window, 1)
    num_blocks = math.ceil(length / block)
    padding = num_blocks * block - length
    # Keys of block n: positions n·block − window ... (n + 1)·block + window − 1.
    span = block + 2 * window

    def query_blocks(states: torch.Tensor) -> torch.Tensor:
        states = nn.functional.pad(states, (0, 0, 0, padding))
        blocks = states.view(batch_size, num_heads, num_blocks, block, head_dim).transpose(1, 2)
        return blocks.reshape(batch_size * num_blocks, num_heads, block, head_dim)

    def key_blocks(states: torch.Tensor) -> torch.Tensor:
        blocks = nn.functional.pad(states, (0, 0, window, padding + window)).unfold(2, span, block)
        blocks = blocks.permute(0, 2, 1, 4, 3).reshape(batch_size * num_blocks, num_heads, span, head_dim)
        if num_global == 0:
            return blocks
        global_states = states[:, None, :, :num_global].expand(batch_size, num_blocks, -1, -1, -1)
        return torch.cat([global_states.reshape(batch_size * num_blocks, num_heads, num_global, head_dim), blocks], 2)

    device = query.device
    query_positions = torch.arange(num_blocks * block, device=device).view(num_blocks, block)
    key_positions = torch.arange(-window, num_blocks * block + window, device=device).unfold(0, span, block)
    distances = key_positions[:, None, :] - query_positions[:, :, None]
    # The global keys are attended to through their own columns, not again inside a band.
    in_band = (distances.abs() <= window) & (key_positions[:, None, :] >= num_global)
    real_keys = nn.functional.pad(key_mask, (window, padding + window), value=False).unfold(1, span, block)
    allowed = in_band[None] & real_keys[:, :, None, :]
    if num_global > 0:
        global_keys = key_mask[:, None, None, :num_global].expand(-1, num_blocks, block, -1)
        allowed = torch.cat([global_keys, allowed], dim=-1)
    block_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=device).masked_fill_(~allowed, MASK_VALUE)
    block_mask = block_mask.view(batch_size * num_blocks, 1, block, -1)
    output = attention(query_blocks(query), key_blocks(key), key_blocks(value), block_mask)
    output = output.reshape(batch_size, num_blocks * block, num_heads, head_dim)[:, :length]
    if num_global == 0:
        return output
    global_mask = torch.zeros(key_mask.shape, dtype=query.dtype, device=device).masked_fill_(~key_mask, MASK_VALUE)
    global_output = attention(query[:, :, :num_global], key, value, global_mask[:, None, None, :])
    return torch.cat([global_output, output[:, num_global:]], dim=1)


@dataclass(kw_only=True)
class LocalSettings:
    """Config fields of `attention_type="local"`.

    Args:
        local_window: the events each event attends to on each side (2 × local_window + 1 in all, itself included).
        local_num_global: the first events of each history, which attend to every event and which every event attends
            to (0 = none).
    """

    local_window: int = 128
    local_num_global: int = 0


def validate_local_settings(config: LocalSettings) -> None:
    """Raises a `ValueError` for invalid sliding-window fields."""
    if config.local_window < 1:
        raise ValueError(f"local_window must be positive, got {config.local_window}.")
    if config.local_num_global < 0:
        raise ValueError(f"local_num_global must be >= 0 (0 = none), got {config.local_num_global}.")


class TxFormerLocalAttention(TxFormerSelfAttention):
    """Sliding-window self-attention: the shared projections (and rotary positions) around `local_attention`, whose
    blocks go through the exact attention of `attn_implementation`, SDPA or eager (attention dropout applies); flex
    and flash attention take masks of other forms and are refused."""

    def __init__(self, config: "TxFormerConfig", layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = config.local_window
        self.num_global = config.local_num_global

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_mask: torch.Tensor,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Sliding-window attention: `[batch, heads, length, head_dim]` inputs -> `[batch, length, heads, head_dim]`,
        no weights (they are per block). The exact-attention `attention_mask` is not used (`key_mask` is)."""
        if self.config._attn_implementation not in BLOCK_BACKENDS:
            raise ValueError(
                f"attention_type='local' computes its blocks with attn_implementation {list(BLOCK_BACKENDS)}, not "
                f"{self.config._attn_implementation!r}."
            )
        exact_attention = super().attend

        def attend_blocks(
            query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
        ) -> torch.Tensor:
            return exact_attention(query, key, value, mask, None, **kwargs)[0]

        output = local_attention(query, key, value, self.window, key_mask, self.num_global, attention=attend_blocks)
        return output, None


LOCAL_ATTENTION = AttentionKind(
    name="local",
    attention_class=TxFormerLocalAttention,
    label="sliding window",
    summary="sliding-window attention: each event attends to the `local_window` events before and after it (and to "
    "the first `local_num_global` events, which attend to all), in time and memory linear in the history length.",
    hub_tag="local-attention",
    settings=LocalSettings,
    validate_settings=validate_local_settings,
    attn_implementations=BLOCK_BACKENDS,
)


__all__ = ["LOCAL_ATTENTION", "LocalSettings", "TxFormerLocalAttention", "local_attention", "sdpa_blocks"]
