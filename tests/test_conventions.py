"""Library conventions that transformers' common tests check: saved configs keep unknown keys, `return_dict=False`,
the input embeddings hook."""

import json

import pytest
import torch
from conftest import random_batch, tiny_config

from txformer import TxFormerConfig, TxFormerForSequenceClassification, TxFormerModel


def test_saved_config_keeps_unknown_keys_while_passed_typos_fail(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(hidden_sizes=[8], performer_num_random_featurs=3)  # near misses written by someone else
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = TxFormerConfig.from_pretrained(tmp_path)
    assert config.hidden_sizes == [8] and config.performer_num_random_featurs == 3
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        TxFormerConfig(hidden_sise=8)


@pytest.mark.parametrize("model_class", [TxFormerModel, TxFormerForSequenceClassification])
def test_return_dict_false_returns_tuples(model_class, attention_type):
    config = tiny_config(attention_type, num_labels=2)
    model = model_class(config).eval()
    batch = random_batch(config, [5, 3])
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
        config.return_dict = False
        from_config = model(**batch)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.to_tuple()[0])
    torch.testing.assert_close(from_config[0], as_dict.to_tuple()[0])


def test_input_embeddings_hook_enables_input_gradients():
    config = tiny_config("full", num_labels=2)
    model = TxFormerForSequenceClassification(config)
    assert model.get_input_embeddings() is model.txformer.embeddings
    model.enable_input_require_grads()
    captured = []
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: captured.append(output))
    for parameter in model.txformer.embeddings.parameters():
        parameter.requires_grad_(False)
    model(**random_batch(config, [4, 2]))
    assert captured and captured[0].requires_grad
