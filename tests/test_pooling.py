"""History pooling: `mean`, `sum`, `last` and `mean_sum` (the mean plus a learned share of the sum over events), and
the embedding readout (`embedding_sum_readout`: the centred sum of the event embeddings, added to any of them)."""

import torch
from conftest import random_batch, select_rows, tiny_config

from txformer import TxFormerForSequenceClassification, TxFormerModel


def test_mean_sum_pooling_starts_at_the_mean_and_reads_the_count(attention_type):
    torch.manual_seed(0)
    mean_model = TxFormerModel(tiny_config(attention_type)).eval()
    sum_model = TxFormerModel(tiny_config(attention_type, pooling="mean_sum", pooling_sum_scale=4.0)).eval()
    sum_model.load_state_dict(mean_model.state_dict(), strict=False)
    batch = random_batch(mean_model.config, [9, 5, 2])
    with torch.no_grad():
        mean = mean_model(**batch).pooler_output
        torch.testing.assert_close(sum_model(**batch).pooler_output, mean)
        sum_model.pooler.sum_weight.fill_(0.5)
        counts = torch.tensor([9.0, 5.0, 2.0])[:, None]
        torch.testing.assert_close(sum_model(**batch).pooler_output, mean * (1 + 0.5 * counts / 4.0))


def test_mean_sum_pooling_is_padding_invariant(attention_type):
    model = TxFormerModel(tiny_config(attention_type, pooling="mean_sum")).eval()
    with torch.no_grad():
        model.pooler.sum_weight.normal_()
        batch = random_batch(model.config, [7, 3])
        alone = model(**select_rows(batch, [1], length=3)).pooler_output
        torch.testing.assert_close(model(**batch).pooler_output[1:], alone, rtol=1e-5, atol=1e-5)


def test_sum_pooling_is_the_mean_times_the_count_over_the_scale(attention_type):
    torch.manual_seed(0)
    mean_model = TxFormerModel(tiny_config(attention_type)).eval()
    sum_model = TxFormerModel(tiny_config(attention_type, pooling="sum", pooling_sum_scale=4.0)).eval()
    sum_model.load_state_dict(mean_model.state_dict())
    batch = random_batch(mean_model.config, [9, 5, 2])
    with torch.no_grad():
        mean = mean_model(**batch).pooler_output
        counts = torch.tensor([9.0, 5.0, 2.0])[:, None]
        torch.testing.assert_close(sum_model(**batch).pooler_output, mean * counts / 4.0)
        alone = sum_model(**select_rows(batch, [1], length=5)).pooler_output
        torch.testing.assert_close(sum_model(**batch).pooler_output[1:2], alone, rtol=1e-5, atol=1e-5)


def test_embedding_readout_adds_the_centred_sum_of_the_layers_input(attention_type, tmp_path):
    """In evaluation the readout adds `(Σ_i e_i - n m) / pooling_sum_scale` to the pooled output, with `e_i` the
    event embeddings the first layer reads and `m` the running mean, which is saved with the weights; a row's output
    does not depend on the padding or the other rows."""
    torch.manual_seed(0)
    plain = TxFormerModel(tiny_config(attention_type)).eval()
    model = TxFormerModel(tiny_config(attention_type, embedding_sum_readout=True, pooling_sum_scale=4.0)).eval()
    missing, _ = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["embedding_readout.running_mean", "embedding_readout.center_log_slope"]
    model.embedding_readout.running_mean.normal_()
    batch = random_batch(plain.config, [9, 5, 2])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = plain(**batch, output_hidden_states=True)
        embeddings = reference.hidden_states[0].masked_fill(~mask[..., None], 0)
        counts = mask.sum(dim=1, keepdim=True).float()
        centred_sum = embeddings.sum(dim=1) - counts * model.embedding_readout.running_mean
        pooled = model(**batch).pooler_output
        torch.testing.assert_close(pooled, reference.pooler_output + centred_sum / 4.0, rtol=1e-5, atol=1e-5)
        alone = model(**select_rows(batch, [1], length=5)).pooler_output
        torch.testing.assert_close(pooled[1:2], alone, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = TxFormerModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.embedding_readout.running_mean, model.embedding_readout.running_mean)


def test_embedding_readout_centres_on_the_batch_in_training(attention_type):
    """In training the centre is the batch's mean event embedding (the centred sums of the rows add up to zero), and
    the running mean moves towards it by `momentum`; evaluation leaves the running mean alone."""
    model = TxFormerModel(tiny_config(attention_type, embedding_sum_readout=True)).train()
    readout = model.embedding_readout
    seen = {}
    readout.register_forward_hook(lambda module, inputs, output: seen.update(inputs=inputs, output=output))
    batch = random_batch(model.config, [9, 5, 2])
    model(**batch)
    embedding_sum, num_events = seen["inputs"]
    assert num_events.tolist() == [9, 5, 2]
    torch.testing.assert_close(seen["output"].sum(dim=0), torch.zeros(16), rtol=0, atol=1e-5)
    batch_mean = embedding_sum.sum(dim=0) / num_events.sum()
    torch.testing.assert_close(readout.running_mean, readout.momentum * batch_mean.detach())
    model.eval()
    running_mean = readout.running_mean.clone()
    with torch.no_grad():
        model(**batch)
    torch.testing.assert_close(readout.running_mean, running_mean, rtol=0, atol=0)


def test_embedding_readout_trains_the_embeddings_of_every_segment():
    """The ∞-former's earlier segments run without gradient (`ltm_detach_memory`), except through the embedding
    readout: a code seen only in the first of four segments gets a gradient with the readout, and none without it."""
    for readout in (False, True):
        torch.manual_seed(0)
        config = tiny_config("infinity", embedding_sum_readout=readout)
        model = TxFormerForSequenceClassification(config).train()
        batch = random_batch(config, [16, 13])
        codes = batch["input_ids"][..., 0].clamp(max=config.categorical_vocab_sizes[0] - 2)
        codes[:, 0] = config.categorical_vocab_sizes[0] - 1
        batch["input_ids"][..., 0] = codes * batch["attention_mask"]
        model(**batch, labels=torch.tensor([0, 1])).loss.backward()
        gradient = model.txformer.embeddings.categorical_embeddings[0].weight.grad[-1]
        assert bool(gradient.abs().sum() > 0) == readout


def test_embedding_readout_stays_float32_in_a_bfloat16_model(attention_type):
    """Cast to bfloat16, the running mean stays float32 (a 16-bit one could not move by 5% of a small difference),
    training updates it, and the centred sum is computed in float32."""
    model = TxFormerModel(tiny_config(attention_type, embedding_sum_readout=True)).to(torch.bfloat16).train()
    readout = model.embedding_readout
    assert readout.running_mean.dtype == torch.float32
    seen = {}
    readout.register_forward_hook(lambda module, inputs, output: seen.update(inputs=inputs, output=output))
    model(**random_batch(model.config, [9, 5, 2]))
    assert seen["inputs"][0].dtype == seen["output"].dtype == torch.float32
    assert readout.running_mean.dtype == torch.float32 and bool(readout.running_mean.abs().sum() > 0)
