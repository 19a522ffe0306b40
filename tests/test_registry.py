"""The attention-kind registry: every kind is a layer with its own config fields, a config saved before a kind existed
loads with that kind's defaults, and the per-optimizer-step hook reaches every layer."""

import dataclasses

import pytest
import torch
from conftest import random_batch, tiny_config

from txformer import TxFormerConfig, TxFormerForSequenceClassification
from txformer.attention_full import TxFormerSelfAttention
from txformer.configuration_txformer import ATTENTION_KINDS


def settings_fields(kind) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(kind.settings) if kind.settings is not None else ()


def test_every_kind_builds_its_own_layer(attention_type):
    kind = ATTENTION_KINDS[attention_type]
    assert kind.name == attention_type and issubclass(kind.attention_class, TxFormerSelfAttention)
    model = TxFormerForSequenceClassification(tiny_config(attention_type))
    assert [type(layer.self_attn) for layer in model.txformer.layers] == [kind.attention_class] * 2


def test_every_kind_owns_its_config_fields_with_their_defaults():
    names = [field.name for kind in ATTENTION_KINDS.values() for field in settings_fields(kind)]
    assert len(names) == len(set(names)), "two kinds declare a field of the same name"
    config_fields = {field.name for field in dataclasses.fields(TxFormerConfig)}
    default = TxFormerConfig()
    for kind in ATTENTION_KINDS.values():
        for field in settings_fields(kind):
            assert field.name in config_fields
            expected = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert getattr(default, field.name) == expected, field.name


def test_a_config_saved_before_a_kind_existed_loads_with_its_defaults(attention_type):
    saved = tiny_config(attention_type).to_dict()
    default = TxFormerConfig()
    for kind in ATTENTION_KINDS.values():
        if kind.name == attention_type:
            continue
        older = {key: value for key, value in saved.items() if key not in {f.name for f in settings_fields(kind)}}
        loaded = TxFormerConfig.from_dict(older)
        assert loaded.attention_type == attention_type
        for field in settings_fields(kind):
            assert getattr(loaded, field.name) == getattr(default, field.name)


def test_the_step_hook_reaches_every_layer_and_changes_no_output_in_evaluation(attention_type):
    config = tiny_config(attention_type)
    torch.manual_seed(0)
    model = TxFormerForSequenceClassification(config)
    calls = []
    for layer in model.txformer.layers:
        original = layer.self_attn.begin_optimizer_step
        layer.self_attn.begin_optimizer_step = lambda step, original=original: calls.append(step) or original(step)
    batch = random_batch(config, [7, 4])
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        model.begin_optimizer_step(1000)
        after = model(**batch).logits
    assert calls == [1000] * config.num_hidden_layers
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(ATTENTION_KINDS.values()), ids=list(ATTENTION_KINDS))
def test_every_kind_describes_itself(kind):
    assert kind.label and kind.summary.endswith(".") and kind.hub_tag
    assert kind.time_exponent in (1, 2)
    assert (kind.settings is None) == (kind.validate_settings is None)
