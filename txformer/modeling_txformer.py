"""TxFormer: a transformer over event sequences (bank transactions) with pluggable attention."""

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention.flex_attention import BlockMask
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .attention_full import Float32BuffersMixin, Streaming, TxFormerSelfAttention, build_attention_mask
from .configuration_txformer import ATTENTION_KINDS, TxFormerConfig


logger = logging.get_logger(__name__)

MINUTES_PER_DAY = 1440.0


def signed_log1p(values: torch.Tensor) -> torch.Tensor:
    """`sign(x) * log1p(|x|)`: maps signed amounts over many orders of magnitude to about [-20, 20]."""
    return torch.sign(values) * torch.log1p(values.abs())


@dataclass
class TxFormerState(ModelOutput):
    """What a model of a streaming kind (`AttentionKind.streaming`: the ∞-former) carries from one call (or segment)
    to the next to read a history in parts.

    Args:
        layer_states: the state of each layer (the ∞-former: its long-term memory).
        pooled_sum: sum of the final hidden states of the events read so far, `[batch, hidden]`.
        num_events: events read so far, `[batch]`.
        last_hidden_state: final hidden state of the last event read so far, `[batch, hidden]`.
        last_event_time: time (days) of the last event read so far, `[batch]`.
        last_event_code: first categorical field of the last event read so far, `[batch]`.
        event_context: embeddings of the last `event_context_size` events read so far, `[batch, size, hidden]`.
        embedding_sum: sum of the event embeddings read so far, `[batch, hidden]` (`embedding_sum_readout` only).
    """

    layer_states: tuple[Any, ...] | None = None
    pooled_sum: torch.Tensor | None = None
    num_events: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    last_event_time: torch.Tensor | None = None
    last_event_code: torch.Tensor | None = None
    event_context: torch.Tensor | None = None
    embedding_sum: torch.Tensor | None = None


@dataclass
class TxFormerModelOutput(ModelOutput):
    """Output of [`TxFormerModel`].

    Args:
        last_hidden_state: final hidden state of every event, `[batch, length, hidden]`.
        pooler_output: pooled history representation, `[batch, hidden]`.
        hidden_states: output of the embeddings and of every layer, when asked for.
        attentions: attention weights `[batch, heads, length, length]` of every layer, when asked for and the kind
            has them (`AttentionKind.attention_weights`: full attention under eager); None otherwise.
        past_state: the state to continue reading the histories from (streaming kinds only).
        aux_loss: the attention's weighted regularisation loss (`auxiliary_loss` of the layers: the ∞-former's KL
            term times `ltm_kl_weight`), which the heads add to their losses; None without one.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    past_state: TxFormerState | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class TxFormerSequenceClassifierOutput(ModelOutput):
    """Output of [`TxFormerForSequenceClassification`]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    past_state: TxFormerState | None = None


class TxFormerNumericEncoder(nn.Module):
    """Encodes raw numeric fields: signed log, then learned periodic features of it (sane over 9 orders of
    magnitude, and able to resolve fine differences where a single linear projection cannot)."""

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        num_fields = len(config.numeric_fields)
        self.frequencies = nn.Parameter(torch.empty(num_fields, config.numeric_num_frequencies))
        self.projection = nn.Linear(num_fields * (1 + 2 * config.numeric_num_frequencies), config.hidden_size)

    def forward(self, numeric_values: torch.Tensor) -> torch.Tensor:
        log_values = signed_log1p(numeric_values.float())
        phases = 2 * math.pi * log_values.unsqueeze(-1) * self.frequencies
        # The signed log reaches about ±20; divided by 10 it stays within the scale of the periodic features.
        features = torch.cat([log_values.unsqueeze(-1) / 10, phases.sin(), phases.cos()], dim=-1)
        return self.projection(features.flatten(-2).to(self.projection.weight.dtype))

    def reset_frequencies(self) -> None:
        """Log-spaced initial frequencies from one cycle per 100 to one per 2 units of signed log."""
        num_frequencies = self.frequencies.shape[-1]
        frequencies = torch.logspace(-2, math.log10(0.5), num_frequencies, device=self.frequencies.device)
        init.copy_(self.frequencies, frequencies.expand_as(self.frequencies))


class TxFormerTimeEncoder(Float32BuffersMixin):
    """Encodes event times (days): cyclic features for each period (hour of day, day of week) and the gap to the
    previous event. No absolute position table, so no maximum length."""

    # Rounded to bfloat16, 2π/day × day 400 is hours off.
    float32_buffers = ("angular_frequencies",)

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.periods_days = tuple(config.time_periods_days)
        self.num_harmonics = config.time_num_harmonics
        num_frequencies = len(self.periods_days) * self.num_harmonics
        self.register_buffer(
            "angular_frequencies", torch.empty(num_frequencies, dtype=torch.float32), persistent=False
        )
        self.projection = nn.Linear(2 * num_frequencies + 1, config.hidden_size)
        self.reset_frequencies()

    def reset_frequencies(self) -> None:
        """Angular frequency (radians per day) of every harmonic of every period, derived from the config."""
        harmonics = torch.arange(1, self.num_harmonics + 1, dtype=torch.float64)
        periods = torch.tensor(self.periods_days, dtype=torch.float64)
        angular = 2 * math.pi * harmonics[None, :] / periods[:, None]
        init.copy_(self.angular_frequencies, angular.flatten().to(self.angular_frequencies.device))

    def forward(self, event_time: torch.Tensor, previous_event_time: torch.Tensor | None = None) -> torch.Tensor:
        event_time = event_time.float()
        # Phases in float64, reduced modulo 2π, so large day indices keep their time-of-day resolution.
        phases = event_time.double().unsqueeze(-1) * self.angular_frequencies.double()
        phases = torch.remainder(phases, 2 * math.pi).float()
        first_previous = event_time[:, :1] if previous_event_time is None else previous_event_time[:, None].float()
        gaps = event_time - torch.cat([first_previous, event_time[:, :-1]], dim=1)
        log_gap = torch.log1p(gaps.clamp(min=0) * MINUTES_PER_DAY) / 10
        features = torch.cat([phases.sin(), phases.cos(), log_gap.unsqueeze(-1)], dim=-1)
        return self.projection(features.to(self.projection.weight.dtype))


class TxFormerRotaryEmbedding(Float32BuffersMixin):
    """Cosines and sines of the rotary position embedding over the event index (`config.rope_theta` base)."""

    float32_buffers = ("inv_freq",)

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = config.rope_theta
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_frequencies()

    def reset_frequencies(self) -> None:
        """θ^(-2i/d) for each rotary pair i, derived from the config."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        init.copy_(self.inv_freq, (self.rope_theta**-exponents).to(self.inv_freq.device))

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)` `[1, 1, length, head_dim]` for positions `0 .. length - 1`; only their differences matter."""
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)[None, None]
        return angles.cos(), angles.sin()


class TxFormerEventContext(nn.Module):
    """Adds to each event embedding a learned linear map of itself and the `event_context_size` events before it: a
    causal convolution over the history, so pairs like "code a followed by code b" are visible to every
    layer of every attention kind. Padding contributes zeros; `event_context` carries the last events of a previous
    segment or call."""

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.context_size = config.event_context_size
        self.convolution = nn.Conv1d(config.hidden_size, config.hidden_size, kernel_size=self.context_size + 1)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, embeddings: torch.Tensor, event_mask: torch.Tensor, event_context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`embeddings` `[batch, length, hidden]`, `event_mask` `[batch, length]` (True = real event) and the
        `[batch, context_size, hidden]` events before them (None: the history starts here). Returns the mixed
        embeddings and the context for the next segment (unchanged for rows without a real event here)."""
        events = embeddings.masked_fill(~event_mask[..., None], 0.0)
        if event_context is None:
            event_context = events.new_zeros(events.shape[0], self.context_size, events.shape[-1])
        window = torch.cat([event_context.to(events.dtype), events], dim=1)
        mixed = self.convolution(window.transpose(1, 2)).transpose(1, 2)
        next_context = torch.where(
            event_mask.any(dim=1)[:, None, None], window[:, -self.context_size :], event_context
        )
        return self.norm(embeddings + mixed), next_context


class TxFormerEventEmbeddings(nn.Module):
    """One vector per event: sum of the categorical field embeddings, the numeric and the time encodings."""

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.categorical_embeddings = nn.ModuleList(
            nn.Embedding(vocab_size, config.hidden_size, padding_idx=0)
            for vocab_size in config.categorical_vocab_sizes
        )
        self.numeric_encoder = TxFormerNumericEncoder(config)
        self.time_encoder = TxFormerTimeEncoder(config)
        self.first_vocab_size = config.categorical_vocab_sizes[0]
        self.pair_embedding = (
            nn.Embedding(config.event_pair_buckets, config.hidden_size) if config.event_pair_buckets > 0 else None
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        previous_event_time: torch.Tensor | None = None,
        previous_code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`previous_event_time`, `previous_code` `[batch]`: time and first categorical field of the event before the
        first one here (None: the history starts here)."""
        embeddings = self.numeric_encoder(numeric_values) + self.time_encoder(event_time, previous_event_time)
        for field_index, embedding in enumerate(self.categorical_embeddings):
            embeddings = embeddings + embedding(input_ids[..., field_index])
        if self.pair_embedding is not None:
            codes = input_ids[..., 0]
            first = codes.new_zeros(codes.shape[0]) if previous_code is None else previous_code.to(codes.dtype)
            previous = torch.cat([first[:, None], codes[:, :-1]], dim=1)
            pairs = (previous * self.first_vocab_size + codes) % self.pair_embedding.num_embeddings
            embeddings = embeddings + self.pair_embedding(pairs)
        return self.dropout(self.norm(embeddings))


class TxFormerMLP(nn.Module):
    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act_fn(self.fc_in(hidden_states)))


@dataclass(frozen=True)
class RandomState:
    """The states of torch's default random generators on the CPU and on an accelerator (None on the CPU): what
    dropout and any random draw of an attention kind consume."""

    cpu: torch.Tensor
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> "RandomState":
        """The generators' states now (`device`: the accelerator's, if it is one)."""
        accelerator = None
        if device.type != "cpu":
            accelerator = torch.get_device_module(device.type).get_rng_state(device)
        return cls(torch.get_rng_state(), accelerator)

    def restore(self, device: torch.device) -> None:
        """Sets the generators back to these states."""
        torch.set_rng_state(self.cpu)
        if self.accelerator is not None:
            torch.get_device_module(device.type).set_rng_state(self.accelerator, device)


class TxFormerLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer: attention of the configured kind, then an MLP, each a residual branch. With
    `config.reversible_layers` the model couples the two branches instead (`reversible_forward`)."""

    def __init__(self, config: TxFormerConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ATTENTION_KINDS[config.attention_type].attention_class(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = TxFormerMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | BlockMask | None,
        key_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_state: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        attn_output, attn_weights, state = self.attention_branch(
            hidden_states, attention_mask, key_mask, position_embeddings, past_state
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp_branch(hidden_states)
        return hidden_states, attn_weights, state

    def reversible_forward(
        self,
        first: torch.Tensor,
        second: torch.Tensor,
        attention_mask: torch.Tensor | BlockMask | None,
        key_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_state: Any = None,
        random_states: list[RandomState] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
        """The reversible coupling of the two streams: `Y1 = X1 + Attention(X2)`, `Y2 = X2 + MLP(Y1)`. Returns
        `Y1`, `Y2`, the attention weights and the next state. [`ReversibleLayersFunction`] inverts it, and passes
        `random_states` to get the random generators' state before each branch appended."""
        if random_states is not None:
            random_states.append(RandomState.capture(second.device))
        attn_output, attn_weights, state = self.attention_branch(
            second, attention_mask, key_mask, position_embeddings, past_state
        )
        first = first + attn_output
        if random_states is not None:
            random_states.append(RandomState.capture(first.device))
        second = second + self.mlp_branch(first)
        return first, second, attn_weights, state

    def attention_branch(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | BlockMask | None,
        key_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_state: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """`Dropout(Attention(LayerNorm(x)))`, the attention weights and the attention's next state."""
        attn_output, attn_weights, state = self.self_attn(
            self.attention_norm(hidden_states),
            attention_mask=attention_mask,
            key_mask=key_mask,
            position_embeddings=position_embeddings,
            past_state=past_state,
        )
        return self.dropout(attn_output), attn_weights, state

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`Dropout(MLP(LayerNorm(x)))`."""
        return self.dropout(self.mlp(self.mlp_norm(hidden_states)))


def state_tensors(state: Any) -> tuple[torch.Tensor | None, ...]:
    """The fields of a layer's state (a dataclass of tensors or None; None: a stateless kind), in order."""
    return () if state is None else tuple(getattr(state, field.name) for field in fields(state))


def with_state_tensors(state: Any, tensors: tuple[torch.Tensor | None, ...]) -> Any:
    """`state` with its fields replaced by `tensors` (inverse of `state_tensors`)."""
    if state is None:
        return None
    return replace(state, **{field.name: tensor for field, tensor in zip(fields(state), tensors, strict=True)})


def split_by_layer(tensors: tuple[Any, ...], states: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Cuts the flat `tensors` of several layers' states into one tuple per layer, of the sizes of `states`."""
    per_layer = []
    for state in states:
        size = len(state_tensors(state))
        per_layer.append(tuple(tensors[:size]))
        tensors = tensors[size:]
    return per_layer


class ReversibleLayers:
    """What one pass of [`ReversibleLayersFunction`] knows besides its tensors: the layers, the inputs every layer
    takes, the layers' past states (their structure) and next states, and what the forward pass records for the
    backward pass (the random state before each branch, autocast)."""

    def __init__(self, layers: nn.ModuleList, layer_inputs: dict[str, Any], past_states: tuple[Any, ...]):
        self.layers = layers
        self.layer_inputs = layer_inputs
        self.past_states = past_states
        self.next_states: tuple[Any, ...] = ()
        self.random_states: list[tuple[RandomState, RandomState]] = []
        self.autocast: dict[str, Any] = {}
        self.parameters = [parameter for parameter in layers.parameters() if parameter.requires_grad]
        self.parameter_index = {id(parameter): index for index, parameter in enumerate(self.parameters)}

    def invert_mlp(
        self,
        layer_index: int,
        first: torch.Tensor,
        second: torch.Tensor,
        grad_first: torch.Tensor,
        grad_second: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Inverts `Y2 = X2 + MLP(Y1)` of a layer: `X2`, the whole gradient of `Y1` (`grad_first`, the gradient of
        `Y1` as an output, plus the MLP's part) and the gradients of the layer's parameters (by their index in
        `parameters`)."""
        layer = self.layers[layer_index]
        parameters = [parameter for parameter in layer.parameters() if parameter.requires_grad]
        self.random_states[layer_index][1].restore(first.device)
        with torch.enable_grad(), torch.autocast(**self.autocast):
            first_input = first.detach().requires_grad_()
            mlp_output = layer.mlp_branch(first_input)
        grad_input, *grads = torch.autograd.grad(
            mlp_output, [first_input, *parameters], grad_second, allow_unused=True
        )
        return second - mlp_output.detach(), grad_first + grad_input, self.by_index(parameters, grads)

    def invert_attention(
        self,
        layer_index: int,
        first: torch.Tensor,
        second: torch.Tensor,
        grad_first: torch.Tensor,
        grad_second: torch.Tensor,
        past_tensors: tuple[torch.Tensor | None, ...],
        past_needs_grad: tuple[bool, ...],
        grad_next_tensors: tuple[torch.Tensor | None, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor], list[torch.Tensor | None]]:
        """Inverts `Y1 = X1 + Attention(X2)` (with its next state) of a layer: `X1`, the whole gradient of `X2`
        (`grad_second`, that of `Y2`, plus the attention's part), the gradients of the layer's parameters and of its
        past state's tensors."""
        layer = self.layers[layer_index]
        parameters = [parameter for parameter in layer.parameters() if parameter.requires_grad]
        past_inputs = tuple(
            tensor.detach().requires_grad_() if needs_grad else tensor
            for tensor, needs_grad in zip(past_tensors, past_needs_grad, strict=True)
        )
        past_leaves = [tensor for tensor in past_inputs if tensor is not None and tensor.requires_grad]
        self.random_states[layer_index][0].restore(second.device)
        with torch.enable_grad(), torch.autocast(**self.autocast):
            second_input = second.detach().requires_grad_()
            attn_output, _, next_state = layer.attention_branch(
                second_input,
                past_state=with_state_tensors(self.past_states[layer_index], past_inputs),
                **self.layer_inputs,
            )
        outputs, grad_outputs = [attn_output], [grad_first]
        for tensor, grad in zip(state_tensors(next_state), grad_next_tensors, strict=True):
            if grad is not None and tensor is not None and tensor.requires_grad:
                outputs.append(tensor)
                grad_outputs.append(grad)
        grad_input, *grads = torch.autograd.grad(
            outputs, [second_input, *parameters, *past_leaves], grad_outputs, allow_unused=True
        )
        grad_leaves = iter(grads[len(parameters) :])
        grad_past = [
            next(grad_leaves) if tensor is not None and tensor.requires_grad else None for tensor in past_inputs
        ]
        return (
            first - attn_output.detach(),
            grad_second + grad_input,
            self.by_index(parameters, grads[: len(parameters)]),
            grad_past,
        )

    def by_index(self, parameters: list[nn.Parameter], grads: list[torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """The gradients of `parameters` that were reached, by the parameters' index in `self.parameters`."""
        return {
            self.parameter_index[id(parameter)]: grad
            for parameter, grad in zip(parameters, grads, strict=True)
            if grad is not None
        }


class ReversibleLayersFunction(torch.autograd.Function):
    """The coupled layers (`TxFormerLayer.reversible_forward`) with activation memory independent of the depth: the
    forward pass keeps no activation but the last layer's two streams, and the backward pass walks the layers from
    the last one, recovers each layer's inputs from its outputs (`X2 = Y2 - MLP(Y1)`, `X1 = Y1 - Attention(X2)`),
    recomputes its two branches with gradient under the random state and autocast they first ran with, and
    backpropagates through them. The idea is transformers' Reformer's; here the parameters are inputs of the function,
    so that their gradients are returned through autograd (`torch.autograd.grad`, gradient accumulation and DDP's
    hooks see them as from any other layer).

    Inputs: the [`ReversibleLayers`], the hidden states `[batch, length, hidden]`, the tensors of the layers' past
    states (`state_tensors`, layer after layer), then `ReversibleLayers.parameters`. Outputs: `Y1`, `Y2` of the last
    layer and the tensors of the next states (structure in `ReversibleLayers.next_states`).
    """

    @staticmethod
    def forward(ctx, run: ReversibleLayers, hidden_states: torch.Tensor, *tensors: torch.Tensor | None):
        device = hidden_states.device
        run.autocast = {
            "device_type": device.type,
            "dtype": torch.get_autocast_dtype(device.type),
            "enabled": torch.is_autocast_enabled(device.type),
        }
        past_tensors = tensors[: len(tensors) - len(run.parameters)]
        first, second, next_states = hidden_states, hidden_states, []
        for layer, past_state, layer_tensors in zip(
            run.layers, run.past_states, split_by_layer(past_tensors, run.past_states), strict=True
        ):
            random_states = []
            first, second, _, next_state = layer.reversible_forward(
                first,
                second,
                **run.layer_inputs,
                past_state=with_state_tensors(past_state, layer_tensors),
                random_states=random_states,
            )
            run.random_states.append(tuple(random_states))
            next_states.append(next_state)
        run.next_states = tuple(next_states)
        ctx.run = run
        # The outputs are kept detached, not saved, so that the backward pass can let go of them once it has
        # recovered the last layer's inputs; the past states are inputs, saved as usual.
        ctx.streams = (first.detach(), second.detach())
        ctx.save_for_backward(*past_tensors)
        ctx.set_materialize_grads(False)
        return first, second, *(tensor for state in next_states for tensor in state_tensors(state))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_first: torch.Tensor | None, grad_second: torch.Tensor | None, *grad_next_tensors):
        run: ReversibleLayers = ctx.run
        if ctx.streams is None:
            raise RuntimeError(
                "Reversible layers free their activations in the backward pass: backward through them once."
            )
        (first, second), ctx.streams = ctx.streams, None
        past_tensors = ctx.saved_tensors
        grad_first = torch.zeros_like(first) if grad_first is None else grad_first
        grad_second = torch.zeros_like(second) if grad_second is None else grad_second
        past_tensors = split_by_layer(past_tensors, run.past_states)
        past_needs_grad = split_by_layer(ctx.needs_input_grad[2:], run.past_states)
        grad_next_tensors = split_by_layer(grad_next_tensors, run.next_states)
        grad_parameters: list[torch.Tensor | None] = [None] * len(run.parameters)
        grad_past: list[list[torch.Tensor | None]] = []
        device = first.device
        # The replayed random states leave the caller's as it was.
        with torch.random.fork_rng([device] if device.type != "cpu" else [], device_type=device.type):
            for layer_index in reversed(range(len(run.layers))):
                second, grad_first, mlp_grads = run.invert_mlp(layer_index, first, second, grad_first, grad_second)
                first, grad_second, attention_grads, grad_layer_past = run.invert_attention(
                    layer_index,
                    first,
                    second,
                    grad_first,
                    grad_second,
                    past_tensors[layer_index],
                    past_needs_grad[layer_index],
                    grad_next_tensors[layer_index],
                )
                grad_past.insert(0, grad_layer_past)
                for index, grad in [*mlp_grads.items(), *attention_grads.items()]:
                    grad_parameters[index] = grad if grad_parameters[index] is None else grad_parameters[index] + grad
        grad_past_tensors = [grad for layer_grads in grad_past for grad in layer_grads]
        return None, grad_first + grad_second, *grad_past_tensors, *grad_parameters


def reversible_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    past_states: tuple[Any, ...],
    layer_inputs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]:
    """The streams `Y1`, `Y2` after every coupled layer from `X1 = X2 = hidden_states`, and each layer's next state,
    through [`ReversibleLayersFunction`] (training memory independent of the depth)."""
    run = ReversibleLayers(layers, layer_inputs, past_states)
    past_tensors = [tensor for state in past_states for tensor in state_tensors(state)]
    first, second, *next_tensors = ReversibleLayersFunction.apply(run, hidden_states, *past_tensors, *run.parameters)
    next_states = tuple(
        with_state_tensors(state, tensors)
        for state, tensors in zip(run.next_states, split_by_layer(tuple(next_tensors), run.next_states), strict=True)
    )
    return first, second, next_states


class TxFormerPooler(nn.Module):
    """One vector per history from the sum of its final event states and its number of events (`config.pooling`).

    `"mean"` averages. `"sum"` adds up and divides by the constant `pooling_sum_scale`: where every event adds to
    the log-odds (the Bayes posterior is a sum), a linear head on it reads evidence that accrues with the number of
    events, and a model trained on windows scores longer histories on the same scale. `"mean_sum"` adds a learned
    share of the sum, `mean * (1 + sum_weight * n / pooling_sum_scale)`, with `sum_weight` starting at 0, i.e. at
    `"mean"`.
    `"last"` takes the state of the most recent event."""

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.pooling = config.pooling
        self.sum_scale = config.pooling_sum_scale
        self.sum_weight = nn.Parameter(torch.zeros(config.hidden_size)) if config.pooling == "mean_sum" else None

    def forward(self, event_sum: torch.Tensor, num_events: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """`event_sum`, `last_hidden`: `[batch, hidden]`; `num_events`: `[batch]` real events read."""
        if self.pooling == "last":
            return last_hidden
        if self.pooling == "sum":
            return event_sum / self.sum_scale
        count = num_events.clamp(min=1)[:, None].to(event_sum.dtype)
        pooled = event_sum / count
        if self.sum_weight is not None:
            pooled = pooled * (1 + self.sum_weight.to(pooled.dtype) * count / self.sum_scale)
        return pooled


class TxFormerEmbeddingReadout(Float32BuffersMixin):
    """The sum of a history's event embeddings over `pooling_sum_scale`, centred on the mean event embedding
    (`config.embedding_sum_readout`): `(Σ_i e_i - n m) / pooling_sum_scale`.

    Every event adds to it, whatever the attention kind makes of long contexts, so a linear head reads evidence that
    accrues over the whole history, as the log-odds of a per-event signal does. The centre `m` removes the offset
    that a sum would multiply by the history's length. In training it is the batch's mean event embedding, so the
    rows of a batch are centred together and a batch of one history reads zero. Otherwise it is a function of the
    history's length, `running_mean + center_log_slope * log(n)`: batches grouped by length are centred on the mean
    embedding of histories of their length, which drifts with it, and a centre error shifts a history's logit in
    proportion to its length. `running_mean` follows the training batches (`momentum` per training pass, from zero,
    with no slope), as batch norm does; the package's `Trainer` replaces both before every evaluation with their
    fit over the training customers (`set_center`, from `TxFormerModel.embedding_sums`), as `update_bn` does.
    Computed in float32 whatever the model's dtype (the subtraction cancels most digits of a long history's sum)."""

    momentum = 0.05
    float32_buffers = ("running_mean", "center_log_slope")

    def __init__(self, config: TxFormerConfig):
        super().__init__()
        self.sum_scale = config.pooling_sum_scale
        self.register_buffer("running_mean", torch.zeros(config.hidden_size, dtype=torch.float32))
        self.register_buffer("center_log_slope", torch.zeros(config.hidden_size, dtype=torch.float32))

    def forward(self, embedding_sum: torch.Tensor, num_events: torch.Tensor) -> torch.Tensor:
        """`embedding_sum`: `[batch, hidden]`; `num_events`: `[batch]` real events read. Returns float32."""
        embedding_sum = embedding_sum.float()
        count = num_events.float()[:, None]
        if self.training:
            center = embedding_sum.sum(dim=0) / count.sum().clamp(min=1)
            with torch.no_grad():
                self.running_mean.lerp_(center, self.momentum)
        else:
            center = self.center(num_events)
        return (embedding_sum - count * center) / self.sum_scale

    def center(self, num_events: torch.Tensor) -> torch.Tensor:
        """The centre outside training of histories of `num_events` `[batch]` events, `[batch, hidden]`."""
        return self.running_mean + self.center_log_slope * num_events.float().clamp(min=1).log()[:, None]

    @torch.no_grad()
    def set_center(self, mean: torch.Tensor, log_slope: torch.Tensor | None = None) -> None:
        """Sets the centre outside training to `mean + log_slope * log(n)` (`[hidden]` each; no slope: `mean`)."""
        self.running_mean.copy_(mean)
        if log_slope is None:
            self.center_log_slope.zero_()
        else:
            self.center_log_slope.copy_(log_slope)


class TxFormerPreTrainedModel(PreTrainedModel):
    config: TxFormerConfig
    config_class = TxFormerConfig
    base_model_prefix = "txformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TxFormerLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = False
    # Folders saved before the readout's centre had a slope in the log length load with a constant centre (slope 0).
    _keys_to_ignore_on_load_missing = [r"embedding_readout\.center_log_slope$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (TxFormerNumericEncoder, TxFormerTimeEncoder, TxFormerRotaryEmbedding)):
            module.reset_frequencies()
        elif isinstance(module, TxFormerEventEmbeddings) and module.pair_embedding is not None:
            init.zeros_(module.pair_embedding.weight)
        elif isinstance(module, TxFormerPooler) and module.sum_weight is not None:
            init.zeros_(module.sum_weight)
        elif isinstance(module, TxFormerEmbeddingReadout):
            init.zeros_(module.running_mean)
            init.zeros_(module.center_log_slope)
        elif isinstance(module, TxFormerSelfAttention):
            module.reset_buffers()

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """A valid padded batch of two histories (7 and 4 events) for this model's config."""
        config = self.config
        generator = torch.Generator().manual_seed(0)
        batch_size, length = 2, 7
        input_ids = torch.stack(
            [
                torch.randint(1, size, (batch_size, length), generator=generator)
                for size in config.categorical_vocab_sizes
            ],
            dim=-1,
        )
        numeric_values = torch.randn(batch_size, length, len(config.numeric_fields), generator=generator) * 1e3
        event_time = torch.cumsum(torch.rand(batch_size, length, generator=generator) * 3, dim=1)
        attention_mask = torch.ones(batch_size, length, dtype=torch.long)
        attention_mask[1, 4:] = 0
        input_ids[1, 4:] = 0
        numeric_values[1, 4:] = 0
        return {
            "input_ids": input_ids.to(self.device),
            "numeric_values": numeric_values.to(self.device),
            "event_time": event_time.to(self.device),
            "attention_mask": attention_mask.to(self.device),
        }

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`; a remote-code model's `auto_map` names every class of `AUTO_CLASSES`,
        so the folder loads as the encoder (`AutoModel`, with this model's encoder weights) or as any head."""
        if self.is_remote_code():
            config_class, model_module = type(self.config), __name__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **getattr(self.config, "auto_map", {}),
                "AutoConfig": f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}",
                **{name: f"{model_module}.{model_class.__name__}" for name, model_class in AUTO_CLASSES.items()},
            }
        super().save_pretrained(save_directory, *args, **kwargs)

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """[`PreTrainedModel.activation_checkpointing_enable`] (also reached through `gradient_checkpointing_enable` and
        the Trainer's flags); refused with `reversible_layers`, which recompute every layer in the backward pass
        already."""
        if self.config.reversible_layers:
            raise ValueError(
                "reversible_layers already recompute every layer in the backward pass: activation (gradient) "
                "checkpointing cannot be combined with them; use one or the other."
            )
        super().activation_checkpointing_enable(*args, **kwargs)

    def begin_optimizer_step(self, step: int) -> None:
        """Runs every attention layer's per-optimizer-step hook (the Performer's redraw) before the first forward pass
        of optimizer step `step`; `AttentionStepCallback` does it under the `Trainer`."""
        for module in self.modules():
            if isinstance(module, TxFormerSelfAttention):
                module.begin_optimizer_step(step)


class TxFormerModel(TxFormerPreTrainedModel):
    """The bare TxFormer encoder: event embeddings, transformer layers, final norm and pooling."""

    def __init__(self, config: TxFormerConfig):
        super().__init__(config)
        self.embeddings = TxFormerEventEmbeddings(config)
        self.event_context = TxFormerEventContext(config) if config.event_context_size > 0 else None
        self.rotary_emb = TxFormerRotaryEmbedding(config) if config.position_embedding_type == "rotary" else None
        self.layers = nn.ModuleList(TxFormerLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = TxFormerPooler(config)
        self.embedding_readout = TxFormerEmbeddingReadout(config) if config.embedding_sum_readout else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> TxFormerEventEmbeddings:
        """The event embeddings (what `enable_input_require_grads` hooks for gradient checkpointing and adapters)."""
        return self.embeddings

    def set_input_embeddings(self, value: TxFormerEventEmbeddings) -> None:
        self.embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_state: TxFormerState | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_last_hidden_state: bool = True,
        **kwargs,
    ) -> TxFormerModelOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, length, num_categorical_fields)`):
            Index of each categorical field of each event (0 = padding, 1 = unknown).
        numeric_values (`torch.FloatTensor` of shape `(batch, length, num_numeric_fields)`):
            Raw numeric fields (e.g. signed amounts); the model applies the signed log itself.
        event_time (`torch.FloatTensor` of shape `(batch, length)`):
            Time of each event in days (fractional part = time of day).
        attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            1 for real events, 0 for padding (right padding). Defaults to all events real.
        past_state ([`TxFormerState`], *optional*):
            Streaming kinds only (the ∞-former): the state returned by a previous call, to continue reading the same
            histories.
        output_last_hidden_state (`bool`, defaults to `True`):
            Streaming kinds only: `False` skips the per-event outputs (`last_hidden_state` is then None, unless
            `output_hidden_states`), so that memory does not grow with the history length. The classifier passes it.
        """
        self._check_inputs(input_ids, numeric_values, event_time, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones(event_time.shape, dtype=torch.long, device=event_time.device)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        kind = ATTENTION_KINDS[self.config.attention_type]
        if output_attentions and self.config._attn_implementation not in kind.attention_weights:
            backends = kind.attention_weights
            logger.warning_once(
                f"attention_type={kind.name!r} has attention weights only under attn_implementation in "
                f"{list(backends)}, not {self.config._attn_implementation!r}: `attentions` is None."
                if backends
                else f"attention_type={kind.name!r} has no attention weights: `attentions` is None."
            )
            output_attentions = False
        streaming = kind.streaming
        if streaming is not None:
            return self._forward_in_segments(
                streaming,
                input_ids,
                numeric_values,
                event_time,
                attention_mask,
                past_state,
                output_hidden_states,
                return_event_states=output_last_hidden_state or output_hidden_states,
            )
        if past_state is not None:
            streaming_kinds = [name for name, kind in ATTENTION_KINDS.items() if kind.streaming is not None]
            raise ValueError(
                f"past_state is only used by the streaming attention kinds {streaming_kinds}, not "
                f"{self.config.attention_type!r}."
            )

        event_mask = attention_mask.bool()
        encoded = self._encode(
            input_ids,
            numeric_values,
            event_time,
            event_mask,
            TxFormerState(),
            output_attentions,
            output_hidden_states,
        )
        hidden_states = encoded.last_hidden_state
        num_events = event_mask.sum(dim=1)
        last_index = (num_events - 1).clamp(min=0)
        last_hidden = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_index]
        pooled = self.pooler(masked_sum(hidden_states, event_mask), num_events, last_hidden)
        if self.embedding_readout is not None:
            readout = self.embedding_readout(encoded.past_state.embedding_sum, num_events)
            pooled = pooled + readout.to(pooled.dtype)
        return TxFormerModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    def _encode(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        event_mask: torch.Tensor,
        state: TxFormerState,
        output_attentions: bool,
        output_hidden_states: bool,
        layers_keep_graph: bool = True,
    ) -> TxFormerModelOutput:
        """Embeddings, every layer and the final norm over one (segment of a) batch, continuing from `state` (its
        `last_event_time`, `event_context` and `layer_states`; empty for a history read in one call). Returns the
        hidden states, the per-layer outputs asked for, the state after this segment (`layer_states`,
        `event_context`, this segment's `embedding_sum`) and the attention's auxiliary loss. `layers_keep_graph=False`
        runs the layers without gradient (the embeddings keep theirs)."""
        hidden_states, event_context = self._embed(input_ids, numeric_values, event_time, event_mask, state)
        # Rows without a real event here keep the code of the event they read last.
        codes = input_ids[..., 0]
        last_event_code = codes[:, -1] if state.last_event_code is None else state.last_event_code
        last_event_code = torch.where(event_mask.any(dim=1), codes[:, -1], last_event_code)
        # In float32: the readout subtracts a multiple of the count from this sum, which cancels most of its digits.
        embedding_sum = None if self.embedding_readout is None else masked_sum(hidden_states.float(), event_mask)
        attention_mask = build_attention_mask(self.config, hidden_states, event_mask)
        position_embeddings = None if self.rotary_emb is None else self.rotary_emb(hidden_states.shape[1])
        layer_states = state.layer_states or (None,) * len(self.layers)
        layer_inputs = {
            "attention_mask": attention_mask,
            "key_mask": event_mask,
            "position_embeddings": position_embeddings,
        }
        with torch.set_grad_enabled(torch.is_grad_enabled() and layers_keep_graph):
            hidden_states, all_hidden_states, all_attentions, new_states = self._run_layers(
                hidden_states, layer_states, layer_inputs, output_hidden_states, output_attentions
            )
            aux_losses = [
                layer.self_attn.auxiliary_loss(new_state)
                for layer, new_state in zip(self.layers, new_states, strict=True)
            ]
            aux_losses = [aux_loss for aux_loss in aux_losses if aux_loss is not None]
            # As in transformers' models: the last entry of `hidden_states` is the normed output.
            hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return TxFormerModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            past_state=TxFormerState(
                layer_states=tuple(new_states),
                event_context=event_context,
                last_event_code=last_event_code,
                embedding_sum=embedding_sum,
            ),
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
        )

    def _embed(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        event_mask: torch.Tensor,
        state: TxFormerState,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layers' input over one (segment of a) batch: the event embeddings, mixed with the events before them
        when the model has an event context; and that context after this segment (None without one)."""
        hidden_states = self.embeddings(
            input_ids, numeric_values, event_time, state.last_event_time, state.last_event_code
        )
        if self.event_context is None:
            return hidden_states, None
        return self.event_context(hidden_states, event_mask, state.event_context)

    @torch.no_grad()
    def embedding_sums(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per history, the float32 sum of the embeddings that the embedding readout adds up, `[batch, hidden]`, and
        its number of real events, `[batch]`; without running the layers: what the readout's centre outside
        training is fitted on (`TxFormerEmbeddingReadout.set_center`)."""
        self._check_inputs(input_ids, numeric_values, event_time, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones(event_time.shape, dtype=torch.long, device=event_time.device)
        event_mask = attention_mask.bool()
        hidden_states, _ = self._embed(input_ids, numeric_values, event_time, event_mask, TxFormerState())
        return masked_sum(hidden_states.float(), event_mask), event_mask.sum(dim=1)

    def _run_layers(
        self,
        hidden_states: torch.Tensor,
        layer_states: tuple[Any, ...],
        layer_inputs: dict[str, Any],
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None, tuple[Any, ...]]:
        """Every layer over `hidden_states`, each continuing from its state. Returns the output, the input of every
        layer and its attention weights when asked for, and every layer's next state.

        Reversible layers couple two streams that start as copies of `hidden_states` and end averaged; a layer's
        input is reported as the average of the two. They run through [`ReversibleLayersFunction`] (memory that
        does not grow with depth) when gradients are recorded and no per-layer output is asked for; otherwise
        through ordinary autograd, which gives the same values and gradients."""
        reversible = self.config.reversible_layers
        if reversible and torch.is_grad_enabled() and not (output_hidden_states or output_attentions):
            first, second, new_states = reversible_layers(self.layers, hidden_states, layer_states, layer_inputs)
            return (first + second) / 2, None, None, new_states
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        first, second, new_states = hidden_states, hidden_states, []
        for layer, layer_state in zip(self.layers, layer_states, strict=True):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if reversible:
                first, second, attn_weights, new_state = layer.reversible_forward(
                    first, second, **layer_inputs, past_state=layer_state
                )
                hidden_states = (first + second) / 2
            else:
                hidden_states, attn_weights, new_state = layer(hidden_states, **layer_inputs, past_state=layer_state)
            new_states.append(new_state)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions, tuple(new_states)

    def _forward_in_segments(
        self,
        streaming: Streaming,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor,
        past_state: TxFormerState | None,
        output_hidden_states: bool,
        return_event_states: bool,
    ) -> TxFormerModelOutput:
        """A streaming kind (the ∞-former): read each history segment by segment, carrying the layers' state (the
        long-term memory).

        Histories are aligned to their end (the right padding is moved to the left), so the last segment of every row
        holds its `segment_length` most recent events and earlier segments carry the rest into the state. Each
        segment is gathered from the inputs when it is read, and when the kind detaches the state between segments
        (`ltm_detach_memory`), earlier segments run without gradient: with `return_event_states=False`, memory does
        not grow with the history length (in training with `embedding_sum_readout`, the embeddings of every segment
        keep their gradient, so it grows with the training windows, not with the layers).
        """
        segment_length = streaming.segment_length(self.config)
        detach_state = streaming.detach_state(self.config)
        batch_size, length = event_time.shape
        num_segments = max(1, math.ceil(length / segment_length))
        num_real = attention_mask.sum(dim=1)
        # Slot j of the end-aligned layout holds input position j - shift (slots before shift are padding).
        shift = num_segments * segment_length - num_real

        state = past_state or TxFormerState()
        if state.num_events is not None and state.num_events.shape[0] != batch_size:
            raise ValueError(
                f"past_state holds the memory of {state.num_events.shape[0]} rows, the batch has {batch_size}."
            )
        # Padding slots (all at the left) take the time of the event read last, or of the row's first event, so no
        # gap is invented between padding and the first real event.
        previous_event_time = event_time[:, 0] if state.last_event_time is None else state.last_event_time
        hidden_size = self.config.hidden_size
        pooled_sum = (
            state.pooled_sum if state.pooled_sum is not None else event_time.new_zeros(batch_size, hidden_size)
        )
        events_read = state.num_events if state.num_events is not None else num_real.new_zeros(batch_size)
        embedding_sum = None
        if self.embedding_readout is not None:
            embedding_sum = state.embedding_sum if state.embedding_sum is not None else torch.zeros_like(pooled_sum)
        last_hidden = state.last_hidden_state
        if last_hidden is None:
            last_hidden = event_time.new_zeros(batch_size, hidden_size)
        layer_states, event_context, last_event_code = state.layer_states, state.event_context, state.last_event_code

        segment_outputs, segment_hidden_states, aux_loss = [], [], None
        # The slots left of every row's first event are padding in all rows: the reading starts at the first real
        # one, so a batch of short histories does not pay for whole segments of padding (not in a graph, whose shapes
        # cannot depend on the data).
        first_slot = 0 if torch.compiler.is_compiling() else min(int(shift.min()), num_segments * segment_length - 1)
        for segment_index in range(first_slot // segment_length, num_segments):
            start = max(segment_index * segment_length, first_slot)
            slots = torch.arange(start, (segment_index + 1) * segment_length, device=event_time.device)
            segment_mask = slots[None, :] >= shift[:, None]
            index = (slots[None, :] - shift[:, None]).clamp(min=0, max=length - 1)
            segment_time = torch.where(
                segment_mask, gather_events(event_time, index, segment_mask), previous_event_time[:, None]
            )
            # Rows whose history starts in a later segment hold only padding here and keep their state, so they are
            # left out; not in a graph (`torch.compile`, `torch.export`), whose shapes cannot depend on the data.
            started = segment_mask[:, -1]
            skips_rows = not torch.compiler.is_compiling() and not started.all() and started.any()
            rows = started.nonzero().squeeze(1) if skips_rows else None
            inputs = (
                gather_events(input_ids, index, segment_mask),
                gather_events(numeric_values, index, segment_mask),
                segment_time,
                segment_mask,
            )
            carried_states, carried_context, carried_time, carried_code = select_rows(
                (layer_states, event_context, previous_event_time, last_event_code), rows
            )
            # Detached segments run without gradient, except through the embedding readout, which every event feeds.
            keeps_graph = not detach_state or segment_index == num_segments - 1
            with torch.set_grad_enabled(
                torch.is_grad_enabled() and (keeps_graph or self.embedding_readout is not None)
            ):
                encoded = self._encode(
                    *select_rows(inputs, rows),
                    TxFormerState(
                        layer_states=carried_states,
                        event_context=carried_context,
                        last_event_time=carried_time,
                        last_event_code=carried_code,
                    ),
                    output_attentions=False,
                    output_hidden_states=output_hidden_states,
                    layers_keep_graph=keeps_graph,
                )
            # The auxiliary loss of the last segment averages over every segment read (the layers carry its sums).
            aux_loss = encoded.aux_loss
            hidden_states = scatter_rows(None, rows, encoded.last_hidden_state, batch_size)
            layer_states = scatter_rows(layer_states, rows, encoded.past_state.layer_states, batch_size)
            event_context = scatter_rows(event_context, rows, encoded.past_state.event_context, batch_size)
            last_event_code = scatter_rows(last_event_code, rows, encoded.past_state.last_event_code, batch_size)
            if detach_state:
                layer_states = tuple(layer_state.detach() for layer_state in layer_states)
                event_context = None if event_context is None else event_context.detach()
            previous_event_time = segment_time[:, -1]
            pooled_sum = pooled_sum + masked_sum(hidden_states, segment_mask)
            if embedding_sum is not None:
                embedding_sum = embedding_sum + scatter_rows(None, rows, encoded.past_state.embedding_sum, batch_size)
            last_hidden = torch.where(segment_mask[:, -1:], hidden_states[:, -1], last_hidden)
            if return_event_states:
                segment_outputs.append(hidden_states)
                segment_hidden_states.append(scatter_rows(None, rows, encoded.hidden_states, batch_size))
        events_read = events_read + num_real

        # The running sums are float32 (like `event_time`); the head takes the model's dtype.
        pooled = self.pooler(pooled_sum, events_read, last_hidden)
        if self.embedding_readout is not None:
            pooled = pooled + self.embedding_readout(embedding_sum, events_read)
        pooled = pooled.to(self.norm.weight.dtype)
        last_hidden_state, all_hidden_states = None, None
        if return_event_states:
            # Back to the caller's right-padded layout (the outputs start at `first_slot`).
            right_index = torch.arange(length, device=event_time.device)[None, :] + shift[:, None] - first_slot
            right_index = right_index.clamp(max=num_segments * segment_length - first_slot - 1)

            def unalign(tensor: torch.Tensor) -> torch.Tensor:
                restored = tensor.gather(1, right_index[..., None].expand(-1, -1, tensor.shape[-1]))
                return restored.masked_fill(~attention_mask.bool()[..., None], 0)

            last_hidden_state = unalign(torch.cat(segment_outputs, dim=1))
            if output_hidden_states:
                all_hidden_states = tuple(
                    unalign(torch.cat(per_layer, dim=1)) for per_layer in zip(*segment_hidden_states, strict=True)
                )
        return TxFormerModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=all_hidden_states,
            past_state=TxFormerState(
                layer_states=layer_states,
                pooled_sum=pooled_sum,
                num_events=events_read,
                last_hidden_state=last_hidden,
                last_event_time=previous_event_time,
                last_event_code=last_event_code,
                event_context=event_context,
                embedding_sum=embedding_sum,
            ),
            aux_loss=aux_loss,
        )

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """Clear errors for inputs that do not match the config (instead of an index error deep inside)."""
        batch_size, length = event_time.shape
        expected = {
            "input_ids": (input_ids, (batch_size, length, len(self.config.categorical_fields))),
            "numeric_values": (numeric_values, (batch_size, length, len(self.config.numeric_fields))),
        }
        if attention_mask is not None:
            expected["attention_mask"] = (attention_mask, (batch_size, length))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} (batch, length, fields).")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer indices, got {input_ids.dtype}.")


def gather_events(events: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`events[b, index[b, j]]` for every slot `j` (`index`, `mask`: `[batch, slots]`), zero where `mask` is False."""
    trailing = [1] * (events.dim() - 2)
    batch_size, num_slots = index.shape
    gathered = events.gather(1, index.view(batch_size, num_slots, *trailing).expand(-1, -1, *events.shape[2:]))
    return gathered.masked_fill(~mask.view(batch_size, num_slots, *trailing), 0)


def select_rows(value, rows: torch.Tensor | None):
    """The batch rows `rows` of a tensor, or of every tensor in a tuple or dataclass of them (None: all rows)."""
    if rows is None or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows)
    if isinstance(value, tuple):
        return tuple(select_rows(item, rows) for item in value)
    return replace(value, **{field.name: select_rows(getattr(value, field.name), rows) for field in fields(value)})


def scatter_rows(value, rows: torch.Tensor | None, part, batch_size: int):
    """`value` (a structure as in `select_rows`, or None for zeros) with its batch rows `rows` replaced by `part`
    (None: `part` holds every row)."""
    if rows is None or part is None:
        return part
    if isinstance(part, torch.Tensor):
        base = part.new_zeros(batch_size, *part.shape[1:]) if value is None else value
        return base.index_copy(0, rows, part)
    if isinstance(part, tuple):
        values = (None,) * len(part) if value is None else value
        return tuple(scatter_rows(old, rows, new, batch_size) for old, new in zip(values, part, strict=True))
    return replace(
        part,
        **{
            field.name: scatter_rows(
                None if value is None else getattr(value, field.name), rows, getattr(part, field.name), batch_size
            )
            for field in fields(part)
        },
    )


def masked_sum(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the events where `mask` is True; `where` rather than a product, so padded rows never leak NaN."""
    return torch.where(mask[..., None], hidden_states, 0).sum(dim=1)


class TxFormerForSequenceClassification(TxFormerPreTrainedModel):
    """TxFormer with a classification (or regression) head on the pooled history representation."""

    def __init__(self, config: TxFormerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.txformer = TxFormerModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_state: TxFormerState | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TxFormerSequenceClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Class indices (or float targets for regression). Under the Trainer, `num_items_in_batch` (a loss kwarg)
            makes the loss a sum over the whole gradient-accumulation step divided by its number of labels.
        """
        outputs = self.txformer(
            input_ids,
            numeric_values,
            event_time,
            attention_mask=attention_mask,
            past_state=past_state,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_last_hidden_state=False,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self.classification_loss(logits, labels, kwargs.get("num_items_in_batch"))
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss
        return TxFormerSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            past_state=outputs.past_state,
        )

    def classification_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Loss for `config.problem_type` (inferred from `num_labels` and the label dtype, as in transformers).
        With `num_items_in_batch`, a sum divided by it (correct under gradient accumulation); else a mean."""
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        reduction = "mean" if num_items_in_batch is None else "sum"
        logits = logits.float()
        labels = labels.to(logits.device)
        if self.config.problem_type == "regression":
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float().view(-1), reduction=reduction)
        elif self.config.problem_type == "single_label_classification":
            loss = nn.functional.cross_entropy(logits, labels.view(-1), reduction=reduction, ignore_index=-100)
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction=reduction)
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        return loss


@dataclass
class TxFormerContrastiveOutput(ModelOutput):
    """Output of [`TxFormerForContrastivePretraining`].

    Args:
        loss: contrastive loss over the batch, when `slice_labels` are given.
        embeddings: L2-normalised embedding of every history, `[batch, embedding_size]` (float32).
        hidden_states, attentions, past_state: as in [`TxFormerModelOutput`].
    """

    loss: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    past_state: TxFormerState | None = None


@dataclass
class TxFormerMaskedEventModelingOutput(ModelOutput):
    """Output of [`TxFormerForMaskedEventModeling`].

    Args:
        loss: sum over the predicted targets of their mean cross-entropy on the masked events.
        field_logits: per `config.masked_prediction_fields`, logits over the field's vocabulary for every event,
            `[batch, length, vocab_size]`.
        amount_logits: logits over the amount buckets for every event, `[batch, length, num_buckets]` (None without
            `amount_bucket_boundaries`).
        masked_events: the events that were masked, `[batch, length]` (bool).
        hidden_states, attentions: as in [`TxFormerModelOutput`].
    """

    loss: torch.Tensor | None = None
    field_logits: tuple[torch.Tensor, ...] | None = None
    amount_logits: torch.Tensor | None = None
    masked_events: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def margin_contrastive_loss(
    embeddings: torch.Tensor, groups: torch.Tensor, margin: float, num_negatives: int
) -> torch.Tensor:
    """Contrastive loss with hard-negative pairs (CoLES, as in pytorch-lifestream): `d²` for every pair of slices of
    one group, `relu(margin - d)²` for each slice and its `num_negatives` nearest slices of other groups (Euclidean
    `d`); the mean over these pairs (a sum would scale the gradient, and so the Trainer's clipping, with the batch).

    Args:
        embeddings: `[num_slices, dim]`.
        groups: `[num_slices]`, the group (customer) of each slice; slices of one group are positives.
    """
    same_group = groups[:, None] == groups[None, :]
    first, second = torch.triu(same_group, diagonal=1).nonzero(as_tuple=True)
    if first.numel() == 0:
        raise ValueError("slice_labels name no group with two slices: the contrastive loss has no positive pair.")
    positive_losses = nn.functional.pairwise_distance(embeddings[first], embeddings[second]).pow(2)

    # Negatives are picked by distance, without gradient; a slice with fewer negatives uses all it has.
    distances = torch.cdist(embeddings.detach().float(), embeddings.detach().float())
    distances = distances.masked_fill(same_group, math.inf)
    nearest, negatives = distances.topk(min(num_negatives, len(groups) - 1), dim=1, largest=False)
    is_negative = nearest.isfinite()
    anchors = torch.arange(len(groups), device=groups.device)[:, None].expand_as(negatives)
    negative_distances = nn.functional.pairwise_distance(
        embeddings[anchors[is_negative]], embeddings[negatives[is_negative]]
    )
    negative_losses = nn.functional.relu(margin - negative_distances).pow(2)
    return torch.cat([positive_losses, negative_losses]).mean()


def info_nce_loss(embeddings: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax contrastive loss with several positives per anchor (SupCon): for each slice, the mean over its positives
    of `-log softmax(cos / temperature)` taken over every other slice; the mean over slices that have a positive."""
    not_self = ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    positives = (groups[:, None] == groups[None, :]) & not_self
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        raise ValueError("slice_labels name no group with two slices: the contrastive loss has no positive pair.")
    logits = (embeddings @ embeddings.T / temperature).masked_fill(~not_self, -math.inf)
    log_probabilities = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive_log_probabilities = torch.where(positives, log_probabilities, 0).sum(dim=1)
    losses = -positive_log_probabilities[has_positive] / positives.sum(dim=1)[has_positive]
    return losses.mean()


class TxFormerForContrastivePretraining(TxFormerPreTrainedModel):
    """TxFormer with a projection of the pooled history to an L2-normalised embedding, pretrained contrastively
    (CoLES): slices of one customer's history are positives, slices of the other customers of the batch negatives."""

    # The loss is a mean over the batch's pairs: the Trainer divides it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: TxFormerConfig):
        super().__init__(config)
        self.txformer = TxFormerModel(config)
        self.projection = nn.Linear(config.hidden_size, config.embedding_size or config.hidden_size)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        slice_labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TxFormerContrastiveOutput:
        r"""
        slice_labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
            The customer (any integer id) of each row: rows of one customer are positives, all others negatives.
        """
        outputs = self.txformer(
            input_ids,
            numeric_values,
            event_time,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_last_hidden_state=False,
        )
        embeddings = nn.functional.normalize(self.projection(outputs.pooler_output).float(), dim=-1)
        loss = None
        if slice_labels is not None:
            slice_labels = slice_labels.to(embeddings.device)
            if self.config.contrastive_loss == "margin":
                loss = margin_contrastive_loss(
                    embeddings, slice_labels, self.config.contrastive_margin, self.config.contrastive_negatives
                )
            else:
                loss = info_nce_loss(embeddings, slice_labels, self.config.contrastive_temperature)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss
        return TxFormerContrastiveOutput(
            loss=loss,
            embeddings=embeddings,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            past_state=outputs.past_state,
        )


class TxFormerForMaskedEventModeling(TxFormerPreTrainedModel):
    """TxFormer pretrained by masked event modelling (BERT-style): a share of the real events is masked, and the model
    predicts their categorical fields (MCC, transaction type) and amount bucket from the other events.

    A masked event keeps its time; its categorical fields take the padding index (whose embedding is zero) and its
    amount is zero. Real events never have all-zero categorical embeddings, so the model tells masked events apart,
    and since the replacement is made on the inputs, no feature the encoder derives from them sees the masked values.
    """

    # The loss is a mean over the batch's masked events: the Trainer divides it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: TxFormerConfig):
        super().__init__(config)
        self.txformer = TxFormerModel(config)
        self.transform = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            ACT2FN[config.hidden_act],
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        )
        self.field_indices = [config.categorical_fields.index(name) for name in config.masked_prediction_fields]
        self.field_decoders = nn.ModuleList(
            nn.Linear(config.hidden_size, config.categorical_vocab_sizes[index]) for index in self.field_indices
        )
        num_buckets = len(config.amount_bucket_boundaries) + 1 if config.amount_bucket_boundaries else 0
        self.amount_decoder = nn.Linear(config.hidden_size, num_buckets) if num_buckets else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        numeric_values: torch.Tensor,
        event_time: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_events: torch.Tensor | None = None,
        return_loss: bool = True,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TxFormerMaskedEventModelingOutput:
        r"""
        masked_events (`torch.BoolTensor` of shape `(batch, length)`, *optional*):
            Events to mask (only real ones are). Default: each real event with probability `config.mask_probability`,
            drawn anew at every call (training and evaluation).
        return_loss (`bool`, defaults to `True`):
            Compute the loss (the targets are the inputs themselves, so the Trainer gets an evaluation loss).
        """
        if attention_mask is None:
            attention_mask = torch.ones(event_time.shape, dtype=torch.long, device=event_time.device)
        real_events = attention_mask.bool()
        if masked_events is None:
            masked_events = torch.rand(event_time.shape, device=event_time.device) < self.config.mask_probability
        masked_events = masked_events.bool() & real_events
        outputs = self.txformer(
            input_ids.masked_fill(masked_events[..., None], 0),
            numeric_values.masked_fill(masked_events[..., None], 0),
            event_time,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = self.transform(outputs.last_hidden_state)
        field_logits = tuple(decoder(hidden_states) for decoder in self.field_decoders)
        amount_logits = None if self.amount_decoder is None else self.amount_decoder(hidden_states)
        loss = None
        if return_loss:
            targets = [input_ids[..., index] for index in self.field_indices]
            logits = list(field_logits)
            if amount_logits is not None:
                targets.append(self.amount_buckets(numeric_values[..., 0]))
                logits.append(amount_logits)
            num_masked = masked_events.sum().clamp(min=1)
            # A sum over the masked events divided by their number: zero (with a graph) when none is masked.
            loss = sum(
                nn.functional.cross_entropy(
                    logit[masked_events].float(), target[masked_events].to(logit.device), reduction="sum"
                )
                / num_masked
                for logit, target in zip(logits, targets, strict=True)
            )
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss
        return TxFormerMaskedEventModelingOutput(
            loss=loss,
            field_logits=field_logits,
            amount_logits=amount_logits,
            masked_events=masked_events,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def amount_buckets(self, amounts: torch.Tensor) -> torch.Tensor:
        """Bucket of each amount: `i` such that `boundaries[i - 1] < amount <= boundaries[i]`."""
        boundaries = torch.tensor(self.config.amount_bucket_boundaries, dtype=torch.float32, device=amounts.device)
        return torch.bucketize(amounts.float(), boundaries)


# The Auto class each TxFormer model loads as. `save_pretrained` names them all in `auto_map`, so any saved folder
# loads (with trust_remote_code) as the encoder or as any head.
AUTO_CLASSES: dict[str, type[TxFormerPreTrainedModel]] = {
    "AutoModel": TxFormerModel,
    "AutoModelForSequenceClassification": TxFormerForSequenceClassification,
    "AutoModelForPreTraining": TxFormerForContrastivePretraining,
    "AutoModelForMaskedLM": TxFormerForMaskedEventModeling,
}


__all__ = [
    "AUTO_CLASSES",
    "TxFormerPreTrainedModel",
    "TxFormerModel",
    "TxFormerForSequenceClassification",
    "TxFormerForContrastivePretraining",
    "TxFormerForMaskedEventModeling",
    "TxFormerState",
]
