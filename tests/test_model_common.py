"""What transformers' `ConfigTester` and `ModelTesterMixin` check for a model, for every attention kind: config round
trips, `num_labels`, init without arguments, save/load between the base and the head model, `from_pretrained(None,
state_dict=...)`, meta-device init, hidden states and attentions, determinism under a seed, bfloat16 loading and bf16
autocast on 16k-event histories."""

import dataclasses
import json

import pytest
import torch
import transformers
from conftest import random_batch, tiny_config
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, AutoModel, set_seed

from txformer import TxFormerConfig, TxFormerForSequenceClassification, TxFormerModel
from txformer.configuration_txformer import ATTENTION_KINDS
from txformer.modeling_txformer import AUTO_CLASSES


MODEL_CLASSES = tuple(AUTO_CLASSES.values())
LONG_HISTORY = 16_384


def build(model_class, config: TxFormerConfig, seed: int = 0, **kwargs):
    """A model in eval mode, initialised after `set_seed(seed)`; kwargs go to `from_config` (`attn_implementation`)."""
    set_seed(seed)
    auto_class_name = next(name for name, registered in AUTO_CLASSES.items() if registered is model_class)
    model = getattr(transformers, auto_class_name).from_config(config, **kwargs).eval()
    assert type(model) is model_class
    return model


def classifier_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name


# Config (ConfigTester).


def test_config_has_the_common_properties_and_takes_them_as_arguments():
    config = TxFormerConfig(hidden_size=24, num_attention_heads=3, num_hidden_layers=5)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (24, 3, 5)
    from_json = json.loads(config.to_json_string())
    assert from_json["hidden_size"] == 24 and from_json["model_type"] == "txformer"


def test_config_round_trips(tmp_path, attention_type):
    config = tiny_config(attention_type, num_labels=3, ltm_basis_widths=[0.02, 0.04], pooling="last")
    expected = config.to_dict()
    assert TxFormerConfig.from_dict(config.to_dict()).to_dict() == expected
    config.to_json_file(tmp_path / "config.json")
    assert TxFormerConfig.from_json_file(tmp_path / "config.json").to_dict() == expected
    config.save_pretrained(tmp_path / "folder")
    # Saving registers the remote-code class (`auto_map`) and changes nothing else.
    expected = {**expected, "auto_map": {"AutoConfig": "configuration_txformer.TxFormerConfig"}}
    assert config.to_dict() == expected
    assert TxFormerConfig.from_pretrained(tmp_path / "folder").to_dict() == expected
    assert {**AutoConfig.from_pretrained(tmp_path / "folder").to_dict(), "_name_or_path": ""} == expected
    config.save_pretrained(tmp_path / "repo" / "sub")
    assert TxFormerConfig.from_pretrained(tmp_path / "repo", subfolder="sub").to_dict() == expected


def test_num_labels_sets_and_resets_the_label_maps():
    config = TxFormerConfig(num_labels=5)
    assert len(config.id2label) == 5 and len(config.label2id) == 5
    config.num_labels = 3
    assert len(config.id2label) == 3 and len(config.label2id) == 3


def test_config_and_models_init_without_arguments():
    config = TxFormerConfig()
    assert config.to_dict() == AutoConfig.for_model("txformer").to_dict()
    for model in (TxFormerModel(config), AutoModel.from_config(config)):
        outputs = model.eval()(**model.dummy_inputs)
        assert outputs.pooler_output.shape == (2, config.hidden_size)
        assert torch.isfinite(outputs.pooler_output).all()


def test_config_fields_are_type_checked():
    with pytest.raises(StrictDataclassFieldValidationError, match="hidden_size"):
        TxFormerConfig(hidden_size="16")


def test_a_misspelt_config_key_is_an_error_not_a_silent_default():
    """The student project this package replaces lost a setting to a config key typo (../shared/specs/data.md)."""
    with pytest.raises(ValueError, match="hidden_size"):
        TxFormerConfig(hiden_size=16)


# Models (ModelTesterMixin).


@pytest.mark.parametrize("num_labels", [3, 1])
def test_num_labels_resizing_reinitialises_only_the_head(tmp_path, attention_type, num_labels):
    config = tiny_config(attention_type)
    model = build(TxFormerForSequenceClassification, config)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        TxFormerForSequenceClassification.from_pretrained(tmp_path, num_labels=num_labels)
    resized = TxFormerForSequenceClassification.from_pretrained(
        tmp_path, num_labels=num_labels, ignore_mismatched_sizes=True
    ).eval()
    assert resized.config.num_labels == num_labels
    assert resized.classifier.weight.shape == (num_labels, config.hidden_size)
    assert_same_weights(resized.txformer, model.txformer)
    batch = random_batch(config, [7, 3])
    labels = torch.tensor([0, 2]) if num_labels == 3 else torch.tensor([0.5, -1.0])
    outputs = resized(**batch, labels=labels)
    assert outputs.logits.shape == (2, num_labels)
    expected_problem = "single_label_classification" if num_labels == 3 else "regression"
    assert resized.config.problem_type == expected_problem and torch.isfinite(outputs.loss)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_save_and_load_keep_every_key_and_the_outputs(tmp_path, attention_type, model_class):
    config = tiny_config(attention_type)
    model = build(model_class, config)
    batch = random_batch(config, [9, 4])
    model.save_pretrained(tmp_path)
    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert_same_weights(loaded, model)
    with torch.no_grad():
        expected, actual = model(**batch), loaded.eval()(**batch)
    for key in ("last_hidden_state", "pooler_output", "logits"):
        if key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_the_base_model_and_the_head_model_load_each_other(tmp_path, attention_type):
    """The `base_model_prefix` round trip (`test_save_load_fast_init_from_base` / `_to_base`)."""
    config = tiny_config(attention_type)
    base = build(TxFormerModel, config)
    base.save_pretrained(tmp_path / "base")
    head, info = TxFormerForSequenceClassification.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and not info["unexpected_keys"]
    assert_same_weights(head.txformer, base)

    classifier = build(TxFormerForSequenceClassification, config, seed=1)
    classifier.save_pretrained(tmp_path / "head")
    encoder, info = TxFormerModel.from_pretrained(tmp_path / "head", output_loading_info=True)
    assert info["unexpected_keys"] == {"classifier.weight", "classifier.bias"} and not info["missing_keys"]
    assert_same_weights(encoder, classifier.txformer)


def test_from_pretrained_none_with_a_state_dict(attention_type):
    config = tiny_config(attention_type)
    model = build(TxFormerForSequenceClassification, config)
    loaded = TxFormerForSequenceClassification.from_pretrained(None, config=config, state_dict=model.state_dict())
    batch = random_batch(config, [6, 2])
    torch.testing.assert_close(classifier_logits(loaded.eval(), batch), classifier_logits(model, batch))


def test_meta_device_init_allocates_nothing_and_init_weights_rebuilds_the_buffers(attention_type):
    """A model built on the meta device, materialised with `to_empty`, re-initialised with `init_weights` and given a
    state dict computes what the original computes: every buffer that is not saved is re-derived from the config."""
    config = tiny_config(attention_type)
    model = build(TxFormerForSequenceClassification, config)
    with torch.device("meta"):
        on_meta = TxFormerForSequenceClassification(config)
    assert all(tensor.is_meta for tensor in [*on_meta.parameters(), *on_meta.buffers()])
    on_meta.to_empty(device="cpu")
    on_meta.init_weights()
    on_meta.load_state_dict(model.state_dict())
    batch = random_batch(config, [8, 5])
    torch.testing.assert_close(classifier_logits(on_meta.eval(), batch), classifier_logits(model, batch))


def test_hidden_states_output(attention_type):
    config = tiny_config(attention_type, num_hidden_layers=3)
    model = build(TxFormerForSequenceClassification, config)
    batch = random_batch(config, [10, 6])
    in_the_config = tiny_config(attention_type, num_hidden_layers=3, output_hidden_states=True)
    asked_in_the_config = build(TxFormerForSequenceClassification, in_the_config)
    for outputs in (model(**batch, output_hidden_states=True), asked_in_the_config(**batch)):
        assert len(outputs.hidden_states) == config.num_hidden_layers + 1
        assert all(state.shape == (2, 10, config.hidden_size) for state in outputs.hidden_states)
        assert all(torch.isfinite(state).all() for state in outputs.hidden_states)
    assert model(**batch).hidden_states is None


# Every kind under each backend it computes with that runs without compiling on the CPU (SDPA, the default, for a
# kind that uses none).
KINDS_AND_EAGER_BACKENDS = [
    (name, backend)
    for name, kind in ATTENTION_KINDS.items()
    for backend in [backend for backend in ("eager", "sdpa") if backend in kind.attn_implementations] or ["sdpa"]
]


@pytest.mark.parametrize(("attention_type", "attn_implementation"), KINDS_AND_EAGER_BACKENDS)
def test_attentions_are_weights_per_layer_or_none_with_a_warning(attention_type, attn_implementation, caplog):
    """transformers' contract: per layer, weights `[batch, heads, length, length]` that are distributions over the real
    events, where the kind has them under the backend (`AttentionKind.attention_weights`); otherwise `attentions` is
    None and a warning says so. Asked for in the call or in the config alike."""
    has_weights = attn_implementation in ATTENTION_KINDS[attention_type].attention_weights
    config = tiny_config(attention_type, num_hidden_layers=3)
    model = build(TxFormerForSequenceClassification, config, attn_implementation=attn_implementation)
    in_the_config = build(
        TxFormerForSequenceClassification,
        tiny_config(attention_type, num_hidden_layers=3, output_attentions=True),
        attn_implementation=attn_implementation,
    )
    batch = random_batch(config, [10, 6])
    transformers.utils.logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        for outputs in (model(**batch, output_attentions=True), in_the_config(**batch)):
            if not has_weights:
                assert outputs.attentions is None
                continue
            assert len(outputs.attentions) == config.num_hidden_layers
            for weights in outputs.attentions:
                assert weights.shape == (2, config.num_attention_heads, 10, 10)
                torch.testing.assert_close(weights.sum(-1), torch.ones(2, config.num_attention_heads, 10))
                assert torch.all(weights[1, :, :, 6:] == 0)
    warnings = [record.getMessage() for record in caplog.records if "attention weights" in record.getMessage()]
    if has_weights:
        assert warnings == []
    else:
        assert len(warnings) == 1 and repr(attention_type) in warnings[0]
    assert model(**batch).attentions is None


def test_a_streaming_kind_cannot_declare_attention_weights():
    infinity = ATTENTION_KINDS["infinity"]
    with pytest.raises(ValueError, match="streaming"):
        dataclasses.replace(infinity, attention_weights=("eager",))


def test_determinism_under_a_seed(attention_type):
    config = tiny_config(attention_type, hidden_dropout_prob=0.2)
    batch = random_batch(config, [9, 5])
    first, again, other = (build(TxFormerForSequenceClassification, config, seed=seed) for seed in (3, 3, 4))
    assert_same_weights(first, again)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    # Eval twice: the same output. Training with dropout: the same output after the same seed, another without.
    torch.testing.assert_close(classifier_logits(first, batch), classifier_logits(first, batch), rtol=0, atol=0)
    first.train()
    runs = []
    for seed in (7, 7, 8):
        set_seed(seed)
        runs.append(first(**batch).logits.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


def test_bfloat16_loading_keeps_the_float32_buffers_and_the_time_of_day(tmp_path, attention_type):
    config = tiny_config(attention_type)
    model = build(TxFormerForSequenceClassification, config)
    model.save_pretrained(tmp_path)
    batch = random_batch(config, [8, 5])
    batch["event_time"] = batch["event_time"] + 400 * batch["attention_mask"]
    # Hour of day at day 400 (8 am, 5 pm): the float32 model's time features, within bfloat16 rounding.
    times = torch.tensor([[400 + 8 / 24, 400 + 17 / 24]])
    expected_time_features = model.txformer.embeddings.time_encoder(times).detach()
    loaded = TxFormerForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    cast = TxFormerForSequenceClassification.from_pretrained(tmp_path).to(torch.bfloat16).eval()
    for bfloat16_model in (loaded, cast):
        assert bfloat16_model.dtype == torch.bfloat16
        assert {parameter.dtype for parameter in bfloat16_model.parameters()} == {torch.bfloat16}
        float_buffers = {
            name: buffer.dtype for name, buffer in bfloat16_model.named_buffers() if buffer.is_floating_point()
        }
        # The ∞-former's partial-fit normal equations stay float64; every other constant float32.
        float64_buffers = {
            f"{prefix}.{name}"
            for prefix, module in bfloat16_model.named_modules()
            for name in getattr(module, "float64_buffers", ())
        }
        assert {float_buffers.pop(name) for name in float64_buffers} <= {torch.float64}
        assert set(float_buffers.values()) == {torch.float32}, float_buffers
        time_features = bfloat16_model.txformer.embeddings.time_encoder(times).float()
        torch.testing.assert_close(time_features, expected_time_features, rtol=0, atol=1e-2)
        logits = classifier_logits(bfloat16_model, batch)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        torch.testing.assert_close(logits.float(), classifier_logits(model, batch), rtol=0, atol=1e-2)


@pytest.fixture
def one_thread():
    """Long inputs on one thread: two threads on a busy two-core machine spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bf16_autocast_on_16k_events_is_finite_and_close_to_float32(attention_type, one_thread):
    """One 16,384-event history under bf16 autocast: finite logits and pooled output, close to float32. The kinds
    built for long histories also train on it (a full-attention backward at this length is slow on CPU)."""
    config = tiny_config(attention_type, num_hidden_layers=1, segment_length=256, ltm_num_basis=16, ltm_num_samples=32)
    model = build(TxFormerForSequenceClassification, config)
    batch = random_batch(config, [LONG_HISTORY])
    with torch.no_grad():
        expected = model.txformer(**batch, output_last_hidden_state=False).pooler_output
    trains = attention_type != "full"
    labels = torch.tensor([1])
    with torch.set_grad_enabled(trains), torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = model.txformer(**batch, output_last_hidden_state=False).pooler_output
        logits = model.classifier(pooled)
        loss = model.classification_loss(logits, labels)
    assert torch.isfinite(pooled).all() and torch.isfinite(logits).all() and torch.isfinite(loss)
    torch.testing.assert_close(pooled.float(), expected, rtol=0, atol=1e-2)
    if trains:
        loss.backward()
        gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
        assert gradients and all(torch.isfinite(gradient).all() for gradient in gradients)
