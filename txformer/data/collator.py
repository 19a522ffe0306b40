"""Batching encoded customer histories into padded model inputs (a `DataCollator` for the HF `Trainer`)."""

from dataclasses import dataclass

import torch

# The bound is re-exported here for the reader and the tests: the collator pads with the processor's function.
from ..processing_txformer import MAX_NUMERIC_MAGNITUDE, pad_histories


__all__ = ["MAX_NUMERIC_MAGNITUDE", "TransactionCollator"]


@dataclass
class TransactionCollator:
    """Right-pads encoded histories into `input_ids` [batch, length, n_categorical] (0 = pad), `numeric_values`
    [batch, length, n_numeric] (raw amounts), `event_time` [batch, length] (days, shifted per row by whole weeks),
    `attention_mask` [batch, length] and `labels` [batch] when present. Keeps the most recent `max_length` events
    (None = all)."""

    categorical_fields: list[str]
    numeric_fields: list[str]
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive or None, got {self.max_length}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive or None, got {self.pad_to_multiple_of}.")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """The padded batch, built as the processor builds it (`pad_histories`, one source for both)."""
        return pad_histories(
            features,
            self.categorical_fields,
            self.numeric_fields,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
