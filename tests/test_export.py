"""Every attention kind in one graph: `torch.export` and `torch.compile(fullgraph=True)` of the classifier give the
eager outputs, on padded batches other than the one traced (nothing the data decides is baked into the graph)."""

import pytest
import torch
from conftest import random_batch, tiny_config
from torch.utils._pytree import tree_leaves
from transformers import set_seed

from txformer import TxFormerForSequenceClassification


# Three rows of one width: the ∞-former (tiny segments of 4 events) reads two segments, and which rows are partial,
# start later or have a memory differs between the traced batch and the others.
TRACED_LENGTHS = [6, 3, 8]
OTHER_LENGTHS = ([8, 8, 1], [5, 2, 8])


def build(attention_type: str) -> TxFormerForSequenceClassification:
    set_seed(0)
    return TxFormerForSequenceClassification(tiny_config(attention_type, num_hidden_layers=1)).eval()


def assert_same_outputs(actual, expected) -> None:
    """Every tensor of two outputs (logits, and the state of a streaming kind) agrees."""
    actual_leaves, expected_leaves = tree_leaves(actual), tree_leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    for actual_leaf, expected_leaf in zip(actual_leaves, expected_leaves, strict=True):
        torch.testing.assert_close(actual_leaf, expected_leaf, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_dynamo():
    """Every test compiles its own model: no cache limit carried over from another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_export_gives_the_eager_outputs(attention_type):
    model = build(attention_type)
    config = model.config
    program = torch.export.export(model, args=(), kwargs=random_batch(config, TRACED_LENGTHS))
    exported = program.module()
    for seed, lengths in enumerate([TRACED_LENGTHS, *OTHER_LENGTHS]):
        batch = random_batch(config, lengths, seed=seed)
        with torch.no_grad():
            expected = model(**batch)
        # Called as users call it, under gradient mode.
        assert_same_outputs(exported(**batch), expected)


def test_torch_compile_traces_one_graph_with_the_eager_outputs(attention_type, fresh_dynamo):
    model = build(attention_type)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for seed, lengths in enumerate([TRACED_LENGTHS, *OTHER_LENGTHS]):
        batch = random_batch(model.config, lengths, seed=seed)
        # The graph traced on the first batch serves the others: no guard on their values.
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=seed > 0):
            assert_same_outputs(compiled(**batch), model(**batch))
