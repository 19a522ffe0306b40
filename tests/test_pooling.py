"""History pooling: `mean`, `sum`, `last` and `mean_sum` (the mean plus a learned share of the sum over events)."""

import torch
from conftest import random_batch, select_rows, tiny_config

from txformer import TxFormerModel


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
