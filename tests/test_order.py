"""Order awareness: rotary positions and the causal event context make the order of events visible to every
attention kind; without them the model reads a set of events."""

import pytest
import torch
from conftest import tiny_config

from txformer import TxFormerForSequenceClassification


ORDER_BLIND = dict(position_embedding_type="none", event_context_size=0, event_pair_buckets=0)


def order_task_batch(batch_size: int, length: int, vocab_size: int, generator: torch.Generator) -> dict:
    """Two classes with the same distribution of event multisets: label 1 lists a history's codes in ascending order,
    label 0 in descending order. Every event has the same time and amount, so only the order tells the classes apart."""
    codes = torch.randint(2, vocab_size, (batch_size, length), generator=generator).sort(dim=1).values
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    codes = torch.where(labels[:, None] == 1, codes, codes.flip(1))
    input_ids = torch.stack([codes, torch.full_like(codes, 2), torch.full_like(codes, 2)], dim=-1)
    return {
        "input_ids": input_ids,
        "numeric_values": torch.zeros(batch_size, length, 1),
        "event_time": torch.full((batch_size, length), 100.0),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": labels,
    }


def train_on_order_task(config, num_steps: int = 250, length: int = 8) -> float:
    """Accuracy on fresh histories of a tiny model trained on the order task."""
    torch.manual_seed(0)
    model = TxFormerForSequenceClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    vocab_size = config.categorical_vocab_sizes[0]
    model.train()
    for _ in range(num_steps):
        loss = model(**order_task_batch(64, length, vocab_size, generator)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    batch = order_task_batch(512, length, vocab_size, generator)
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(dim=-1)
    return (predictions == batch["labels"]).float().mean().item()


def test_order_blind_model_is_permutation_invariant():
    config = tiny_config("full", num_labels=2, **ORDER_BLIND)
    model = TxFormerForSequenceClassification(config).eval()
    batch = order_task_batch(4, 8, config.categorical_vocab_sizes[0], torch.Generator().manual_seed(0))
    batch.pop("labels")
    permutation = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    permuted = {key: value[:, permutation] if value.dim() > 1 else value for key, value in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**permuted).logits, atol=1e-6, rtol=1e-6)
        order_aware = TxFormerForSequenceClassification(tiny_config("full", num_labels=2)).eval()
        assert not torch.allclose(order_aware(**batch).logits, order_aware(**permuted).logits, atol=1e-4)


@pytest.mark.parametrize("part", ["position_embedding_type", "event_context_size", "event_pair_buckets"])
def test_each_order_signal_alone_breaks_permutation_invariance(part):
    overrides = {key: value for key, value in ORDER_BLIND.items() if key != part}
    # Large initial weights: attention far from uniform, so the order signal shows at initialisation.
    config = tiny_config("full", num_labels=2, initializer_range=0.5, **overrides)
    model = TxFormerForSequenceClassification(config).eval()
    if model.txformer.embeddings.pair_embedding is not None:  # starts at zero: give it values
        torch.nn.init.normal_(model.txformer.embeddings.pair_embedding.weight, std=0.5)
    batch = order_task_batch(4, 8, 12, torch.Generator().manual_seed(0))
    batch.pop("labels")
    flipped = {key: value.flip(1) if value.dim() > 1 else value for key, value in batch.items()}
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, model(**flipped).logits, atol=1e-4)


def test_order_task_is_learnable_by_every_kind(attention_type):
    # One ∞-former segment per history: with the memory of earlier segments detached, a two-segment history would
    # learn from its last segment only, which makes the toy task a matter of luck.
    config = tiny_config(attention_type, num_labels=2, categorical_vocab_sizes=[8, 4, 4], segment_length=8)
    assert train_on_order_task(config) >= 0.9


def test_order_task_defeats_an_order_blind_model():
    config = tiny_config("full", num_labels=2, categorical_vocab_sizes=[8, 4, 4], **ORDER_BLIND)
    assert train_on_order_task(config) <= 0.65
