"""Batching encoded customer histories into padded model inputs (a `DataCollator` for the HF `Trainer`)."""

import math
from dataclasses import dataclass

import numpy as np
import torch


DAYS_PER_WEEK = 7
# The model computes in float32: a larger magnitude becomes infinite there, and NaN after the signed log.
MAX_NUMERIC_MAGNITUDE = float(np.finfo(np.float32).max)


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
        """Builds the padded batch with numpy, one vectorised pass per field."""
        if not features:
            raise ValueError("Cannot collate an empty list of customers.")
        names = [*self.categorical_fields, *self.numeric_fields]
        kept_lengths = np.empty(len(features), dtype=np.int64)
        for row, feature in enumerate(features):
            num_events = len(feature["event_time"])
            if num_events == 0:
                raise ValueError(f"Customer {_customer(feature, row)} has no events.")
            for name in names:
                if name not in feature:
                    raise KeyError(
                        f"Customer {_customer(feature, row)} has no field {name!r} (fields: {list(feature)})."
                    )
                if len(feature[name]) != num_events:
                    raise ValueError(
                        f"Customer {_customer(feature, row)}: {name} has {len(feature[name])} values, {num_events} events."
                    )
            kept_lengths[row] = num_events if self.max_length is None else min(num_events, self.max_length)

        length = int(kept_lengths.max())
        if self.pad_to_multiple_of is not None:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        attention_mask = np.arange(length)[None, :] < kept_lengths[:, None]

        def padded(name: str, dtype) -> np.ndarray:
            # The most recent events are the last ones; the mask's True cells are filled row by row.
            kept = [
                np.asarray(feature[name], dtype=dtype)[-int(count) :]
                for feature, count in zip(features, kept_lengths, strict=True)
            ]
            values = np.zeros((len(features), length), dtype=dtype)
            values[attention_mask] = np.concatenate(kept)
            return values

        event_time = padded("event_time", np.float64)
        amounts = np.zeros((len(features), length, len(self.numeric_fields)))
        for index, name in enumerate(self.numeric_fields):
            amounts[..., index] = padded(name, np.float64)
        for values, what in ((event_time, "event_time"), (amounts, "numeric value")):
            not_finite = ~np.isfinite(values)
            if not_finite.any():
                row = int(np.flatnonzero(not_finite.reshape(len(features), -1).any(axis=1))[0])
                raise ValueError(f"Customer {_customer(features[row], row)} has a NaN or infinite {what}.")
            too_large = np.abs(values) > MAX_NUMERIC_MAGNITUDE
            if too_large.any():
                row = int(np.flatnonzero(too_large.reshape(len(features), -1).any(axis=1))[0])
                raise ValueError(
                    f"Customer {_customer(features[row], row)}: {what} {values[too_large][0]:g} is beyond "
                    f"±{MAX_NUMERIC_MAGNITUDE:g}, the float32 range of the model."
                )
        # float32 keeps ~1 s resolution only near 0: shift each row by whole weeks before its first kept event, which
        # leaves hour of day, day of week and gaps unchanged.
        week_start = DAYS_PER_WEEK * np.floor(event_time[:, 0] / DAYS_PER_WEEK)
        event_time = np.where(attention_mask, event_time - week_start[:, None], 0.0)

        input_ids = np.zeros((len(features), length, len(self.categorical_fields)), dtype=np.int64)
        for index, name in enumerate(self.categorical_fields):
            input_ids[..., index] = padded(name, np.int64)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "numeric_values": torch.from_numpy(amounts.astype(np.float32)),
            "event_time": torch.from_numpy(event_time.astype(np.float32)),
            "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        }
        labels = [feature.get("labels") for feature in features]
        if any(label is not None for label in labels):
            unlabelled = [row for row, label in enumerate(labels) if label is None]
            if unlabelled:
                raise ValueError(
                    f"Customer {_customer(features[unlabelled[0]], unlabelled[0])} has no label while others have."
                )
            batch["labels"] = torch.tensor(np.asarray(labels, dtype=np.int64))
        return batch


def _customer(feature: dict, row: int) -> str:
    """How an error names a customer: its id, or its row in the batch."""
    return str(feature["customer_id"]) if "customer_id" in feature else f"at batch row {row}"
