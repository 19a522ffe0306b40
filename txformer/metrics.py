"""Evaluation metrics computed offline (no `evaluate.load` of a Hub script)."""

import numpy as np
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from transformers import EvalPrediction

from .processing_txformer import probability_of_positive_class


def positive_class_probability(logits: np.ndarray) -> np.ndarray:
    """Probability of class 1 from `[n, 2]` logits (softmax) or `[n]`/`[n, 1]` logits (sigmoid), as the pipeline
    computes it."""
    return probability_of_positive_class(torch.as_tensor(np.asarray(logits, dtype=np.float64))).numpy()


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUROC, accuracy at 0.5 and log loss of binary predictions."""
    labels = np.asarray(labels).reshape(-1)
    if np.unique(labels).size < 2:
        raise ValueError("AUROC needs both classes among the evaluated labels; got only one.")
    return {
        "auroc": float(roc_auc_score(labels, probabilities)),
        "accuracy": float(accuracy_score(labels, probabilities >= 0.5)),
        "log_loss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of `[n, classes]` logits, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    log_normalizer = np.logaddexp.reduce(logits, axis=1)
    return float(np.mean(log_normalizer - logits[np.arange(len(labels)), labels]))


def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`Trainer` hook: metrics on the gathered predictions of every process.

    Also returns `loss`, which replaces the Trainer's `eval_loss`: the Trainer averages per-batch losses, in which the
    rows duplicated to even out the last batch across processes count; this is the exact mean over the eval set.
    """
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    metrics = classification_metrics(eval_prediction.label_ids, positive_class_probability(logits))
    if logits.ndim == 2 and logits.shape[1] > 1:
        metrics["loss"] = cross_entropy(logits, eval_prediction.label_ids)
    return metrics
