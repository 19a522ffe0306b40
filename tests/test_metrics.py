"""Offline evaluation metrics against their references."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import EvalPrediction

from txformer.metrics import compute_metrics, positive_class_probability


def test_compute_metrics_matches_the_references():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=50)
    metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    probabilities = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(positive_class_probability(logits), probabilities, rtol=1e-12)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probabilities))
    assert metrics["accuracy"] == pytest.approx(np.mean((probabilities >= 0.5) == labels))
    expected_loss = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels))
    assert metrics["loss"] == pytest.approx(expected_loss.item(), rel=1e-12)
    assert metrics["log_loss"] == pytest.approx(expected_loss.item(), rel=1e-6)


def test_auroc_with_a_single_class_is_a_clear_error():
    with pytest.raises(ValueError, match="both classes"):
        compute_metrics(EvalPrediction(predictions=np.zeros((4, 2)), label_ids=np.ones(4, dtype=int)))
