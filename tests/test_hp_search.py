"""`--hp_search_trials`: `Trainer.hyperparameter_search` (optuna) before the run, scored on the validation split, and
the run trained with its best values; a resumed run reuses them; bad flags are refused."""

import json
import math

import pytest
from test_recipe import tiny_run_flags

from txformer import hp_search
from txformer.hp_search import DROPOUT_RANGE, LEARNING_RATE_SPAN, WEIGHT_DECAYS, SearchResult
from txformer.recipe import STANDARD_RECIPE
from txformer.training import TxFormerTrainingArguments, main


pytest.importorskip("optuna")

SEARCH_FLAGS = ("--max_steps=6", "--save_steps=2", "--hp_search_trials=2")


@pytest.fixture(scope="module")
def searched_run(tmp_path_factory):
    """A tiny run after a search of two trials, and its metrics."""
    folder = tmp_path_factory.mktemp("search")
    metrics = main(tiny_run_flags(folder / "out", folder / "cache", *SEARCH_FLAGS))
    return folder / "out", metrics


def test_every_trial_is_drawn_from_the_space_and_scored_on_validation(searched_run):
    output_dir, _ = searched_run
    trials = json.loads((output_dir / "hp_search" / "trials.json").read_text())
    assert [trial["trial"] for trial in trials] == [0, 1]
    rate = STANDARD_RECIPE.learning_rate
    for trial in trials:
        assert trial["state"] == "COMPLETE" and 0.0 <= trial["validation_auroc"] <= 1.0
        assert rate / LEARNING_RATE_SPAN <= trial["learning_rate"] <= rate * LEARNING_RATE_SPAN
        assert trial["weight_decay"] in WEIGHT_DECAYS
        assert DROPOUT_RANGE[0] <= trial["hidden_dropout_prob"] <= DROPOUT_RANGE[1]
        # A trial is scored by the best of its evaluations, not by the last one.
        state = json.loads((output_dir / "hp_search" / f"trial-{trial['trial']}" / "trainer_state.json").read_text())
        evaluations = [
            entry["eval_validation_auroc"] for entry in state["log_history"] if "eval_validation_auroc" in entry
        ]
        assert len(evaluations) == 3 and trial["validation_auroc"] == max(evaluations)
    # The final run retrains: the trials keep their logs, not their checkpoints.
    assert not list((output_dir / "hp_search").glob("trial-*/checkpoint-*"))


def test_the_run_trains_with_the_best_trial(searched_run):
    output_dir, metrics = searched_run
    trials = json.loads((output_dir / "hp_search" / "trials.json").read_text())
    best_trial = max(trials, key=lambda trial: trial["validation_auroc"])
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
    assert metrics["train_steps"] == 6 and "eval_auroc" in metrics


def test_a_resumed_run_reuses_the_search_of_its_first_call(tmp_path, searched_run, monkeypatch):
    output_dir, _ = searched_run
    resumed = tmp_path / "out"
    (resumed / "hp_search").mkdir(parents=True)
    (resumed / "hp_search" / "best.json").write_text((output_dir / "hp_search" / "best.json").read_text())
    (resumed / "checkpoint-2").symlink_to(output_dir / "checkpoint-6", target_is_directory=True)

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr("txformer.training.search_hyperparameters", no_search)
    cache = output_dir.parent / "cache"
    flags = (*SEARCH_FLAGS[:-1], "--max_steps=8", "--hp_search_trials=2", "--resume_from_checkpoint=last")
    metrics = main(tiny_run_flags(resumed, cache, *flags))
    assert metrics["train_steps"] == 8
    assert json.loads((resumed / "training_run.json").read_text())["hp_search"]["num_trials"] == 2


def test_a_resumed_run_that_did_not_search_is_refused(tmp_path, searched_run):
    output_dir, _ = searched_run
    resumed = tmp_path / "out"
    resumed.mkdir()
    (resumed / "checkpoint-6").symlink_to(output_dir / "checkpoint-6", target_is_directory=True)
    flags = ("--max_steps=8", "--save_steps=2", "--hp_search_trials=2", "--resume_from_checkpoint=last")
    with pytest.raises(ValueError, match="did not search"):
        main(tiny_run_flags(resumed, output_dir.parent / "cache", *flags))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"hp_search_trials": -1}, "0 \\(no search\\) or more"),
        ({"hp_search_trials": 2, "eval_strategy": "no"}, "validation split"),
    ],
)
def test_bad_search_flags_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        TxFormerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **flags)


def test_a_search_without_optuna_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_optuna)
    with pytest.raises(ValueError, match=r"pip install 'txformer\[tune\]'"):
        hp_search.check_search_backend()


def test_a_search_in_a_distributed_launch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="searches in one process"):
        TxFormerTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, hp_search_trials=2)
