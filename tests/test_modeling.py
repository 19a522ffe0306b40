"""Model behaviour shared by every attention kind: shapes, masks, save/load, remote code, losses."""

import contextlib
import copy
import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_batch, run_without_txformer, select_rows, tiny_config
from torch.nn.attention.flex_attention import create_mask
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, Trainer, TrainingArguments

from txformer import TxFormerConfig, TxFormerForSequenceClassification, TxFormerModel
from txformer.attention_full import build_attention_mask
from txformer.configuration_txformer import ATTENTION_KINDS


REPO_ROOT = Path(__file__).resolve().parents[1]


# Every pairing of a kind with a backend of `attn_implementation` that runs on the CPU and that the kind computes
# exact attention with (the ∞-former's short-term attention, the sliding window's blocks); a kind that uses none
# (Performer attention) once, with the default.
CPU_BACKENDS = ("eager", "sdpa", "flex_attention")
KINDS_AND_IMPLEMENTATIONS = [
    (name, backend)
    for name, kind in ATTENTION_KINDS.items()
    for backend in [backend for backend in CPU_BACKENDS if backend in kind.attn_implementations] or ["sdpa"]
]


def kinds_with(backend: str) -> list[str]:
    """The kinds that compute exact attention with `backend`."""
    return [name for name, kind in ATTENTION_KINDS.items() if backend in kind.attn_implementations]


def build(config: TxFormerConfig, **kwargs) -> TxFormerForSequenceClassification:
    """A model in eval mode with its own copy of `config` (`from_config` sets `attn_implementation` on the config it
    is given, so two models built from one config would share the last backend)."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(copy.deepcopy(config), **kwargs).eval()


def logits(model: TxFormerForSequenceClassification, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The classifier's logits, without gradient (flex attention has no backward on the CPU)."""
    with torch.no_grad():
        return model(**batch).logits


def event_states(model: TxFormerForSequenceClassification, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's final state of every event, without gradient."""
    with torch.no_grad():
        return model.txformer(**batch).last_hidden_state


def test_default_config_is_valid_and_builds_a_model_that_runs_on_its_dummy_inputs():
    model = TxFormerForSequenceClassification(TxFormerConfig()).eval()
    logits = model(**model.dummy_inputs).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_unknown_attention_type_is_a_value_error_listing_the_valid_kinds():
    with pytest.raises(ValueError, match=r"'full', 'performer', 'infinity'"):
        TxFormerConfig(attention_type="linformer")


def test_mismatched_vocabulary_sizes_are_rejected():
    with pytest.raises(ValueError, match="categorical_vocab_sizes"):
        TxFormerConfig(categorical_fields=["mcc_code"], categorical_vocab_sizes=[10, 20])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "multiple of num_attention_heads"),
        ({"performer_orthogonal_scaling": 2}, "performer_orthogonal_scaling"),
        ({"performer_redraw_interval": -1}, "performer_redraw_interval"),
        ({"ltm_num_basis": 7}, "multiple of the number of ltm_basis_widths"),
        ({"ltm_contraction": 1.0}, "ltm_contraction"),
        ({"ltm_ridge_penalty": 0.0}, "ltm_ridge_penalty"),
        ({"segment_length": 0}, "segment_length"),
        ({"pooling": "max"}, "pooling"),
    ],
)
def test_invalid_config_values_are_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TxFormerConfig(**overrides)


def test_config_round_trip(tmp_path):
    config = tiny_config("performer", ltm_basis_widths=[0.02, 0.04])
    config.save_pretrained(tmp_path)
    loaded = TxFormerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_dummy_inputs_are_valid_for_every_kind(attention_type):
    model = build(tiny_config(attention_type))
    outputs = model(**model.dummy_inputs)
    assert outputs.logits.shape == (2, 2)
    assert torch.isfinite(outputs.logits).all()


def test_eager_and_sdpa_give_the_same_outputs_with_padding(attention_type):
    if not ATTENTION_KINDS[attention_type].attn_implementations:
        pytest.skip(f"{attention_type} attention does not go through attn_implementation")
    config = tiny_config(attention_type)
    sdpa = build(config, attn_implementation="sdpa")
    eager = build(config, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    batch = random_batch(config, [9, 5, 1])
    torch.testing.assert_close(eager(**batch).logits, sdpa(**batch).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention_type", kinds_with("flex_attention"))
def test_flex_attention_gives_the_outputs_of_eager_with_padding(attention_type):
    config = tiny_config(attention_type)
    flex = build(config, attn_implementation="flex_attention")
    eager = build(config, attn_implementation="eager")
    eager.load_state_dict(flex.state_dict())
    assert (flex.config._attn_implementation, eager.config._attn_implementation) == ("flex_attention", "eager")
    batch = random_batch(config, [9, 5, 1])
    real_events = batch["attention_mask"].bool()
    flex_states, eager_states = (event_states(model, batch)[real_events] for model in (flex, eager))
    torch.testing.assert_close(flex_states, eager_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(flex, batch), logits(eager, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention", "flash_attention_2"])
@torch.no_grad()  # as the other flex attention tests on the CPU: its compiled mask builder is reused, not rebuilt
def test_the_attention_mask_has_the_form_the_backend_takes(attn_implementation):
    """Padded keys are masked for every query: eager (additive) and SDPA (boolean) get one `[batch, 1, 1, length]` row
    broadcast over the queries, flex attention a block mask, flash attention the `[batch, length]` mask. Without
    padding: no mask (flex attention: a block mask that masks nothing)."""
    config = tiny_config()
    config._attn_implementation = attn_implementation
    key_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    hidden_states = torch.zeros(2, 4, config.hidden_size)
    mask = build_attention_mask(config, hidden_states, key_mask)
    unpadded = build_attention_mask(config, hidden_states, torch.ones_like(key_mask))
    key_row = key_mask[:, None, None, :]
    if attn_implementation == "flex_attention":
        assert mask.shape == (2, 1, 4, 4)
        torch.testing.assert_close(create_mask(mask.mask_mod, 2, 1, 4, 4, device="cpu"), key_row.expand(2, 1, 4, 4))
        assert create_mask(unpadded.mask_mod, 2, 1, 4, 4, device="cpu").all()
        return
    assert unpadded is None
    if attn_implementation == "eager":
        assert mask.shape == (2, 1, 1, 4) and mask.dtype == hidden_states.dtype
        torch.testing.assert_close(mask == 0, key_row)
        assert torch.all(mask[~key_row].exp() == 0)
    else:
        torch.testing.assert_close(mask, key_row if attn_implementation == "sdpa" else key_mask)


@pytest.mark.parametrize(("attention_type", "attn_implementation"), KINDS_AND_IMPLEMENTATIONS)
def test_padding_invariance(attention_type, attn_implementation):
    """A history's logits do not change when it is batched with longer ones."""
    config = tiny_config(attention_type)
    model = build(config, attn_implementation=attn_implementation)
    batch = random_batch(config, [11, 6, 3])
    batched = logits(model, batch)
    for row, length in enumerate([11, 6, 3]):
        alone = logits(model, select_rows(batch, [row], length))
        torch.testing.assert_close(alone, batched[row : row + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("attention_type", "attn_implementation"), KINDS_AND_IMPLEMENTATIONS)
def test_padded_values_do_not_leak(attention_type, attn_implementation):
    """Garbage in padded positions changes nothing."""
    config = tiny_config(attention_type)
    model = build(config, attn_implementation=attn_implementation)
    batch = random_batch(config, [10, 4])
    noisy = {key: value.clone() for key, value in batch.items()}
    noisy["numeric_values"][1, 4:] = 1e9
    noisy["input_ids"][1, 4:] = 3
    noisy["event_time"][1, 4:] = 5000.0
    torch.testing.assert_close(logits(model, noisy), logits(model, batch), rtol=1e-5, atol=1e-5)


def test_batch_permutation_invariance(attention_type):
    config = tiny_config(attention_type)
    model = build(config)
    batch = random_batch(config, [7, 12, 2, 9])
    permutation = [2, 0, 3, 1]
    permuted = {key: value[permutation] for key, value in batch.items()}
    torch.testing.assert_close(model(**permuted).logits, model(**batch).logits[permutation], rtol=1e-5, atol=1e-5)


def test_last_hidden_state_shape_and_padding(attention_type):
    config = tiny_config(attention_type)
    model = TxFormerModel(config).eval()
    outputs = model(**random_batch(config, [9, 3]), output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (2, 9, config.hidden_size)
    assert outputs.pooler_output.shape == (2, config.hidden_size)
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert all(state.shape == (2, 9, config.hidden_size) for state in outputs.hidden_states)


def test_save_and_load_round_trip(tmp_path, attention_type):
    config = tiny_config(attention_type)
    model = build(config)
    batch = random_batch(config, [8, 5])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is TxFormerForSequenceClassification
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_auto_classes_resolve_the_installed_package():
    config = AutoConfig.for_model("txformer", hidden_size=16, num_attention_heads=2)
    assert isinstance(config, TxFormerConfig)
    assert isinstance(AutoModel.from_config(config), TxFormerModel)
    assert isinstance(AutoModelForSequenceClassification.from_config(config), TxFormerForSequenceClassification)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification
    folder = sys.argv[1]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert "txformer" not in type(model).__module__.split(".")[0], type(model).__module__
    batch = {key: torch.tensor(value) for key, value in json.load(open(folder + "/batch.json")).items()}
    print(json.dumps(model(**batch).logits.tolist()))
    """
)


def test_remote_code_round_trip_without_the_package(tmp_path, attention_type):
    """A fresh process that cannot import txformer loads the folder with trust_remote_code and agrees."""
    config = tiny_config(attention_type)
    model = build(config)
    batch = random_batch(config, [8, 5])
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    saved_files = {path.name for path in folder.iterdir()}
    assert {"configuration_txformer.py", "modeling_txformer.py", "attention_full.py"} <= saved_files
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"]
    (folder / "batch.json").write_text(json.dumps({key: value.tolist() for key, value in batch.items()}))
    remote_logits = torch.tensor(json.loads(run_without_txformer(REMOTE_CODE_SCRIPT, [str(folder)], tmp_path)))
    torch.testing.assert_close(remote_logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


def count_layer_calls(model: TxFormerForSequenceClassification) -> list[None]:
    """A list that grows by one each time a layer starts (its first module is called): inside the checkpointed forward,
    so a recomputation in the backward counts too (and the recomputation may stop early, before the layer's end)."""
    calls = []
    for layer in model.txformer.layers:
        layer.attention_norm.register_forward_pre_hook(lambda *_: calls.append(None))
    return calls


def deprecation_of(name: str):
    """Expects transformers 5's FutureWarning for the deprecated spelling `gradient_checkpointing*`."""
    if name.startswith("gradient_checkpointing"):
        return pytest.warns(FutureWarning, match="activation_checkpointing")
    return contextlib.nullcontext()


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_activation_checkpointing_recomputes_the_layers_with_the_same_loss_and_gradients(attention_type, enable):
    """transformers 5's `activation_checkpointing_enable`, and its deprecated alias `gradient_checkpointing_enable`."""
    config = tiny_config(attention_type)
    batch = random_batch(config, [9, 6])
    labels = torch.tensor([0, 1])
    results = []
    for checkpointing in (False, True):
        model = build(config).train()
        if checkpointing:
            with deprecation_of(enable):
                getattr(model, enable)()
        assert model.is_activation_checkpointing == checkpointing
        calls = count_layer_calls(model)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.classifier.weight.grad.clone(), len(calls)))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[1][2] > results[0][2]


@pytest.mark.parametrize("flag", ["activation_checkpointing", "gradient_checkpointing"])
def test_the_trainer_checkpoints_activations_with_the_flag_or_its_deprecated_alias(tmp_path, flag):
    config = tiny_config()
    model = build(config)
    batch = random_batch(config, [6, 4, 5, 3])
    dataset = [{**{key: value[row] for key, value in batch.items()}, "labels": row % 2} for row in range(4)]
    with deprecation_of(flag):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            remove_unused_columns=False,
            **{flag: True},
        )
    calls = count_layer_calls(model)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    assert model.is_activation_checkpointing
    assert len(calls) == 2 * config.num_hidden_layers  # the forward, and the recomputation in the backward


def test_loss_with_num_items_in_batch_is_a_sum_over_the_accumulation_step():
    """Under gradient accumulation the Trainer passes num_items_in_batch: the loss must not be divided twice."""
    config = tiny_config()
    model = build(config)
    batch = random_batch(config, [5, 4, 3])
    labels = torch.tensor([0, 1, 1])
    mean_loss = model(**batch, labels=labels).loss
    summed_over_six = model(**batch, labels=labels, num_items_in_batch=6).loss
    torch.testing.assert_close(summed_over_six, mean_loss * 3 / 6)


def test_inputs_that_do_not_match_the_config_get_a_clear_error():
    config = tiny_config()
    model = build(config)
    batch = random_batch(config, [4, 2])
    with pytest.raises(ValueError, match="input_ids has shape"):
        model(**{**batch, "input_ids": batch["input_ids"][..., :2]})
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, :3]})


def test_full_attention_rejects_a_past_state():
    config = tiny_config("full")
    model = build(config)
    with pytest.raises(ValueError, match="past_state"):
        model(**model.dummy_inputs, past_state=object())
