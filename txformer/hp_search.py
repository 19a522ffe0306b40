"""Hyperparameter search before the final run (`--hp_search_trials`): `Trainer.hyperparameter_search` with optuna
over the learning rate, the weight decay and (for a new model) the dropout. Each trial trains on the training split
and is scored by its best validation AUROC (`metric_for_best_model`); the held-out split never steers it."""

import copy
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .io_utils import atomic_write_json


logger = logging.getLogger(__name__)

HP_SEARCH_DIR = "hp_search"
BEST_FILE = "best.json"
TRIALS_FILE = "trials.json"
# The learning rate is searched over [rate / LEARNING_RATE_SPAN, rate * LEARNING_RATE_SPAN] around the recipe's.
LEARNING_RATE_SPAN = 4.0
WEIGHT_DECAYS = (0.0, 0.01, 0.1)
DROPOUT_RANGE = (0.0, 0.3)


@dataclass
class SearchResult:
    """The best trial's values: Trainer flags (`learning_rate`, `weight_decay`) and config fields (`hidden_dropout_prob`
    of a new model), and its best validation metric."""

    training_flags: dict[str, float]
    config_fields: dict[str, float]
    objective: float
    num_trials: int

    @classmethod
    def load(cls, output_dir: str | Path) -> "SearchResult | None":
        """The result saved in `output_dir` by an earlier call (None when there is none)."""
        path = Path(output_dir) / HP_SEARCH_DIR / BEST_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def apply(self, training_args: Any) -> None:
        """Sets the searched Trainer flags on `training_args`."""
        for name, value in self.training_flags.items():
            setattr(training_args, name, value)


def check_search_backend() -> None:
    """Refuses `--hp_search_trials` where optuna is not installed, with the install command."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ValueError(
            "--hp_search_trials runs Trainer.hyperparameter_search with optuna, which is not installed: "
            "pip install 'txformer[tune]' (or pip install optuna)."
        ) from None


def search_space(learning_rate: float, searches_dropout: bool) -> Callable[[Any], dict[str, float]]:
    """The optuna space of the Trainer flags around the recipe's `learning_rate`; the dropout of a new model is
    drawn by `model_init` (it is a config field, not a Trainer flag)."""

    def space(trial) -> dict[str, float]:
        values = {
            "learning_rate": trial.suggest_float(
                "learning_rate", learning_rate / LEARNING_RATE_SPAN, learning_rate * LEARNING_RATE_SPAN, log=True
            ),
            "weight_decay": trial.suggest_categorical("weight_decay", list(WEIGHT_DECAYS)),
        }
        if searches_dropout:
            trial_dropout(trial)
        return values

    return space


def trial_dropout(trial) -> float:
    """The trial's `hidden_dropout_prob` (optuna returns the same value to every call of a trial)."""
    return trial.suggest_float("hidden_dropout_prob", *DROPOUT_RANGE)


class ResetEarlyStoppingCallback(TrainerCallback):
    """Zeroes an `EarlyStoppingCallback`'s count at the start of every trial (a resumed run restores it after)."""

    def __init__(self, early_stopping: TrainerCallback):
        self.early_stopping = early_stopping

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.early_stopping.early_stopping_patience_counter = 0


def keep_trial_logs(search_dir: Path) -> None:
    """Keeps each trial's `trainer_state.json` (its loss and validation curves, from its newest checkpoint) and
    removes the trials' checkpoints: the final run retrains with the best values."""
    for trial_dir in search_dir.glob("trial-*"):
        checkpoints = sorted(
            trial_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda path: int(path.name.split("-")[-1])
        )
        if checkpoints:
            shutil.copyfile(checkpoints[-1] / TRAINER_STATE_NAME, trial_dir / TRAINER_STATE_NAME)
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)


def search_hyperparameters(
    trainer_class: type,
    build_model: Callable[[dict[str, float]], Any],
    trainer_inputs: dict[str, Any],
    callbacks: list[TrainerCallback],
    num_trials: int,
    searches_dropout: bool,
) -> SearchResult:
    """Runs `num_trials` trials of `trainer_class(**trainer_inputs)` through `Trainer.hyperparameter_search` (optuna's
    TPE sampler seeded by the run's seed, its median pruner on the validation metric) and writes every trial and the
    best to `output_dir/hp_search/`. `build_model(config_fields)` makes a fresh model of a trial."""
    import optuna

    args = copy.deepcopy(trainer_inputs["args"])
    args.push_to_hub = False
    early_stopping = [callback for callback in callbacks if hasattr(callback, "early_stopping_patience_counter")]
    trainer = trainer_class(
        **{**trainer_inputs, "args": args},
        model_init=lambda trial=None: build_model(
            {"hidden_dropout_prob": trial_dropout(trial)} if trial is not None and searches_dropout else {}
        ),
        callbacks=[*callbacks, *(ResetEarlyStoppingCallback(callback) for callback in early_stopping)],
    )
    metric = args.metric_for_best_model
    metric_key = metric if metric.startswith("eval_") else f"eval_{metric}"

    def best_so_far(metrics: dict[str, float]) -> float:
        # Evaluated before the Trainer updates `best_metric` with this evaluation.
        best = trainer.state.best_metric
        value = metrics[metric_key]
        return value if best is None else (max if args.greater_is_better else min)(value, best)

    storage = optuna.storages.InMemoryStorage()
    search_dir = Path(args.output_dir) / HP_SEARCH_DIR
    best_run = trainer.hyperparameter_search(
        hp_space=search_space(args.learning_rate, searches_dropout),
        compute_objective=best_so_far,
        n_trials=num_trials,
        direction="maximize" if args.greater_is_better else "minimize",
        backend="optuna",
        hp_name=lambda trial: f"{HP_SEARCH_DIR}/trial-{trial.number}",
        study_name=HP_SEARCH_DIR,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=args.seed),
    )
    trials = optuna.load_study(study_name=HP_SEARCH_DIR, storage=storage).trials
    if trainer.is_world_process_zero():
        keep_trial_logs(search_dir)
    parameters = dict(best_run.hyperparameters)
    config_fields = {name: parameters.pop(name) for name in ("hidden_dropout_prob",) if name in parameters}
    result = SearchResult(
        training_flags=parameters, config_fields=config_fields, objective=best_run.objective, num_trials=len(trials)
    )
    if trainer.is_world_process_zero():
        atomic_write_json(
            search_dir / TRIALS_FILE,
            [
                {"trial": trial.number, "state": trial.state.name, metric: trial.value, **trial.params}
                for trial in trials
            ],
        )
        atomic_write_json(search_dir / BEST_FILE, asdict(result))
    logger.info(
        "Hyperparameter search: best of %d trials %s (%s %.4f); the final run trains with them.",
        len(trials),
        best_run.hyperparameters,
        metric,
        best_run.objective,
    )
    return result


__all__ = ["HP_SEARCH_DIR", "SearchResult", "check_search_backend", "search_hyperparameters"]
