"""Performer (FAVOR+) attention: positive orthogonal random features, linear in the sequence length.

Layout: the pure functional core first (`draw_orthogonal_features`, `favor_attention`), then the config fields
(`PerformerSettings`), the module that owns the projection buffer and its redraw policy (`TxFormerPerformerAttention`)
and the kind's entry (`PERFORMER_ATTENTION`). Reference: Choromanski et al., "Rethinking
Attention with Performers", ICLR 2021. The numerics choices and measurements are described in `docs/performer.md`.
"""

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable
from transformers import initialization as init

from .attention_full import AttentionKind, TxFormerSelfAttention


if TYPE_CHECKING:
    from .configuration_txformer import TxFormerConfig


# δ of the normaliser guard: where |D| <= δ the division uses ±δ. D only gets there when every feature product has
# underflowed (e.g. a row of batch whose keys are all padded); the output stays bounded since the numerator is a sum
# of values with the same non-negative weights as D (|numerator| <= max|value| D). A normal float32 number whose
# inverse, and the backward's g / δ, stay far from float32 overflow.
NORMALIZER_FLOOR = 1e-30
# Additive constant of the generalised ReLU kernel, as in the paper and the public codes.
RELU_KERNEL_EPS = 1e-3
# Additive eps of performer-pytorch 1.1.4's softmax kernel; used only by the compatibility mode.
PERFORMER_PYTORCH_SOFTMAX_EPS = 1e-4
# Work of one chunk, in elements of the `[batch, heads, chunk, features]` feature block (4 MiB in float32): large
# enough to amortise the per-chunk Python overhead, small enough to stay in cache, so that the time per token does not
# grow with the length and the memory beyond inputs and outputs is a few blocks (docs/performer.md has the
# measurements). Chunks keep at least MIN_CHUNK_LENGTH rows, as GEMMs over fewer rows are slow.
CHUNK_NUM_ELEMENTS = 2**20
MIN_CHUNK_LENGTH = 32
KERNELS = ("softmax", "relu")
LOG2_E = math.log2(math.e)


def projection_seed(base_seed: int, layer_idx: int, step: int) -> int:
    """Seed of the projection draw of layer `layer_idx` at optimizer step `step`: a stable hash, equal on every
    process and every run (unlike Python's `hash`), so distributed replicas redraw the same matrix without talking."""
    digest = hashlib.sha256(f"txformer-performer:{base_seed}:{layer_idx}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_orthogonal_features(
    num_features: int,
    head_dim: int,
    scaling: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    orthogonal: bool = True,
) -> torch.Tensor:
    """Random projection `[num_features, head_dim]` for FAVOR+.

    Orthogonal (default): ⌈m/d⌉ independent d×d blocks with orthonormal rows, each `Qᵀ` of the QR decomposition of a
    Gaussian matrix with the Haar fix (columns of Q times sign(diag R), without which QR is not uniformly distributed),
    the last block cut to `m mod d` rows. `orthogonal=False` draws i.i.d. Gaussian rows instead (for comparisons).
    `scaling` 0: row i scaled by the norm of a fresh N(0, I_d) vector (χ_d), so rows are marginally Gaussian and the
    softmax-kernel estimate is unbiased; 1: every row has norm √d. Drawn in float64 on the generator's device, so the
    matrix depends only on the generator state (not on `device`, `dtype`, or an ambient default device).
    """
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 (χ_d row norms) or 1 (row norm √d), got {scaling}.")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    draw = dict(generator=generator, dtype=torch.float64, device=draw_device)
    if orthogonal:
        num_blocks = math.ceil(num_features / head_dim)
        gaussian = torch.randn(num_blocks, head_dim, head_dim, **draw)
        q, r = torch.linalg.qr(gaussian)
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        q = q * torch.where(signs == 0, 1.0, signs)[:, None, :]
        directions = q.transpose(-2, -1).reshape(num_blocks * head_dim, head_dim)[:num_features]
    else:
        directions = torch.randn(num_features, head_dim, **draw)
        directions = directions / directions.norm(dim=-1, keepdim=True)
    if scaling == 0:
        row_norms = torch.randn(num_features, head_dim, **draw).norm(dim=-1)
    else:
        row_norms = directions.new_full((num_features,), math.sqrt(head_dim))
    return (directions * row_norms[:, None]).to(dtype=dtype, device=device)


def _chunk_length(batch_heads: int, num_features: int, length: int) -> int:
    """Rows per (batch, head) in one chunk: a feature block of about `CHUNK_NUM_ELEMENTS` elements."""
    return max(1, min(length, max(MIN_CHUNK_LENGTH, CHUNK_NUM_ELEMENTS // (batch_heads * num_features))))


def _chunks(length: int, chunk_length: int) -> Iterator[slice]:
    """Consecutive slices of at most `chunk_length` positions covering `range(length)`."""
    for start in range(0, length, chunk_length):
        yield slice(start, min(start + chunk_length, length))


def _block_buffer(reference: torch.Tensor, chunk_length: int, num_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat work buffer for one `[batch, heads, chunk_length, m]` block, reused by every chunk of a pass: a fresh
    block per chunk costs the CPU allocator page faults (several MiB per chunk) that are as slow as the GEMMs."""
    batch_size, num_heads = reference.shape[:2]
    return reference.new_empty(batch_size * num_heads * chunk_length * num_features, dtype=dtype)


def _block(buffer: torch.Tensor, reference: torch.Tensor, num_features: int) -> torch.Tensor:
    """The `[batch, heads, chunk, m]` view of a work buffer, for the chunk `reference` `[batch, heads, chunk, ·]`."""
    batch_size, num_heads, chunk = reference.shape[:3]
    return buffer[: batch_size * num_heads * chunk * num_features].view(batch_size, num_heads, chunk, num_features)


def _guard(normalizer: torch.Tensor) -> torch.Tensor:
    """D with |D| <= δ replaced by ±δ (the sign of D, + for 0)."""
    floor = torch.where(normalizer < 0, -NORMALIZER_FLOOR, NORMALIZER_FLOOR)
    return torch.where(normalizer.abs() <= NORMALIZER_FLOOR, floor, normalizer)


def _exponent_projection(scaled_projection: torch.Tensor, kernel: str, dtype: torch.dtype) -> torch.Tensor:
    """Right-hand side `[m, d]` of the feature GEMM. softmax: log2(e) W_s, so that the exponent is in base 2, since
    exp2 is about twice as fast as exp on CPU (2^(log2(e) E) = exp(E)); relu: W_s."""
    projection = scaled_projection.to(dtype)
    return projection * LOG2_E if kernel == "softmax" else projection


def _relu_features(
    rows: torch.Tensor, projection: torch.Tensor, key_mask: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """ReLU(x W_sᵀ) + eps into `out`, zero rows for padded keys."""
    features = torch.matmul(rows, projection.transpose(0, 1), out=out).clamp_(min=0).add_(RELU_KERNEL_EPS)
    return features if key_mask is None else features.mul_(key_mask)


def _query_features(
    rows: torch.Tensor, exponent_projection: torch.Tensor, kernel: str, out: torch.Tensor
) -> torch.Tensor:
    """Query features into `out`, without the m^(-1/2) factor: exp(E − row max of E), or ReLU(U) + eps.

    With E = U − ‖x‖²/2, the norm term is itself a per-row offset, so E − max E = U − max U exactly: the row max of
    the full exponent needs no norm at all (and, for the same reason, the norm contributes no query gradient)."""
    if kernel == "relu":
        return _relu_features(rows, exponent_projection, None, out)
    exponent = torch.matmul(rows, exponent_projection.transpose(0, 1), out=out)
    return exponent.sub_(exponent.amax(dim=-1, keepdim=True)).exp2_()


def _key_exponent(
    rows: torch.Tensor, exponent_projection: torch.Tensor, key_mask: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """log2(e) E = log2(e) (U − ‖x‖²/2) of a chunk of keys into `out`, −inf on padded keys (out of the max, zero
    features). The mask rides on the small `[batch, heads, chunk, 1]` norm term (+inf where padded): a broadcast
    `masked_fill_` on the block is much slower (docs/performer.md)."""
    half_norms = rows.square().sum(dim=-1, keepdim=True).mul_(LOG2_E / (2 * math.sqrt(rows.shape[-1])))
    if key_mask is not None:
        half_norms.masked_fill_(~key_mask, math.inf)
    return torch.matmul(rows, exponent_projection.transpose(0, 1), out=out).sub_(half_norms)


def _key_features(
    rows: torch.Tensor,
    exponent_projection: torch.Tensor,
    kernel: str,
    key_mask: torch.Tensor | None,
    key_offset: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """Key features into `out`, without the m^(-1/2) factor: exp(E − offset) with the (batch, head) offset in base 2,
    or ReLU(U) + eps; zero rows for padded keys."""
    if kernel == "relu":
        return _relu_features(rows, exponent_projection, key_mask, out)
    return _key_exponent(rows, exponent_projection, key_mask, out).sub_(key_offset).exp2_()


def _rows_gradient(
    features_grad: torch.Tensor,
    features: torch.Tensor,
    rows: torch.Tensor,
    projection: torch.Tensor,
    kernel: str,
    is_query: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/d rows and dL/dE of a chunk from dL/dφ (overwritten): dE = dφ φ for φ = exp(E), dU = dφ [U > 0] for
    φ = ReLU(U) + eps (padded keys have φ = 0, hence no gradient); then E = x W_sᵀ − ‖x‖²/(2√d) for keys,
    U = x W_sᵀ otherwise (see `_query_features`)."""
    exponent_grad = features_grad.mul_(features if kernel == "softmax" else features > RELU_KERNEL_EPS)
    rows_grad = torch.matmul(exponent_grad, projection)
    if kernel == "softmax" and not is_query:
        rows_grad.sub_(rows * exponent_grad.sum(dim=-1, keepdim=True).mul_(1 / math.sqrt(rows.shape[-1])))
    return rows_grad, exponent_grad


def _add_transposed_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """`target[b, h] += left[b, h]ᵀ right[b, h]` in place, for `[batch, heads, chunk, ·]` operands."""
    batch_size, num_heads, chunk, _ = left.shape
    target.view(batch_size * num_heads, *target.shape[2:]).baddbmm_(
        left.reshape(batch_size * num_heads, chunk, -1).transpose(1, 2),
        right.reshape(batch_size * num_heads, chunk, -1),
    )


def _augmented_values(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[V | 1] of a chunk: one GEMM with it gives K′ᵀV and the key feature sums K′ᵀ1 of the normaliser."""
    values = values.to(dtype)
    return torch.cat([values, values.new_ones(*values.shape[:-1], 1)], dim=-1)


def _chunk_mask(key_mask: torch.Tensor | None, chunk: slice) -> torch.Tensor | None:
    """`[batch, 1, chunk, 1]` slice of the key mask, broadcastable over heads and features."""
    return None if key_mask is None else key_mask[:, None, chunk, None]


def _new_output(query: torch.Tensor, value_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Empty `[batch, heads, length, d_v]` output laid out like `query`: when heads are interleaved within each
    position (as `split_heads` makes them), the caller's transpose back to `[batch, length, heads, d_v]` and its
    reshape to `[batch, length, hidden]` are free views."""
    batch_size, num_heads, query_length, _ = query.shape
    if query.stride(1) < query.stride(2):
        return query.new_empty(batch_size, query_length, num_heads, value_dim, dtype=dtype).transpose(1, 2)
    return query.new_empty(batch_size, num_heads, query_length, value_dim, dtype=dtype)


class _FavorAttentionFunction(torch.autograd.Function):
    """Non-causal FAVOR+ in chunks along the length, with a hand-written backward that recomputes the features.

    Saves the inputs, the output, the normaliser `[batch, heads, length]`, the key offsets and the state
    Sᵀ = [V | 1]ᵀ K′ `[batch, heads, d_v + 1, m]` only, so that no pass holds more than two `[batch, heads, chunk, m]`
    blocks: memory is linear in the length with the constant of the inputs, and the blocks stay in cache. (S is kept
    transposed because GEMMs with a narrow d_v + 1 output are much slower than with a narrow inner dimension.)
    Computes in float32 (float64 for float64 inputs) with autocast off; outputs and gradients keep the input dtypes.
    """

    @staticmethod
    def forward(ctx, query, key, value, scaled_projection, key_mask, kernel, chunk_length):
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        batch_size, num_heads, key_length, _ = key.shape
        query_length, value_dim = query.shape[2], value.shape[-1]
        num_features = scaled_projection.shape[0]
        with torch.no_grad(), torch.autocast(device_type=query.device.type, enabled=False):
            exponent_projection = _exponent_projection(scaled_projection, kernel, compute_dtype)
            block_buffer = _block_buffer(key, chunk_length, num_features, compute_dtype)
            state = key.new_zeros(batch_size, num_heads, value_dim + 1, num_features, dtype=compute_dtype)
            key_offset = None
            if kernel == "softmax":
                lowest = torch.finfo(compute_dtype).min
                key_offset = key.new_full((batch_size, num_heads, 1, 1), lowest, dtype=compute_dtype)
            for chunk in _chunks(key_length, chunk_length):
                rows, mask = key[:, :, chunk].to(compute_dtype), _chunk_mask(key_mask, chunk)
                block = _block(block_buffer, rows, num_features)
                if kernel == "softmax":
                    exponent = _key_exponent(rows, exponent_projection, mask, out=block)
                    # Running max of the key exponents, so the keys are read once: S is rescaled when it grows.
                    new_offset = torch.maximum(key_offset, exponent.amax(dim=(-2, -1), keepdim=True))
                    state.mul_(torch.exp2(key_offset - new_offset))
                    key_offset = new_offset
                    features = exponent.sub_(key_offset).exp2_()
                else:
                    features = _relu_features(rows, exponent_projection, mask, out=block)
                _add_transposed_product(state, _augmented_values(value[:, :, chunk], compute_dtype), features)
            if kernel == "softmax":
                state.mul_(1 / num_features)  # the m^(-1/2) factors of the query and key features

            output = _new_output(query, value_dim, value.dtype)
            normalizer = query.new_empty(batch_size, num_heads, query_length, dtype=compute_dtype)
            for chunk in _chunks(query_length, chunk_length):
                rows = query[:, :, chunk].to(compute_dtype)
                features = _query_features(
                    rows, exponent_projection, kernel, out=_block(block_buffer, rows, num_features)
                )
                augmented_output = torch.matmul(state, features.transpose(-2, -1)).transpose(-2, -1)
                normalizer[:, :, chunk] = augmented_output[..., value_dim]
                output[:, :, chunk] = augmented_output[..., :value_dim] / _guard(augmented_output[..., value_dim:])
        ctx.save_for_backward(query, key, value, scaled_projection, key_mask, output, normalizer, state, key_offset)
        ctx.kernel, ctx.chunk_length = kernel, chunk_length
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, output_grad):
        query, key, value, scaled_projection, key_mask, output, normalizer, state, key_offset = ctx.saved_tensors
        kernel, chunk_length = ctx.kernel, ctx.chunk_length
        needs_query_grad, needs_key_grad, needs_value_grad, needs_projection_grad = ctx.needs_input_grad[:4]
        compute_dtype = state.dtype
        key_length, query_length = key.shape[2], query.shape[2]
        value_dim, num_features = state.shape[2] - 1, state.shape[3]
        with torch.autocast(device_type=query.device.type, enabled=False):
            projection = scaled_projection.to(compute_dtype)
            exponent_projection = _exponent_projection(scaled_projection, kernel, compute_dtype)
            block_buffer = _block_buffer(query, chunk_length, num_features, compute_dtype)
            grad_buffer = _block_buffer(query, chunk_length, num_features, compute_dtype)
            projection_grad = torch.zeros_like(projection)
            query_grad = torch.empty_like(query) if needs_query_grad else None
            state_grad = torch.zeros_like(state)
            for chunk in _chunks(query_length, chunk_length):
                rows = query[:, :, chunk].to(compute_dtype)
                features = _query_features(
                    rows, exponent_projection, kernel, out=_block(block_buffer, rows, num_features)
                )
                chunk_normalizer = normalizer[:, :, chunk, None]
                guarded = _guard(chunk_normalizer)
                chunk_output_grad = output_grad[:, :, chunk].to(compute_dtype)
                # out = numerator / D: d numerator = g / D and dD = −(g · out) / D, which is 0 where the guard fired.
                normalizer_grad = (chunk_output_grad * output[:, :, chunk]).sum(dim=-1, keepdim=True).div_(guarded)
                normalizer_grad.neg_().masked_fill_(chunk_normalizer.abs() <= NORMALIZER_FLOOR, 0.0)
                augmented_grad = torch.cat([chunk_output_grad / guarded, normalizer_grad], dim=-1)
                _add_transposed_product(state_grad, augmented_grad, features)
                if needs_query_grad or needs_projection_grad:
                    features_grad = torch.matmul(augmented_grad, state, out=_block(grad_buffer, rows, num_features))
                    rows_grad, exponent_grad = _rows_gradient(
                        features_grad, features, rows, projection, kernel, is_query=True
                    )
                    if needs_query_grad:
                        query_grad[:, :, chunk] = rows_grad
                    if needs_projection_grad:
                        projection_grad.addmm_(exponent_grad.flatten(0, 2).T, rows.flatten(0, 2))
            if kernel == "softmax":
                state_grad.mul_(1 / num_features)

            key_grad = torch.empty_like(key) if needs_key_grad else None
            value_grad = torch.empty_like(value) if needs_value_grad else None
            value_state_grad = state_grad[:, :, :value_dim].transpose(-2, -1)
            for chunk in _chunks(key_length, chunk_length):
                rows, mask = key[:, :, chunk].to(compute_dtype), _chunk_mask(key_mask, chunk)
                block = _block(block_buffer, rows, num_features)
                features = _key_features(rows, exponent_projection, kernel, mask, key_offset, out=block)
                if needs_value_grad:
                    value_grad[:, :, chunk] = torch.matmul(features, value_state_grad)
                if needs_key_grad or needs_projection_grad:
                    augmented_values = _augmented_values(value[:, :, chunk], compute_dtype)
                    features_grad = torch.matmul(
                        augmented_values, state_grad, out=_block(grad_buffer, rows, num_features)
                    )
                    rows_grad, exponent_grad = _rows_gradient(
                        features_grad, features, rows, projection, kernel, is_query=False
                    )
                    if needs_key_grad:
                        key_grad[:, :, chunk] = rows_grad
                    if needs_projection_grad:
                        projection_grad.addmm_(exponent_grad.flatten(0, 2).T, rows.flatten(0, 2))
        projection_grad = projection_grad.to(scaled_projection.dtype) if needs_projection_grad else None
        return query_grad, key_grad, value_grad, projection_grad, None, None, None


def _performer_pytorch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection_matrix: torch.Tensor,
    key_mask: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """performer-pytorch 1.1.4 `FastAttention` (non-causal) numerics, op for op, with plain autograd."""
    head_dim, num_features = query.shape[-1], projection_matrix.shape[0]
    data_normalizer = head_dim**-0.25
    projection = projection_matrix.to(query.dtype)
    if key_mask is not None:
        value = value.masked_fill(~key_mask[:, None, :, None], 0.0)

    def features(data: torch.Tensor, is_query: bool) -> torch.Tensor:
        data_dash = torch.matmul(data_normalizer * data, projection.transpose(0, 1))
        if kernel == "relu":
            return torch.relu(data_dash) + RELU_KERNEL_EPS
        diag_data = (data**2).sum(dim=-1, keepdim=True) / 2.0 * data_normalizer**2
        max_dims = -1 if is_query else (-1, -2)
        data_max = torch.amax(data_dash, dim=max_dims, keepdim=True).detach()
        return num_features**-0.5 * (torch.exp(data_dash - diag_data - data_max) + PERFORMER_PYTORCH_SOFTMAX_EPS)

    query_features, key_features = features(query, is_query=True), features(key, is_query=False)
    normalizer_inverse = 1.0 / torch.einsum("...nd,...d->...n", query_features, key_features.sum(dim=-2))
    context = torch.einsum("...nd,...ne->...de", key_features, value)
    return torch.einsum("...de,...nd,...n->...ne", context, query_features, normalizer_inverse)


def favor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection_matrix: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    kernel: str = "softmax",
    compat_performer_pytorch: bool = False,
    chunk_length: int | None = None,
) -> torch.Tensor:
    """Non-causal FAVOR+ attention, `out = diag(Q′ (K′ᵀ 1))⁻¹ Q′ (K′ᵀ V)`, linear in time and memory in the length.

    Args:
        query: `[batch, heads, query_length, d]`.
        key: `[batch, heads, key_length, d]`.
        value: `[batch, heads, key_length, d_v]`.
        projection_matrix: `[m, d]` random features (e.g. from `draw_orthogonal_features`), shared by queries and
            keys, broadcast over batch and heads. Receives a gradient if it requires one.
        key_mask: bool `[batch, key_length]`, True = real key. Padded keys contribute nothing at all (zero
            feature rows, excluded from the key stabiliser): the real rows' outputs equal those of the unpadded
            input. Output rows of padded queries are finite but meaningless. A row of batch with no real key gets 0.
        kernel: `"softmax"`: φ(x) = m^(-1/2) exp(W x − ‖x‖²/2) with x = q·d^(-1/4), an unbiased estimate of
            exp(q·k/√d); `"relu"`: the generalised kernel φ(x) = ReLU(W x) + 1e-3, also with x = q·d^(-1/4) and no
            m^(-1/2) (a constant factor only matters against the 1e-3).
        compat_performer_pytorch: reproduce performer-pytorch 1.1.4 `FastAttention` instead (max of W x only, eps
            added after exp, masking by zeroing values, no normaliser guard). For side-by-side tests only.
        chunk_length: rows per (batch, head) processed at once; by default `CHUNK_NUM_ELEMENTS / (batch·heads·m)`
            and at least `MIN_CHUNK_LENGTH`.
            Changes speed and memory, not results (beyond rounding).

    Returns:
        `[batch, heads, query_length, d_v]` in the dtype of `value`. Under autocast or with half inputs the feature
        exponents, features, the state S, the normaliser and the division are computed in float32.
    """
    if kernel not in KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; valid kernels: {list(KERNELS)}.")
    if compat_performer_pytorch:
        return _performer_pytorch_attention(query, key, value, projection_matrix, key_mask, kernel)
    batch_size, num_heads, key_length, head_dim = key.shape
    if projection_matrix.shape[-1] != head_dim:
        raise ValueError(
            f"projection_matrix {tuple(projection_matrix.shape)} does not match head dimension {head_dim}."
        )
    if chunk_length is None:
        chunk_length = _chunk_length(
            batch_size * num_heads, projection_matrix.shape[0], max(key_length, query.shape[2])
        )
    if key_mask is not None:
        key_mask = key_mask.bool()
    # Pre-scaling W by d^(-1/4) turns x Wᵀ with x = q·d^(-1/4) into one product q (d^(-1/4) W)ᵀ.
    scaled_projection = projection_matrix * head_dim**-0.25
    return _FavorAttentionFunction.apply(query, key, value, scaled_projection, key_mask, kernel, chunk_length)


@dataclass(kw_only=True)
class PerformerSettings:
    """Config fields of `attention_type="performer"`.

    Args:
        performer_num_random_features: random features m.
        performer_kernel: `"softmax"` (positive random features) or `"relu"` (generalised ReLU).
        performer_orthogonal_scaling: 0 = rows scaled by χ_d norms (unbiased), 1 = every row has norm √d.
        performer_redraw_interval: redraw the projection every so many optimizer steps in training; 0 never.
        performer_seed: base seed of the projection draws (a draw is a function of seed and step).
    """

    performer_num_random_features: int = 128
    performer_kernel: str = "softmax"
    performer_orthogonal_scaling: int = 0
    performer_redraw_interval: int = 1000
    performer_seed: int = 0


def validate_performer_settings(config: PerformerSettings) -> None:
    """Raises a `ValueError` for invalid Performer fields."""
    if config.performer_kernel not in KERNELS:
        raise ValueError(f"Unknown performer_kernel {config.performer_kernel!r}; valid kernels: {list(KERNELS)}.")
    if config.performer_num_random_features < 1:
        raise ValueError(
            f"performer_num_random_features must be positive, got {config.performer_num_random_features}."
        )
    if config.performer_orthogonal_scaling not in (0, 1):
        raise ValueError(f"performer_orthogonal_scaling must be 0 or 1, got {config.performer_orthogonal_scaling}.")
    if config.performer_redraw_interval < 0:
        raise ValueError(
            f"performer_redraw_interval must be >= 0 (0 = never), got {config.performer_redraw_interval}."
        )


class TxFormerPerformerAttention(TxFormerSelfAttention):
    """Performer (FAVOR+) self-attention: the shared projections around `favor_attention`, with the random projection
    as a persistent float32 buffer (saved with the model) and a deterministic redraw policy for training."""

    float32_buffers = ("projection_matrix",)

    def __init__(self, config: "TxFormerConfig", layer_idx: int):
        super().__init__(config, layer_idx)
        self.kernel = config.performer_kernel
        self.orthogonal_scaling = config.performer_orthogonal_scaling
        self.redraw_interval = config.performer_redraw_interval
        self.seed = config.performer_seed
        projection = torch.empty(config.performer_num_random_features, self.head_dim, dtype=torch.float32)
        self.register_buffer("projection_matrix", projection, persistent=True)
        self.reset_buffers()

    def draw_projection(self, step: int) -> torch.Tensor:
        """The projection of this layer at optimizer step `step`, a function of `(performer_seed, layer_idx, step)`."""
        generator = torch.Generator(device="cpu").manual_seed(projection_seed(self.seed, self.layer_idx, step))
        num_features, head_dim = self.projection_matrix.shape
        return draw_orthogonal_features(
            num_features, head_dim, self.orthogonal_scaling, generator, dtype=self.projection_matrix.dtype
        )

    def reset_buffers(self) -> None:
        """Draw the step-0 projection into the buffer (on whatever device it lives; a no-op on meta tensors). Leaves
        a buffer loaded from a checkpoint alone (`transformers.initialization` semantics)."""
        init.copy_(self.projection_matrix, self.draw_projection(step=0).to(self.projection_matrix.device))

    @torch.no_grad()
    def begin_optimizer_step(self, step: int) -> None:
        """Redraw the projection if optimizer step `step` is a positive multiple of `performer_redraw_interval`, in
        training only; the draw depends only on the seed, layer and step, so every process draws the same matrix."""
        if not self.training or self.redraw_interval <= 0 or step <= 0 or step % self.redraw_interval != 0:
            return
        self.projection_matrix.copy_(self.draw_projection(step).to(self.projection_matrix.device))

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_mask: torch.Tensor,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """FAVOR+ attention: `[batch, heads, length, head_dim]` inputs -> `[batch, length, heads, head_dim]`, no
        weights. The exact-attention `attention_mask` is not used (the boolean `key_mask` is exact), nor is
        attention dropout (there are no attention weights to drop)."""
        output = favor_attention(query, key, value, self.projection_matrix, key_mask, kernel=self.kernel)
        return output.transpose(1, 2), None


PERFORMER_ATTENTION = AttentionKind(
    name="performer",
    attention_class=TxFormerPerformerAttention,
    label="FAVOR+",
    summary="FAVOR+ (Performer) random-feature approximation of softmax attention, linear in the history length.",
    hub_tag="performer",
    settings=PerformerSettings,
    validate_settings=validate_performer_settings,
)


__all__ = [
    "PERFORMER_ATTENTION",
    "PerformerSettings",
    "TxFormerPerformerAttention",
    "draw_orthogonal_features",
    "favor_attention",
    "projection_seed",
]
