"""Metrics through `evaluate` from the package's own metric modules (offline) against scikit-learn, and the bootstrap
interval of AUROC."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from transformers import EvalPrediction

from txformer.metrics import (
    bootstrap_auroc_interval,
    classification_metrics,
    compute_metrics,
    positive_class_probability,
    ranked_auroc,
)


def test_compute_metrics_matches_the_references():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=50)
    metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    probabilities = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(positive_class_probability(logits), probabilities, rtol=1e-12)
    assert metrics["auroc"] == roc_auc_score(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(np.mean((probabilities >= 0.5) == labels))
    expected_loss = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels))
    assert metrics["loss"] == pytest.approx(expected_loss.item(), rel=1e-12)
    assert metrics["log_loss"] == pytest.approx(expected_loss.item(), rel=1e-6)


def test_auroc_with_a_single_class_is_a_clear_error():
    with pytest.raises(ValueError, match="both classes"):
        compute_metrics(EvalPrediction(predictions=np.zeros((4, 2)), label_ids=np.ones(4, dtype=int)))


OFFLINE_SCRIPT = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
import numpy as np
from txformer.metrics import classification_metrics
labels, probabilities = np.array([0, 1, 1, 0, 1, 0, 0, 1]), np.array([0.1, 0.9, 0.4, 0.35, 0.8, 0.6, 0.0, 1.0])
print(json.dumps(classification_metrics(labels, probabilities)))
"""


def test_metric_modules_ship_with_the_package_and_load_offline(tmp_path):
    modules_cache = tmp_path / "modules"
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(modules_cache),
        "HF_HOME": str(tmp_path / "home"),
    }
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    labels, probabilities = np.array([0, 1, 1, 0, 1, 0, 0, 1]), np.array([0.1, 0.9, 0.4, 0.35, 0.8, 0.6, 0.0, 1.0])
    assert metrics == {
        "auroc": roc_auc_score(labels, probabilities),
        "accuracy": accuracy_score(labels, probabilities >= 0.5),
        "log_loss": log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]),
    }
    loaded = {path.name for path in (modules_cache / "evaluate_modules" / "metrics").iterdir() if path.is_dir()}
    assert loaded == {"auroc", "accuracy", "log_loss"}


def test_classification_metrics_equal_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=300)
    probabilities = np.round(rng.random(300), 1)  # many ties, some exactly 0.5
    metrics = classification_metrics(labels, probabilities)
    assert metrics["auroc"] == roc_auc_score(labels, probabilities)
    assert metrics["accuracy"] == accuracy_score(labels, probabilities >= 0.5)
    assert metrics["log_loss"] == log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1])


def test_ranked_auroc_equals_scikit_learn_on_every_row():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(5, 40))
    scores = np.round(rng.random((5, 40)), 1)
    np.testing.assert_allclose(
        ranked_auroc(labels, scores),
        [roc_auc_score(row_labels, row) for row_labels, row in zip(labels, scores, strict=True)],
    )


def scored_examples(num_examples: int, seed: int, num_runs: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and `num_runs` noisy scores of them (AUROC about 0.75)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=num_examples)
    return labels, [labels + rng.normal(scale=1.0, size=num_examples) for _ in range(num_runs)]


def test_bootstrap_interval_matches_a_resampling_loop_over_scikit_learn():
    labels, (scores,) = scored_examples(300, seed=3)
    low, high = bootstrap_auroc_interval(labels, [scores], num_resamples=1000, seed=0)
    rng = np.random.default_rng(1)
    resamples = rng.integers(0, len(labels), size=(1000, len(labels)))
    reference = [roc_auc_score(labels[rows], scores[rows]) for rows in resamples]
    reference_low, reference_high = np.percentile(reference, [2.5, 97.5])
    assert low < roc_auc_score(labels, scores) < high
    assert low == pytest.approx(reference_low, abs=0.01) and high == pytest.approx(reference_high, abs=0.01)
    assert bootstrap_auroc_interval(labels, [scores], num_resamples=1000, seed=0) == (low, high)


def test_bootstrap_interval_narrows_with_more_examples_and_pairs_runs_with_the_baseline():
    widths = []
    for num_examples in (300, 1200):
        labels, runs = scored_examples(num_examples, seed=4, num_runs=3)
        low, high = bootstrap_auroc_interval(labels, runs, num_resamples=500)
        mean_auroc = np.mean([roc_auc_score(labels, run) for run in runs])
        assert low < mean_auroc < high
        widths.append(high - low)
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.25)  # 1 / sqrt(n)
    # The same runs as their own baseline: every resample gives a difference of exactly 0.
    assert bootstrap_auroc_interval(labels, runs, baseline=runs, num_resamples=200) == (0.0, 0.0)
    # Paired: a margin is known far better than either AUROC on its own.
    better = [run + 0.5 * labels for run in runs]
    margin_low, margin_high = bootstrap_auroc_interval(labels, better, baseline=runs, num_resamples=500)
    assert 0 < margin_low and margin_high - margin_low < widths[1]
