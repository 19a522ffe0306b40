"""Accuracy of predicted probabilities thresholded at 0.5 (scikit-learn's `accuracy_score`); an `evaluate` metric
module that ships with txformer and loads from its path."""

import evaluate
import numpy as np
from sklearn.metrics import accuracy_score

from .binary_inputs import FEATURES, INPUTS_DESCRIPTION


THRESHOLD = 0.5


class Accuracy(evaluate.Metric):
    """The share of examples whose probability of class 1 is on the side of 0.5 that their label is."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description=INPUTS_DESCRIPTION, features=FEATURES
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"accuracy": float(accuracy_score(references, np.asarray(predictions) >= THRESHOLD))}
