"""Area under the ROC curve of predicted probabilities (scikit-learn's `roc_auc_score`); an `evaluate` metric
module that ships with txformer and loads from its path."""

import evaluate
from sklearn.metrics import roc_auc_score

from .binary_inputs import FEATURES, INPUTS_DESCRIPTION


class Auroc(evaluate.Metric):
    """AUROC: the probability that a random positive example is scored above a random negative one."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description=INPUTS_DESCRIPTION, features=FEATURES
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"auroc": float(roc_auc_score(references, predictions))}
