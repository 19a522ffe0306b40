"""Reversible layers (`config.reversible_layers`) for every attention kind: the coupled architecture, the custom
backward pass against ordinary autograd through the same layers (float64), what the forward pass keeps, the
Trainer with gradient accumulation, and the refusal of activation checkpointing."""

import copy

import pytest
import torch
from conftest import random_batch, select_rows, tiny_config
from transformers import Trainer, TrainingArguments

from txformer import TxFormerForSequenceClassification
from txformer.attention_full import build_attention_mask
from txformer.configuration_txformer import ATTENTION_KINDS


# Dropout on everywhere: the backward pass must replay the random draws of the forward pass.
DROPOUT = {"hidden_dropout_prob": 0.2, "attention_dropout_prob": 0.2}
LENGTHS = [11, 6, 9]


def build(config, dtype: torch.dtype = torch.float32) -> TxFormerForSequenceClassification:
    torch.manual_seed(0)
    return TxFormerForSequenceClassification(copy.deepcopy(config)).to(dtype)


def count_recomputations(model: TxFormerForSequenceClassification) -> list[None]:
    """A list that grows by one at every run of a layer's MLP branch (forward or recomputation)."""
    calls = []
    for layer in model.txformer.layers:
        layer.mlp_norm.register_forward_pre_hook(lambda *_: calls.append(None))
    return calls


def loss_and_gradients(model, batch, labels, seed: int, output_hidden_states: bool, autocast: bool = False):
    """The loss and every parameter's gradient after one forward and backward pass under `seed`, with
    `torch.autograd.grad` (the custom backward returns the layers' gradients through autograd), and the random state
    after it. `output_hidden_states` runs the coupled layers through ordinary autograd; `autocast`: the forward pass
    (only, as in training) under CPU bf16 autocast."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, labels=labels, output_hidden_states=output_hidden_states).loss
    names, parameters = zip(*model.named_parameters(), strict=True)
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return loss.detach(), dict(zip(names, gradients, strict=True)), torch.get_rng_state()


def assert_same_gradients(config, lengths: list[int]) -> None:
    """Float64: the custom backward pass gives the loss, the gradients and the random state afterwards of ordinary
    autograd through the same coupled layers (1e-5), and recomputes every layer once."""
    model = build(config, torch.float64).train()
    batch = random_batch(config, lengths)
    labels = torch.arange(len(lengths)) % 2
    calls = count_recomputations(model)
    reversible = loss_and_gradients(model, batch, labels, seed=5, output_hidden_states=False)
    recomputed = len(calls)
    ordinary = loss_and_gradients(model, batch, labels, seed=5, output_hidden_states=True)
    assert recomputed > len(calls) - recomputed, "the custom backward pass did not run"
    torch.testing.assert_close(reversible[0], ordinary[0], rtol=1e-5, atol=1e-5)
    assert reversible[1].keys() == ordinary[1].keys()
    for name, gradient in ordinary[1].items():
        if gradient is None:
            assert reversible[1][name] is None, name
        else:
            torch.testing.assert_close(reversible[1][name], gradient, rtol=1e-5, atol=1e-5, msg=name)
    assert sum(gradient is not None for gradient in ordinary[1].values()) > len(ordinary[1]) // 2
    assert torch.equal(reversible[2], ordinary[2])


@pytest.mark.parametrize("attention_type", list(ATTENTION_KINDS))
def test_custom_backward_equals_autograd_through_the_coupled_layers(attention_type):
    assert_same_gradients(tiny_config(attention_type, num_hidden_layers=3, reversible_layers=True, **DROPOUT), LENGTHS)


@pytest.mark.parametrize("attention_type", [name for name, kind in ATTENTION_KINDS.items() if kind.streaming])
def test_custom_backward_carries_gradients_through_an_undetached_state(attention_type):
    """A streaming kind whose state keeps its graph between segments (the ∞-former's memory with
    `ltm_detach_memory=False`, the KL term, sticky memories drawn at random): the state is an input and an output of
    each segment's reversible layers."""
    config = tiny_config(
        attention_type,
        reversible_layers=True,
        ltm_detach_memory=False,
        ltm_kl_weight=0.5,
        ltm_sticky_memories=True,
        **DROPOUT,
    )
    assert_same_gradients(config, LENGTHS)


def test_the_coupling_is_the_documented_function():
    """One layer: `Y1 = X + Attention(X)`, `Y2 = X + MLP(Y1)`, output `norm((Y1 + Y2) / 2)` of the embeddings `X`."""
    config = tiny_config(num_hidden_layers=1, reversible_layers=True)
    model = build(config).eval()
    batch = random_batch(config, [7, 4])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        outputs = model.txformer(**batch, output_hidden_states=True)
        embeddings = outputs.hidden_states[0]
        layer = model.txformer.layers[0]
        position_embeddings = model.txformer.rotary_emb(embeddings.shape[1])
        attention_mask = build_attention_mask(model.config, embeddings, mask)
        first = embeddings + layer.attention_branch(embeddings, attention_mask, mask, position_embeddings)[0]
        second = embeddings + layer.mlp_branch(first)
        expected = model.txformer.norm((first + second) / 2)
    torch.testing.assert_close(outputs.last_hidden_state[mask], expected[mask])
    ordinary = build(tiny_config(num_hidden_layers=1)).eval()
    ordinary.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(ordinary.txformer(**batch).last_hidden_state, outputs.last_hidden_state)


def saved_bytes(config, lengths: list[int]) -> int:
    """Bytes of the tensors that a training forward pass saves for its backward pass."""
    model = build(config).train()
    total = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**random_batch(config, lengths), labels=torch.tensor([0, 1]))
    return sum(total)


@pytest.mark.parametrize("attention_type", list(ATTENTION_KINDS))
def test_the_forward_pass_keeps_no_activation_per_layer(attention_type):
    """Training keeps what the embeddings, the final norm and the head save, whatever the number of reversible layers
    (histories of one segment for a streaming kind, so that there is no past state to keep)."""
    streaming = ATTENTION_KINDS[attention_type].streaming
    length = 9 if streaming is None else streaming.segment_length(tiny_config(attention_type))
    lengths = [length, length - 2]
    saved = {
        (reversible, num_layers): saved_bytes(
            tiny_config(attention_type, num_hidden_layers=num_layers, reversible_layers=reversible, **DROPOUT), lengths
        )
        for reversible in (False, True)
        for num_layers in (1, 4)
    }
    assert saved[(True, 4)] == saved[(True, 1)]
    assert saved[(False, 4)] > saved[(False, 1)]


@pytest.mark.parametrize("attention_type", list(ATTENTION_KINDS))
def test_padding_invariance_and_save_load_with_reversible_layers(tmp_path, attention_type):
    config = tiny_config(attention_type, reversible_layers=True)
    model = build(config).eval()
    batch = random_batch(config, [10, 4])
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(**select_rows(batch, [1], length=4)).logits
    torch.testing.assert_close(padded[1:], alone, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = TxFormerForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.reversible_layers
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, padded)


def test_bf16_autocast_is_replayed_in_the_backward_pass():
    """Under CPU bf16 autocast the recomputed branches run in bf16 as they did in the forward pass, so the gradients
    are those of ordinary autograd up to the float32 reconstruction of the inputs."""
    config = tiny_config(num_hidden_layers=3, reversible_layers=True, **DROPOUT)
    model = build(config).train()
    batch = random_batch(config, LENGTHS)
    labels = torch.tensor([0, 1, 0])
    results = [
        loss_and_gradients(model, batch, labels, 5, output_hidden_states, autocast=True)
        for output_hidden_states in (False, True)
    ]
    for name, gradient in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], gradient, rtol=1e-3, atol=1e-5, msg=name)


def test_activation_checkpointing_is_refused_with_reversible_layers():
    model = build(tiny_config(reversible_layers=True))
    with pytest.raises(ValueError, match="reversible_layers"):
        model.activation_checkpointing_enable()
    assert not model.is_activation_checkpointing


def train_one_step(config, tmp_path, batch_size: int, accumulation_steps: int):
    """The model after one SGD step of the Trainer over the four rows of a batch, and its layers' recomputations."""
    model = build(config)
    batch = random_batch(config, [6, 4, 5, 3])
    dataset = [{**{key: value[row] for key, value in batch.items()}, "labels": row % 2} for row in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation_steps,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    calls = count_recomputations(model)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    return model, len(calls)


def test_trainer_with_gradient_accumulation_steps_as_one_batch(tmp_path):
    """Two accumulated half batches give the update of the whole batch (SGD: the update is the gradient)."""
    config = tiny_config(reversible_layers=True)
    initial = build(config).state_dict()
    whole, whole_calls = train_one_step(config, tmp_path / "whole", batch_size=4, accumulation_steps=1)
    halves, halves_calls = train_one_step(config, tmp_path / "halves", batch_size=2, accumulation_steps=2)
    # Forward and recomputation of every layer, once per batch.
    assert whole_calls == 2 * config.num_hidden_layers and halves_calls == 2 * whole_calls
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(halves.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
        if ".layers." in name and name.endswith("weight"):
            assert not torch.equal(value, initial[name]), f"{name} was not updated"
