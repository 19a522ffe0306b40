"""The methods the benchmark compares, and how each is built: a TxFormer model (or one of its attention layers) of
every registered attention kind (exact attention once per backend: the exact SDPA and the naive softmax peers), plus
the public implementations of a kind inside the same model, so that only the attention differs: performer-pytorch's
`FastAttention` for the Performer; transformers' `LSHSelfAttention` and reformer-pytorch's `LSHAttention` for the
Reformer."""

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, ReformerConfig
from transformers.models.reformer.modeling_reformer import LSHSelfAttention

from txformer.attention_full import TxFormerSelfAttention
from txformer.attention_performer import TxFormerPerformerAttention
from txformer.attention_reformer import TxFormerReformerAttention
from txformer.configuration_txformer import ATTENTION_KINDS, TxFormerConfig
from txformer.machine import installed_version
from txformer.modeling_txformer import TxFormerForSequenceClassification


@dataclass(frozen=True)
class Method:
    """One way of attending.

    Args:
        name: key used on the command line and in the CSV.
        label: how tables and plots name it.
        attention_type: the config's `attention_type`.
        attn_implementation: the backend of exact attention (`"sdpa"` or `"eager"`).
        time_exponent: how its time grows with the length (2: quadratic, 1: linear), to skip lengths that would run
            past the time budget.
        memory_exponent: the same for its memory (2: the eager score matrix).
        requires: a package that must be installed (a peer), or None.
    """

    name: str
    label: str
    attention_type: str
    attn_implementation: str = "sdpa"
    time_exponent: int = 1
    memory_exponent: int = 1
    requires: str | None = None

    @property
    def available(self) -> bool:
        """Whether its package is installed."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


# Exact attention runs with each backend: SDPA (the exact reference) and eager (the naive softmax, whose score matrix
# makes its memory quadratic).
EXACT_BACKENDS = {"sdpa": "exact, SDPA", "eager": "naive softmax, eager"}
# Public implementations of a kind, run inside our layer after it; ratios against a peer are against the first.
PEER_METHODS = {
    "performer": (
        Method("performer_pytorch", "performer-pytorch FastAttention", "performer", requires="performer_pytorch"),
    ),
    "reformer": (
        Method("reformer_transformers", "transformers LSHSelfAttention", "reformer", requires="transformers"),
        Method("reformer_pytorch", "reformer-pytorch LSHAttention", "reformer", requires="reformer_pytorch"),
    ),
}


def kind_methods() -> list[Method]:
    """Every registered attention kind: exact attention once per backend, any other kind once, then its peers."""
    methods = []
    for kind in ATTENTION_KINDS.values():
        if kind.attention_class is TxFormerSelfAttention:
            methods += [
                Method(
                    f"{kind.name}_{backend}",
                    f"{kind.name} ({label})",
                    kind.name,
                    backend,
                    time_exponent=kind.time_exponent,
                    memory_exponent=2 if backend == "eager" else 1,
                )
                for backend, label in EXACT_BACKENDS.items()
            ]
        else:
            methods.append(
                Method(kind.name, f"{kind.name} ({kind.label})", kind.name, time_exponent=kind.time_exponent)
            )
        methods += PEER_METHODS.get(kind.name, ())
    return methods


METHODS: dict[str, Method] = {method.name: method for method in kind_methods()}
# The reference every other method is compared with at the same length, and ours against its public peers.
EXACT_REFERENCE = "full_sdpa"
PEERS = {kind: tuple(peer.name for peer in peers) for kind, peers in PEER_METHODS.items()}


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peer packages (None: not installed)."""
    packages = sorted({method.requires for method in METHODS.values() if method.requires})
    return {package: installed_version(package.replace("_", "-")) for package in packages}


class PerformerPytorchAttention(TxFormerPerformerAttention):
    """Our Performer layer (same projections, same random features) with performer-pytorch's `FastAttention` as
    its core, padding handled as performer-pytorch's `SelfAttention` does (padded values zeroed)."""

    def __init__(self, config: TxFormerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        from performer_pytorch import FastAttention

        self.fast_attention = FastAttention(
            dim_heads=self.head_dim,
            nb_features=config.performer_num_random_features,
            ortho_scaling=config.performer_orthogonal_scaling,
        )
        self.fast_attention.projection_matrix.copy_(self.projection_matrix)

    def attend(self, query, key, value, attention_mask, key_mask, **kwargs):
        value = value.masked_fill(~key_mask[:, None, :, None], 0.0)
        return self.fast_attention(query, key, value).transpose(1, 2), None


def benchmark_config(method: Method, overrides: str = "") -> TxFormerConfig:
    """The default TxFormer config (the one `scripts/train.py` trains) for a method, with `overrides` in the form of
    `--config_overrides` ("hidden_size=128,num_hidden_layers=4")."""
    config = TxFormerConfig(attention_type=method.attention_type, num_labels=2)
    if overrides:
        config.update_from_string(overrides)
        config.validate_architecture()
    return config


class TransformersLSHAttention(TxFormerReformerAttention):
    """Our Reformer layer with transformers' `LSHSelfAttention` (its shared-QK and value projections, without bias,
    and its core: rotations drawn at every call, padding in an extra bucket, no rotary positions) before our output
    projection. Histories must be a multiple of `lsh_chunk_length` long, or no longer than it."""

    def __init__(self, config: TxFormerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        reformer_config = ReformerConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=self.num_heads,
            attention_head_size=self.head_dim,
            num_hashes=config.lsh_num_hashes,
            num_buckets=config.lsh_num_buckets,
            lsh_attn_chunk_length=config.lsh_chunk_length,
            lsh_num_chunks_before=1,
            lsh_num_chunks_after=0,
            lsh_attention_probs_dropout_prob=config.attention_dropout_prob,
            is_decoder=False,
        )
        self.lsh_self_attention = LSHSelfAttention(reformer_config, layer_idx)

    def forward(self, hidden_states, attention_mask, key_mask, position_embeddings=None, past_state=None, **kwargs):
        output = self.lsh_self_attention(hidden_states, attention_mask=key_mask).hidden_states
        return self.o_proj(output), None, None


class ReformerPytorchAttention(TxFormerReformerAttention):
    """Our Reformer layer (same projections, rotary positions) with reformer-pytorch's `LSHAttention` as its core:
    buckets of `lsh_chunk_length` events (so length / lsh_chunk_length buckets, its rule), rotations drawn at every
    call, heads folded into the batch, histories padded to a multiple of twice the chunk length as its `Autopadder`
    does."""

    def __init__(self, config: TxFormerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        from reformer_pytorch.reformer_pytorch import LSHAttention

        self.lsh_attention = LSHAttention(
            dropout=config.attention_dropout_prob, bucket_size=config.lsh_chunk_length, n_hashes=config.lsh_num_hashes
        )

    def attend(self, query, key, value, attention_mask, key_mask, **kwargs):
        batch_size, num_heads, length, head_dim = query.shape
        fill = -length % (2 * self.chunk_length)
        shared, value = (nn.functional.pad(states, (0, 0, 0, fill)).flatten(0, 1) for states in (query, value))
        mask = nn.functional.pad(key_mask, (0, fill), value=False).repeat_interleave(num_heads, dim=0)
        output = self.lsh_attention(shared, value, input_mask=mask)[0]
        return output.view(batch_size, num_heads, -1, head_dim)[:, :, :length].transpose(1, 2), None


# The peers that replace our attention layer, by method name.
PEER_LAYERS = {
    "performer_pytorch": PerformerPytorchAttention,
    "reformer_transformers": TransformersLSHAttention,
    "reformer_pytorch": ReformerPytorchAttention,
}


def build_model(method: Method, config: TxFormerConfig, device: torch.device) -> TxFormerForSequenceClassification:
    """A freshly initialised classifier of the method on `device` (float32 weights; autocast sets the compute dtype)."""
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=method.attn_implementation)
    if method.name in PEER_LAYERS:
        for layer in model.txformer.layers:
            ours = layer.self_attn
            theirs = PEER_LAYERS[method.name](config, ours.layer_idx)
            theirs.load_state_dict(ours.state_dict(), strict=False)
            layer.self_attn = theirs
    return model.to(device)


def synthetic_batch(
    config: TxFormerConfig, batch_size: int, length: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of `batch_size` histories of exactly `length` events (no padding) with random fields and labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.stack(
        [torch.randint(2, size, (batch_size, length), generator=generator) for size in config.categorical_vocab_sizes],
        dim=-1,
    )
    amounts = torch.randn(batch_size, length, len(config.numeric_fields), generator=generator) * 1e3
    event_time = torch.cumsum(torch.rand(batch_size, length, generator=generator), dim=1)
    batch = {
        "input_ids": input_ids,
        "numeric_values": amounts,
        "event_time": event_time,
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    return {key: value.to(device) for key, value in batch.items()}
