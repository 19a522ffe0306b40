"""Shared fixtures: a tiny config per attention kind and a padded batch built from it."""

import pytest
import torch

from txformer import TxFormerConfig


ATTENTION_TYPES = ["full", "performer", "infinity"]


def tiny_config(attention_type: str = "full", **overrides) -> TxFormerConfig:
    """A small config of the given attention kind; dropout off so outputs are deterministic."""
    settings = dict(
        categorical_vocab_sizes=[12, 9, 7],
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        attention_type=attention_type,
        performer_num_random_features=16,
        segment_length=4,
        ltm_num_basis=8,
        ltm_num_samples=8,
    )
    settings.update(overrides)
    return TxFormerConfig(**settings)


def random_batch(config: TxFormerConfig, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch with histories of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, max_length = len(lengths), max(lengths)
    input_ids = torch.stack(
        [
            torch.randint(1, size, (batch_size, max_length), generator=generator)
            for size in config.categorical_vocab_sizes
        ],
        dim=-1,
    )
    numeric_values = torch.randn(batch_size, max_length, len(config.numeric_fields), generator=generator) * 1e4
    event_time = torch.cumsum(torch.rand(batch_size, max_length, generator=generator) * 2, dim=1) + 100
    attention_mask = (torch.arange(max_length)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids * attention_mask[..., None]
    numeric_values = numeric_values * attention_mask[..., None]
    event_time = event_time * attention_mask
    return {
        "input_ids": input_ids,
        "numeric_values": numeric_values,
        "event_time": event_time,
        "attention_mask": attention_mask,
    }


def select_rows(batch: dict[str, torch.Tensor], rows: list[int], length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of a batch, cut to `length` events."""
    return {key: value[rows, :length] for key, value in batch.items()}


@pytest.fixture(params=ATTENTION_TYPES)
def attention_type(request) -> str:
    return request.param
