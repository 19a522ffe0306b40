"""Evaluation metrics of binary predictions through `evaluate`: AUROC, accuracy and log loss come from metric modules
that ship inside the package (`txformer/metric_modules/`), loaded from their path and combined, so no Hub and no
network are involved; and a bootstrap confidence interval of AUROC for the comparison report.

Imported by training and reporting code only: `import evaluate` costs seconds (docs/recipe.md, Metrics).
"""

import csv
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import evaluate
import numpy as np
import torch
from scipy import stats
from transformers import EvalPrediction

from .io_utils import atomic_write
from .processing_txformer import probability_of_positive_class


METRIC_MODULES_DIR = Path(__file__).with_name("metric_modules")
CLASSIFICATION_METRICS = ("auroc", "accuracy", "log_loss")
# Resamples ranked at once: bounds the bootstrap's memory to a few hundred copies of the scores.
BOOTSTRAP_BATCH = 200


@functools.cache
def classification_metric_modules() -> evaluate.CombinedEvaluations:
    """The package's AUROC, accuracy and log-loss modules, loaded once from their files and combined (results held
    in memory, nothing written next to them)."""
    return evaluate.combine(
        [evaluate.load(str(METRIC_MODULES_DIR / f"{name}.py"), keep_in_memory=True) for name in CLASSIFICATION_METRICS]
    )


def positive_class_probability(logits: np.ndarray) -> np.ndarray:
    """Probability of class 1 from `[n, 2]` logits (softmax) or `[n]`/`[n, 1]` logits (sigmoid), as the pipeline
    computes it."""
    return probability_of_positive_class(torch.as_tensor(np.asarray(logits, dtype=np.float64))).numpy()


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUROC, accuracy at 0.5 and log loss of binary predictions."""
    labels = np.asarray(labels).reshape(-1)
    if np.unique(labels).size < 2:
        raise ValueError("AUROC needs both classes among the evaluated labels; got only one.")
    return classification_metric_modules().compute(predictions=np.asarray(probabilities), references=labels)


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


def write_evaluated_predictions(
    path: str | os.PathLike, customer_ids: Sequence[int], labels: Sequence[int], probabilities: Sequence[float]
) -> Path:
    """Writes `customer_id,label,probability` of the evaluated customers, atomically, probabilities to the last digit:
    what the metrics were computed from (training's held-out customers, the baseline's), for the comparison report
    to resample."""

    def write_rows(file) -> None:
        writer = csv.writer(file)
        writer.writerow(["customer_id", "label", "probability"])
        writer.writerows(
            (int(customer), int(label), repr(float(probability)))
            for customer, label, probability in zip(customer_ids, labels, probabilities, strict=True)
        )

    return atomic_write(path, write_rows)


def read_evaluated_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Customer ids, labels and probabilities of a file of `write_evaluated_predictions`."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return (
        np.array([int(row["customer_id"]) for row in rows], dtype=np.int64),
        np.array([int(row["label"]) for row in rows], dtype=np.int64),
        np.array([float(row["probability"]) for row in rows], dtype=np.float64),
    )


def ranked_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC along the last axis from ranks (the Mann-Whitney statistic, ties counted half), for many resamples at
    once; equal to `roc_auc_score` on each row."""
    ranks = stats.rankdata(scores, axis=-1)
    positives = labels.sum(axis=-1)
    negatives = labels.shape[-1] - positives
    rank_sum = (ranks * labels).sum(axis=-1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def bootstrap_auroc_interval(
    labels: np.ndarray,
    probabilities: Sequence[np.ndarray],
    baseline: Sequence[np.ndarray] = (),
    confidence_level: float = 0.95,
    num_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval, over the evaluated examples, of the mean AUROC of several runs scored on the same
    examples (`probabilities`: one array per run, e.g. per seed), minus the mean AUROC of `baseline` runs when given.

    Examples are resampled with replacement, the same ones for every run (paired; `scipy.stats.bootstrap`), so the
    interval reflects which examples happened to be evaluated, not the spread between runs. A resample of one class
    has no AUROC: with very few examples of a class the interval can be NaN."""
    labels = np.asarray(labels).reshape(-1).astype(np.float64)
    runs = [np.asarray(run, dtype=np.float64) for run in probabilities]
    baseline_runs = [np.asarray(run, dtype=np.float64) for run in baseline]

    def mean_auroc_difference(resampled_labels: np.ndarray, *scores: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            aurocs = [ranked_auroc(resampled_labels, run) for run in scores]
        difference = np.mean(aurocs[: len(runs)], axis=0)
        if baseline_runs:
            difference = difference - np.mean(aurocs[len(runs) :], axis=0)
        return difference

    result = stats.bootstrap(
        (labels, *runs, *baseline_runs),
        mean_auroc_difference,
        paired=True,
        vectorized=True,
        confidence_level=confidence_level,
        n_resamples=num_resamples,
        method="percentile",
        batch=BOOTSTRAP_BATCH,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
