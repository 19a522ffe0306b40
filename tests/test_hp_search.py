"""`--hp_search_trials`: `Trainer.hyperparameter_search` (optuna) before the run, scored on the validation split, and
the run trained with its best values (a replay of the best trial); pruned trials, interrupted searches and reused
folders; bad flags are refused."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
from test_recipe import tiny_run_flags

from txformer import hp_search
from txformer.hp_search import DROPOUT_RANGE, LEARNING_RATE_SPAN, WEIGHT_DECAYS, SearchResult, best_so_far
from txformer.recipe import STANDARD_RECIPE
from txformer.training import ModelArguments, TxFormerTrainingArguments, main, searched_hyperparameters


optuna = pytest.importorskip("optuna")

SEARCH_FLAGS = ("--max_steps=6", "--save_steps=2", "--early_stopping_patience=0")


def trials_of(output_dir) -> list[dict]:
    return json.loads((output_dir / "hp_search" / "trials.json").read_text())


def validation_curve(trial_dir) -> list[float]:
    state = json.loads((trial_dir / "trainer_state.json").read_text())
    return [entry["eval_validation_auroc"] for entry in state["log_history"] if "eval_validation_auroc" in entry]


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory):
    """A tiny run after a search of two trials, and its metrics."""
    folder = tmp_path_factory.mktemp("search")
    metrics = main(tiny_run_flags(folder / "out", folder / "cache", *SEARCH_FLAGS, "--hp_search_trials=2"))
    return folder / "out", metrics


def test_every_trial_is_drawn_from_the_space_and_scored_by_its_best_validation(searched_run):
    output_dir, _ = searched_run
    trials = trials_of(output_dir)
    assert [trial["trial"] for trial in trials] == [0, 1]
    rate = STANDARD_RECIPE.learning_rate
    for trial in trials:
        assert trial["state"] == "COMPLETE"
        assert rate / LEARNING_RATE_SPAN <= trial["learning_rate"] <= rate * LEARNING_RATE_SPAN
        assert trial["weight_decay"] in WEIGHT_DECAYS
        assert DROPOUT_RANGE[0] <= trial["hidden_dropout_prob"] <= DROPOUT_RANGE[1]
        curve = validation_curve(output_dir / "hp_search" / f"trial-{trial['trial']}")
        assert len(curve) == 3 and trial["validation_auroc"] == max(curve)
    # The final run retrains: the trials keep their curves, not their checkpoints.
    assert not list((output_dir / "hp_search").glob("trial-*/checkpoint-*"))


def test_a_trial_scores_its_best_evaluation():
    assert best_so_far(0.6, None, greater_is_better=True) == 0.6
    assert best_so_far(0.6, 0.7, greater_is_better=True) == 0.7
    assert best_so_far(0.8, 0.7, greater_is_better=True) == 0.8
    assert best_so_far(0.6, 0.7, greater_is_better=False) == 0.6
    assert best_so_far(0.8, 0.7, greater_is_better=False) == 0.7


def test_the_run_repeats_the_best_trial(searched_run):
    output_dir, metrics = searched_run
    best_trial = max(trials_of(output_dir), key=lambda trial: trial["validation_auroc"])
    best = SearchResult.load(output_dir)
    assert best.num_trials == 2 and best.objective == best_trial["validation_auroc"]
    assert best.training_flags == {name: best_trial[name] for name in ("learning_rate", "weight_decay")}
    assert best.config_fields == {"hidden_dropout_prob": best_trial["hidden_dropout_prob"]}
    run = json.loads((output_dir / "training_run.json").read_text())
    assert run["hp_search"] == json.loads((output_dir / "hp_search" / "best.json").read_text())
    assert math.isclose(run["training_args"]["learning_rate"], best_trial["learning_rate"])
    assert run["training_args"]["weight_decay"] == best_trial["weight_decay"]
    config = json.loads((output_dir / "config.json").read_text())
    assert config["hidden_dropout_prob"] == best_trial["hidden_dropout_prob"]
    # Same weights, data order and dropout draws as the trial: the same validation curve.
    final_curve = [
        entry["eval_validation_auroc"]
        for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        if "eval_validation_auroc" in entry
    ]
    assert final_curve == validation_curve(output_dir / "hp_search" / f"trial-{best_trial['trial']}")
    assert metrics["validation_auroc"] == pytest.approx(best.objective, abs=1e-9)


def test_a_pruned_trial_keeps_its_curve_and_is_not_chosen(tmp_path, monkeypatch):
    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 1

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kwargs: PruneTrialOne())
    output_dir = tmp_path / "out"
    main(tiny_run_flags(output_dir, tmp_path / "cache", *SEARCH_FLAGS, "--hp_search_trials=2"))
    trials = trials_of(output_dir)
    assert [trial["state"] for trial in trials] == ["COMPLETE", "PRUNED"]
    assert len(validation_curve(output_dir / "hp_search" / "trial-1")) == 1
    assert SearchResult.load(output_dir).objective == trials[0]["validation_auroc"]


def test_a_search_whose_trials_are_all_pruned_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kwargs: optuna.pruners.ThresholdPruner(lower=2.0))
    with pytest.raises(ValueError, match="was pruned"):
        main(tiny_run_flags(tmp_path / "out", tmp_path / "cache", *SEARCH_FLAGS, "--hp_search_trials=1"))


def keep_only_the_search(output_dir, keep_best: bool) -> None:
    """The folder of a run stopped after its search (`keep_best`) or during it, after its finished trials."""
    for path in output_dir.iterdir():
        if path.name != "hp_search":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not keep_best:
        (output_dir / "hp_search" / "best.json").unlink()
        (output_dir / "hp_search" / "trials.json").unlink()


def test_an_interrupted_search_resumes_with_its_finished_trials(tmp_path):
    output_dir, cache = tmp_path / "out", tmp_path / "cache"
    main(tiny_run_flags(output_dir, cache, *SEARCH_FLAGS, "--hp_search_trials=1"))
    first = trials_of(output_dir)[0]
    keep_only_the_search(output_dir, keep_best=False)
    main(tiny_run_flags(output_dir, cache, *SEARCH_FLAGS, "--hp_search_trials=2", "--resume_from_checkpoint=last"))
    trials = trials_of(output_dir)
    assert [trial["trial"] for trial in trials] == [0, 1] and trials[0] == first
    assert (output_dir / "model.safetensors").is_file()


def test_a_run_stopped_after_its_search_takes_up_the_result(tmp_path, monkeypatch):
    output_dir, cache = tmp_path / "out", tmp_path / "cache"
    main(tiny_run_flags(output_dir, cache, *SEARCH_FLAGS, "--hp_search_trials=1"))
    best = SearchResult.load(output_dir)
    keep_only_the_search(output_dir, keep_best=True)

    def no_search(*args, **kwargs):
        raise AssertionError("the search ran again")

    monkeypatch.setattr("txformer.training.search_hyperparameters", no_search)
    main(tiny_run_flags(output_dir, cache, *SEARCH_FLAGS, "--hp_search_trials=1", "--resume_from_checkpoint=last"))
    assert json.loads((output_dir / "training_run.json").read_text())["hp_search"]["objective"] == best.objective


def test_a_resumed_run_that_did_not_search_is_refused(tmp_path, searched_run):
    output_dir, _ = searched_run
    resumed = tmp_path / "out"
    resumed.mkdir()
    (resumed / "checkpoint-6").symlink_to(output_dir / "checkpoint-6", target_is_directory=True)
    flags = ("--max_steps=8", "--save_steps=2", "--hp_search_trials=2", "--resume_from_checkpoint=last")
    with pytest.raises(ValueError, match="did not search"):
        main(tiny_run_flags(resumed, output_dir.parent / "cache", *flags))


def test_a_new_search_in_a_reused_folder_replaces_the_old_one(tmp_path):
    output_dir, cache = tmp_path / "out", tmp_path / "cache"
    main(tiny_run_flags(output_dir, cache, *SEARCH_FLAGS, "--hp_search_trials=2"))
    (output_dir / "hp_search" / "trial-9" / "checkpoint-2").mkdir(parents=True)
    main(tiny_run_flags(output_dir, cache, *SEARCH_FLAGS, "--hp_search_trials=1", "--overwrite_output_dir=true"))
    assert sorted(path.name for path in (output_dir / "hp_search").glob("trial-*")) == ["trial-0"]
    assert len(trials_of(output_dir)) == 1


def test_a_search_in_a_distributed_launch_is_refused(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None, world_size=2, hp_search_trials=2)
    with pytest.raises(ValueError, match="searches in one process"):
        searched_hyperparameters(ModelArguments(), None, {"args": args}, [], None)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"hp_search_trials": -1}, "0 \\(no search\\) or more"),
        ({"hp_search_trials": 2, "eval_strategy": "no"}, "validation split"),
        ({"hp_search_trials": 2, "deepspeed": "ds_config.json"}, "--deepspeed"),
    ],
)
def test_bad_search_flags_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        TxFormerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **flags)


def test_a_search_without_optuna_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_optuna)
    with pytest.raises(ValueError, match=r"pip install 'txformer\[tune\]'"):
        hp_search.check_search_backend()
