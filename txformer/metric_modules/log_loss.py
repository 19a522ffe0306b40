"""Mean binary cross-entropy of predicted probabilities, clipped to [1e-7, 1 - 1e-7] (scikit-learn's `log_loss`);
an `evaluate` metric module that ships with txformer and loads from its path."""

import evaluate
import numpy as np
from sklearn.metrics import log_loss

from .binary_inputs import FEATURES, INPUTS_DESCRIPTION


EPSILON = 1e-7


class LogLoss(evaluate.Metric):
    """Log loss: the mean negative log-likelihood of the labels under the predicted probabilities."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description=INPUTS_DESCRIPTION, features=FEATURES
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        probabilities = np.clip(np.asarray(predictions), EPSILON, 1 - EPSILON)
        return {"log_loss": float(log_loss(references, probabilities, labels=[0, 1]))}
