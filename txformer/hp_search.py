"""Hyperparameter search before the final run (`--hp_search_trials`): `Trainer.hyperparameter_search` with optuna
over the learning rate, the weight decay and (for a new model) the dropout. Each trial trains on the training split
and is scored by its best validation AUROC (`metric_for_best_model`); the held-out split never steers it. The study
is kept in a journal file, so an interrupted search resumes with the trials it has finished."""

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

from .io_utils import atomic_write_json


logger = logging.getLogger(__name__)

HP_SEARCH_DIR = "hp_search"
BEST_FILE = "best.json"
TRIALS_FILE = "trials.json"
STUDY_FILE = "study.journal"
# The learning rate is searched over [rate / LEARNING_RATE_SPAN, rate * LEARNING_RATE_SPAN] around the run's.
LEARNING_RATE_SPAN = 4.0
WEIGHT_DECAYS = (0.0, 0.01, 0.1)
DROPOUT_RANGE = (0.0, 0.3)
# Trials finished before the median pruner compares a trial with the earlier ones.
PRUNER_STARTUP_TRIALS = 3


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


def search_started(output_dir: str | Path) -> bool:
    """Whether a search has begun in `output_dir` (its study file, or its result)."""
    folder = Path(output_dir) / HP_SEARCH_DIR
    return (folder / STUDY_FILE).is_file() or (folder / BEST_FILE).is_file()


def search_space(learning_rate: float, searches_dropout: bool) -> Callable[[Any], dict[str, float]]:
    """The optuna space of the Trainer flags around `learning_rate`; the dropout of a new model is drawn by
    `model_init` (it is a config field, not a Trainer flag)."""

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


def best_so_far(value: float, best: float | None, greater_is_better: bool) -> float:
    """A trial's score after an evaluation of `value`, its best before it being `best` (None: the first)."""
    if best is None:
        return value
    return max(value, best) if greater_is_better else min(value, best)


def finished_trials(study) -> list:
    """The trials of `study` that ended: complete, pruned or failed (not those an interruption left running)."""
    return [trial for trial in study.trials if trial.state.is_finished()]


def all_pruned(study) -> bool:
    """Whether every finished trial of `study` was pruned (so none has a score)."""
    import optuna

    finished = finished_trials(study)
    return bool(finished) and all(trial.state == optuna.trial.TrialState.PRUNED for trial in finished)


class TrialLogCallback(TrainerCallback):
    """Writes each trial's `trainer_state.json` (its loss and validation curves) into its folder when it ends,
    finished or pruned (the `Trainer` ends a pruned trial's training before raising)."""

    def __init__(self, search_dir: Path, current_trial: dict[str, int]):
        self.search_dir = search_dir
        self.current_trial = current_trial

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero and "number" in self.current_trial:
            trial_dir = self.search_dir / f"trial-{self.current_trial['number']}"
            trial_dir.mkdir(parents=True, exist_ok=True)
            state.save_to_json(str(trial_dir / TRAINER_STATE_NAME))


def run_trials(
    trainer_class: type,
    build_model: Callable[[dict[str, float]], Any],
    trainer_inputs: dict[str, Any],
    callbacks: list[TrainerCallback],
    args: Any,
    study: Any,
    storage: Any,
    num_trials: int,
    searches_dropout: bool,
) -> None:
    """Runs `num_trials` more trials of `study` (kept in `storage`) through `Trainer.hyperparameter_search` with the
    search's `args`."""
    import optuna

    search_dir = Path(args.output_dir) / HP_SEARCH_DIR
    current_trial: dict[str, int] = {}

    def model_init(trial=None):
        if trial is None:
            return build_model({})
        current_trial["number"] = trial.number
        return build_model({"hidden_dropout_prob": trial_dropout(trial)} if searches_dropout else {})

    trainer = trainer_class(
        **{**trainer_inputs, "args": args},
        model_init=model_init,
        callbacks=[*callbacks, TrialLogCallback(search_dir, current_trial)],
    )
    metric = args.metric_for_best_model
    metric_key = metric if metric.startswith("eval_") else f"eval_{metric}"
    try:
        trainer.hyperparameter_search(
            hp_space=search_space(args.learning_rate, searches_dropout),
            # Called before the Trainer updates `best_metric` with this evaluation.
            compute_objective=lambda metrics: best_so_far(
                metrics[metric_key], trainer.state.best_metric, args.greater_is_better
            ),
            n_trials=num_trials,
            direction=study.direction.name.lower(),
            backend="optuna",
            hp_name=lambda trial: f"{HP_SEARCH_DIR}/trial-{trial.number}",
            study_name=study.study_name,
            storage=storage,
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=args.seed + len(finished_trials(study))),
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=int(args.early_stopping_start * args.max_steps)
            ),
        )
    except ValueError:
        # optuna's `best_trial` when every trial was pruned: said by the caller, with the folder; any other error stands.
        if not all_pruned(study):
            raise
    # The search's model and optimizer are not needed by the final run (the trainer lives on in a reference cycle).
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None


def search_hyperparameters(
    trainer_class: type,
    build_model: Callable[[dict[str, float]], Any],
    trainer_inputs: dict[str, Any],
    callbacks: list[TrainerCallback],
    num_trials: int,
    searches_dropout: bool,
    resume: bool = False,
) -> SearchResult:
    """Runs `num_trials` trials of `trainer_class(**trainer_inputs)` through `Trainer.hyperparameter_search` (optuna's
    TPE sampler seeded by the run's seed; its median pruner on the validation metric, after `PRUNER_STARTUP_TRIALS`
    trials and never before `early_stopping_start` of the budget) and writes every trial and the best to
    `output_dir/hp_search/`. `build_model(config_fields)` makes a fresh model of a trial. With `resume`, the trials
    that an interrupted search finished count, and only the rest run; otherwise an earlier search's folder is
    replaced."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    args = copy.deepcopy(trainer_inputs["args"])
    args.push_to_hub = False
    search_dir = Path(args.output_dir) / HP_SEARCH_DIR
    if not resume and search_dir.exists():
        shutil.rmtree(search_dir)
    search_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(search_dir / STUDY_FILE)))
    direction = "maximize" if args.greater_is_better else "minimize"
    study = optuna.create_study(study_name=HP_SEARCH_DIR, storage=storage, direction=direction, load_if_exists=True)
    done = len(finished_trials(study))
    if done < num_trials:
        if done:
            logger.info("Hyperparameter search: %d of %d trials done already; running the rest.", done, num_trials)
        run_trials(
            trainer_class,
            build_model,
            trainer_inputs,
            callbacks,
            args,
            study,
            storage,
            num_trials - done,
            searches_dropout,
        )
    if all_pruned(study):
        raise ValueError(
            f"--hp_search_trials: every trial of the search in {search_dir} was pruned (their curves are in its "
            "trial folders); give more trials or a longer budget."
        )
    for checkpoint in search_dir.glob("trial-*/checkpoint-*"):
        shutil.rmtree(checkpoint)
    parameters = dict(study.best_trial.params)
    config_fields = {name: parameters.pop(name) for name in ("hidden_dropout_prob",) if name in parameters}
    trials = finished_trials(study)
    metric = args.metric_for_best_model
    result = SearchResult(
        training_flags=parameters, config_fields=config_fields, objective=study.best_value, num_trials=len(trials)
    )
    atomic_write_json(
        search_dir / TRIALS_FILE,
        [{"trial": trial.number, "state": trial.state.name, metric: trial.value, **trial.params} for trial in trials],
    )
    atomic_write_json(search_dir / BEST_FILE, asdict(result))
    logger.info(
        "Hyperparameter search: best of %d trials %s (%s %.4f); the final run trains with them.",
        len(trials),
        study.best_trial.params,
        metric,
        study.best_value,
    )
    return result


__all__ = [
    "HP_SEARCH_DIR",
    "SearchResult",
    "best_so_far",
    "check_search_backend",
    "search_hyperparameters",
    "search_started",
]
