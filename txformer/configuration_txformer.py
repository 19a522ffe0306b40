"""TxFormer model configuration."""

import contextvars
import dataclasses
import difflib
import itertools

from transformers import PreTrainedConfig
from transformers.configuration_utils import strict  # huggingface_hub.dataclasses.strict, as transformers uses it

from .attention_full import FULL_ATTENTION, AttentionKind
from .attention_infinity import INFINITY_ATTENTION
from .attention_local import LOCAL_ATTENTION
from .attention_performer import PERFORMER_ATTENTION
from .attention_reformer import REFORMER_ATTENTION


# The attention kinds by `attention_type`. A kind is one module, `attention_<kind>.py`, that defines its layer, its
# config fields and its `AttentionKind`; registering it here is all that generic code needs
# (docs/adding_an_attention_kind.md).
ATTENTION_KINDS: dict[str, AttentionKind] = {
    kind.name: kind
    for kind in (
        FULL_ATTENTION,
        PERFORMER_ATTENTION,
        INFINITY_ATTENTION,
        LOCAL_ATTENTION,
        REFORMER_ATTENTION,
    )
}
# Every kind's config fields are fields of `TxFormerConfig`, so a config keeps the settings of every kind.
ATTENTION_SETTINGS = tuple(kind.settings for kind in ATTENTION_KINDS.values() if kind.settings is not None)
POOLING_TYPES = ("mean", "sum", "mean_sum", "last")
POSITION_EMBEDDING_TYPES = ("rotary", "none")
CONTRASTIVE_LOSSES = ("margin", "infonce")
# Signed decades of the amount, from -10^8 to 10^8 (the real amounts reach about 1.5e8).
DEFAULT_AMOUNT_BUCKET_BOUNDARIES = (
    [-(10.0**power) for power in range(8, -1, -1)] + [0.0] + [10.0**power for power in range(9)]
)
# Set while a saved config is read back: its unknown keys are kept as they are (a newer version or a library helper
# may have written them), not checked for typos as the keys a user passes are.
_READING_SAVED_CONFIG = contextvars.ContextVar("txformer_reading_saved_config", default=False)


@strict
class TxFormerConfig(PreTrainedConfig, *ATTENTION_SETTINGS):
    r"""
    Configuration of a [`TxFormerModel`]: a transformer over event sequences (bank transactions) with a pluggable
    attention kind. `TxFormerConfig()` with no arguments is a valid small config.

    Event schema (the forward contract of every attention kind):
        categorical_fields (`list[str]`): names of the categorical event fields, one column of `input_ids` each.
        categorical_vocab_sizes (`list[int]`): vocabulary size of each categorical field, including index 0 =
            padding and index 1 = unknown.
        numeric_fields (`list[str]`): names of the numeric event fields, one column of `numeric_values` each. Raw
            values (e.g. signed amounts); the model applies `sign(x) * log1p(|x|)` once, itself.
        numeric_num_frequencies (`int`): learned periodic frequencies per numeric field (on top of the signed log).
        time_periods_days (`list[float]`): periods (days) of the cyclic time features taken from `event_time`,
            by default hour of day (1 day) and day of week (7 days).
        time_num_harmonics (`int`): sine/cosine harmonics per period. The gap to the previous event is always
            encoded as `log1p(gap in minutes)`.

    Architecture:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act: transformer sizes.
        hidden_dropout_prob, attention_dropout_prob, classifier_dropout: dropouts.
        layer_norm_eps, initializer_range: numerics of the norms and of the initialisation.
        pooling (`str`): `"mean"` over real events; `"sum"` over real events divided by `pooling_sum_scale` (the
            form of log-odds to which every event adds, read on one scale at any length); `"mean_sum"`: the mean plus a learned share of the sum over real
            events (scaled by `1 / pooling_sum_scale`), for evidence that accrues with the number of events; or the
            `"last"` real event.
        pooling_sum_scale (`float`): events that make the sum term of `"sum"`, `"mean_sum"` and the embedding
            readout count as much as the mean.
        embedding_sum_readout (`bool`): adds to the pooled history the sum of its event embeddings (the layers'
            input) over `pooling_sum_scale`, centred on the mean event embedding: a per-event readout beside the
            attention's, whose evidence accrues with the number of events over the whole history that the kind
            reads, and does not depend on what the layers make of long contexts (docs/long_histories.md).
        position_embedding_type (`str`): `"rotary"`: rotary embeddings of the event index on queries and keys, so
            attention sees which event comes before which, at any length and for every kind; `"none"`: attention
            sees a set of events (only their times tell the order).
        rope_theta (`float`): base of the rotary frequencies.
        event_pair_buckets (`int`): an embedding of each pair (previous code, code) of the first categorical field,
            hashed into this many rows (exact while the field's vocabulary size squared fits), added to the event; so
            a pair's own evidence is one lookup, as a bigram count is for a linear model. Starts at zero; 0 = off.
        event_context_size (`int`): each event's embedding is mixed with those of the `event_context_size` events
            before it (a causal convolution), so "code a followed by code b" is visible to every layer; 0 = off.
        attention_type (`str`): a kind of `ATTENTION_KINDS`: `"full"` (exact attention, `attn_implementation`
            picks SDPA, eager, flex or flash), `"performer"` (FAVOR+), `"infinity"` (∞-former), `"local"` (sliding
            window), ...
        reversible_layers (`bool`): reversible layers (RevNet coupling, as in the Reformer): the embeddings are
            duplicated into two streams `(X1, X2)`, each layer computes `Y1 = X1 + Attention(X2)` and
            `Y2 = X2 + MLP(Y1)` with the weights of an ordinary layer, and the encoder output is `(Y1 + Y2) / 2`. In
            training, the backward pass recovers each layer's inputs from its outputs instead of storing them, so
            activation memory does not grow with the number of layers (docs/reversible_layers.md). The same weights
            compute a different function from ordinary layers, so a model keeps the setting it was trained with.
            Activation checkpointing is refused with it (the layers are recomputed already).

    Attention kinds: each kind adds its own fields, documented in its settings class (`PerformerSettings` in
    `attention_performer.py`, `InfinitySettings` in `attention_infinity.py`, ...). A config holds the fields of every
    kind; those of the kinds it does not use are checked but have no effect.

    Contrastive pretraining ([`TxFormerForContrastivePretraining`], CoLES):
        embedding_size (`int`, *optional*): size of the L2-normalised embedding; defaults to `hidden_size`.
        contrastive_loss (`str`): `"margin"` (pairwise margin loss on hard negatives, the CoLES recipe) or
            `"infonce"` (softmax over every other slice of the batch, with a temperature).
        contrastive_margin (`float`): margin of the `"margin"` loss (Euclidean distance between unit vectors).
        contrastive_negatives (`int`): hardest negatives per slice of the `"margin"` loss.
        contrastive_temperature (`float`): temperature of the `"infonce"` loss.

    Masked event modelling ([`TxFormerForMaskedEventModeling`]):
        mask_probability (`float`): share of the real events masked in each history.
        masked_prediction_fields (`list[str]`, *optional*): categorical fields predicted at masked events; defaults to
            the first two (MCC and transaction type).
        amount_bucket_boundaries (`list[float]`, *optional*): increasing boundaries of the amount buckets predicted at
            masked events (raw units of the first numeric field; `len + 1` buckets); defaults to signed decades
            `[-1e8, ..., -1, 0, 1, ..., 1e8]`. An empty list predicts no amount.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification
    >>> from txformer import TxFormerConfig
    >>> config = TxFormerConfig(attention_type="performer")
    >>> model = AutoModelForSequenceClassification.from_config(config)
    ```
    """

    model_type = "txformer"
    # The Trainer's evaluation gathers every other output; the ∞-former's streaming state is not a prediction.
    keys_to_ignore_at_inference = ["past_state"]

    categorical_fields: list[str] | None = None
    categorical_vocab_sizes: list[int] | None = None
    numeric_fields: list[str] | None = None
    numeric_num_frequencies: int = 8
    time_periods_days: list[float] | None = None
    time_num_harmonics: int = 4

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.0
    classifier_dropout: float | None = None
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pooling: str = "mean"
    pooling_sum_scale: float = 256.0
    embedding_sum_readout: bool = False
    position_embedding_type: str = "rotary"
    rope_theta: float = 10000.0
    event_context_size: int = 2
    event_pair_buckets: int = 8192
    attention_type: str = "full"
    reversible_layers: bool = False

    embedding_size: int | None = None
    contrastive_loss: str = "margin"
    contrastive_margin: float = 0.5
    contrastive_negatives: int = 5
    contrastive_temperature: float = 0.1
    mask_probability: float = 0.15
    masked_prediction_fields: list[str] | None = None
    amount_bucket_boundaries: list[float] | None = None

    def __post_init__(self, **kwargs):
        if self.categorical_fields is None:
            self.categorical_fields = ["mcc_code", "tr_type", "term_id"]
        if self.categorical_vocab_sizes is None:
            self.categorical_vocab_sizes = [256, 128, 1024][: len(self.categorical_fields)]
        if self.numeric_fields is None:
            self.numeric_fields = ["amount"]
        if self.time_periods_days is None:
            self.time_periods_days = [1.0, 7.0]
        if self.masked_prediction_fields is None:
            self.masked_prediction_fields = list(self.categorical_fields[:2])
        if self.amount_bucket_boundaries is None:
            self.amount_bucket_boundaries = list(DEFAULT_AMOUNT_BUCKET_BOUNDARIES)
        # Both raise a plain ValueError before the strict-dataclass wrapper does.
        self.validate_architecture()
        self.validate_pretraining()
        if not _READING_SAVED_CONFIG.get():
            fields = [field.name for field in dataclasses.fields(self)]
            for key in kwargs:
                # Unknown keys are kept as attributes (transformers' rule); a near miss of a field is a typo.
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
                if close:
                    raise ValueError(f"Unknown config key {key!r}: did you mean {close[0]!r}?")
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "TxFormerConfig":
        """As [`PreTrainedConfig.from_dict`]; keys of a saved config that this version does not define are kept as
        attributes without the typo check that the keys a user passes get."""
        token = _READING_SAVED_CONFIG.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _READING_SAVED_CONFIG.reset(token)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: checks sizes and choices, and the fields of every attention kind."""
        if self.attention_type not in ATTENTION_KINDS:
            raise ValueError(f"Unknown attention_type {self.attention_type!r}; valid kinds: {list(ATTENTION_KINDS)}.")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"Unknown pooling {self.pooling!r}; valid choices: {list(POOLING_TYPES)}.")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"Unknown position_embedding_type {self.position_embedding_type!r}; valid choices: "
                f"{list(POSITION_EMBEDDING_TYPES)}."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type == "rotary" and head_dim % 2 != 0:
            raise ValueError(f"Rotary positions need an even head dimension, got {head_dim}.")
        if self.event_context_size < 0 or self.event_pair_buckets < 0 or self.rope_theta <= 0:
            raise ValueError("event_context_size and event_pair_buckets must be >= 0, rope_theta positive.")
        if len(self.categorical_vocab_sizes) != len(self.categorical_fields):
            raise ValueError(
                f"categorical_vocab_sizes has {len(self.categorical_vocab_sizes)} entries for "
                f"{len(self.categorical_fields)} categorical_fields {self.categorical_fields}."
            )
        if any(size < 2 for size in self.categorical_vocab_sizes):
            raise ValueError("Every categorical vocabulary needs at least the padding (0) and unknown (1) indices.")
        for kind in ATTENTION_KINDS.values():
            if kind.validate_settings is not None:
                kind.validate_settings(self)

    def validate_pretraining(self):
        """Part of `@strict`-powered validation: checks the settings of the pretraining heads."""
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(
                f"Unknown contrastive_loss {self.contrastive_loss!r}; valid losses: {list(CONTRASTIVE_LOSSES)}."
            )
        for name in ("contrastive_margin", "contrastive_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.contrastive_negatives < 1:
            raise ValueError(f"contrastive_negatives must be positive, got {self.contrastive_negatives}.")
        if self.embedding_size is not None and self.embedding_size < 1:
            raise ValueError(f"embedding_size must be positive (or None = hidden_size), got {self.embedding_size}.")
        if not 0.0 < self.mask_probability < 1.0:
            raise ValueError(f"mask_probability must lie in (0, 1), got {self.mask_probability}.")
        unknown = [name for name in self.masked_prediction_fields if name not in self.categorical_fields]
        if unknown or not self.masked_prediction_fields:
            raise ValueError(
                f"masked_prediction_fields {self.masked_prediction_fields} must name one or more of the "
                f"categorical_fields {self.categorical_fields}."
            )
        boundaries = self.amount_bucket_boundaries
        if any(low >= high for low, high in itertools.pairwise(boundaries)):
            raise ValueError(f"amount_bucket_boundaries must be strictly increasing, got {boundaries}.")
        if boundaries and not self.numeric_fields:
            raise ValueError("amount_bucket_boundaries needs a numeric field (the amount); give [] to predict none.")


__all__ = ["ATTENTION_KINDS", "TxFormerConfig"]
