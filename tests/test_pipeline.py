"""From a trained folder or a Hub repository to probabilities: `pipeline(...)` on raw rows, a DataFrame or a CSV gives
`scripts/predict.py`'s probabilities (its transactions encoded once, then read from the cache), for every attention
kind, in this process and in one without txformer (from the folder and from a push recorded by the offline fake Hub);
`predict --model <repo> --revision <commit>`; weights that do not match their config; a predictions file and a report
that cannot disagree."""

import hashlib
import json
import logging
import shutil
import textwrap
from pathlib import Path

import huggingface_hub
import pandas as pd
import pytest
import torch
from conftest import ATTENTION_TYPES, run_without_txformer
from inference_helpers import read_predictions, train_tiny_folder
from safetensors.torch import load_file, save_file
from test_hub import recording_hub_api
from transformers import pipeline

from txformer import TransactionClassificationPipeline, TxFormerProcessor
from txformer.data import EventVocabulary, build_customer_dataset, generate_synthetic_data
from txformer.hub import push_folder_to_hub
from txformer.pipeline_txformer import read_csv_rows
from txformer.prediction import PredictionArguments, predict, report_path


MAX_LENGTH = 16
REPO_ID = "someone/tiny-txformer"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOLERANCE = 1e-6
# Every kind reads the last MAX_LENGTH events, except the ∞-former: whole histories, in segments of 16 events.
SETTINGS = {"infinity": {"max_length": None, "segment_length": 16}}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_data(folder, num_customers=40, seed=0)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, synthetic_dir) -> dict[str, Path]:
    """A folder trained for two steps per attention kind; the ∞-former reads whole histories."""
    customers = build_customer_dataset(synthetic_dir / "transactions.csv", synthetic_dir / "gender_train.csv")
    vocabulary = EventVocabulary.fit(customers, min_count=2)
    root = tmp_path_factory.mktemp("trained")
    return {
        kind: train_tiny_folder(
            root / kind, kind, vocabulary, customers, **SETTINGS.get(kind, {"max_length": MAX_LENGTH})
        )
        for kind in ATTENTION_TYPES
    }


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, folders, synthetic_dir) -> dict[str, dict[int, float]]:
    """`scripts/predict.py`'s probabilities for every customer of the transactions, per kind."""
    output = tmp_path_factory.mktemp("predicted")
    return {
        kind: read_predictions(
            predict(
                PredictionArguments(
                    model=str(folder),
                    transactions=str(synthetic_dir / "transactions.csv"),
                    output_file=str(output / f"{kind}.csv"),
                    batch_size=16,
                    device="cpu",
                )
            )
        )
        for kind, folder in folders.items()
    }


def assert_agree(results: list[dict], expected: dict[int, float]) -> None:
    """Same customers in the same (ascending) order, probabilities within the CSV's rounding and 1e-6."""
    assert [int(result["customer_id"]) for result in results] == list(expected)
    for result in results:
        assert abs(result["probability"] - expected[int(result["customer_id"])]) <= TOLERANCE, result


def test_trained_folders_carry_the_processor_and_the_pipeline(folders):
    for folder in folders.values():
        assert {"preprocessor_config.json", "processing_txformer.py", "pipeline_txformer.py"} <= {
            path.name for path in folder.iterdir()
        }
        config = json.loads((folder / "config.json").read_text())
        assert list(config["custom_pipelines"]) == ["transaction-classification"]


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_the_pipeline_matches_predict_on_rows_a_dataframe_and_a_csv(folders, predicted, synthetic_dir, attention_type):
    scorer = pipeline(model=str(folders[attention_type]), trust_remote_code=True, device="cpu")
    # transformers runs the folder's copy of the pipeline code (named in config.json), even with txformer installed.
    assert type(scorer).__name__ == TransactionClassificationPipeline.__name__
    assert isinstance(scorer.feature_extractor, TxFormerProcessor)
    transactions = synthetic_dir / "transactions.csv"
    rows, _ = read_csv_rows(transactions)
    frame = pd.read_csv(transactions, dtype={"term_id": str})
    # One history per batch too (the pipeline's unbatched path), but not with the ∞-former: it reads every segment.
    one_by_one = 3 if attention_type == "infinity" else 1
    for inputs, batch_size in ((str(transactions), 7), (rows[::-1], one_by_one), (frame, None)):
        assert_agree(scorer(inputs, batch_size=batch_size), predicted[attention_type])


def test_a_second_prediction_reads_the_encoded_transactions_from_the_cache(
    folders, predicted, synthetic_dir, tmp_path, caplog
):
    """The three folders share a vocabulary: the first prediction encoded the file for all of them."""
    arguments = PredictionArguments(
        model=str(folders["full"]),
        transactions=str(synthetic_dir / "transactions.csv"),
        output_file=str(tmp_path / "again.csv"),
        batch_size=16,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="txformer.data.prepare"):
        assert read_predictions(predict(arguments)) == predicted["full"]
    assert "Using the prepared data in" in caplog.text and "Encoding" not in caplog.text


def test_the_pipeline_takes_the_max_length_of_a_call(folders, synthetic_dir):
    scorer = pipeline(model=str(folders["full"]), trust_remote_code=True, device="cpu")
    transactions = str(synthetic_dir / "transactions.csv")
    default, longer = scorer(transactions), scorer(transactions, max_length=64)
    assert default != longer and scorer(transactions) == default
    with pytest.raises(TypeError, match="max_lenght"):
        scorer(transactions, max_lenght=64)


def hub_cache_from_recorded_push(folder: Path, hub_cache: Path) -> None:
    """The Hub cache layout that downloading `REPO_ID` at `COMMIT` leaves: the files of the recorded commit."""
    api = recording_hub_api()
    push_folder_to_hub(folder, REPO_ID, api=api)
    snapshot = hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for operation in api.create_commit.call_args.kwargs["operations"]:
        shutil.copy(operation.path_or_fileobj, snapshot / operation.path_in_repo)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)


BARE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoProcessor, pipeline
    results = {}
    for name, model, revision, transactions in json.loads(sys.argv[1]):
        encoder = AutoModel.from_pretrained(model, revision=revision, trust_remote_code=True)
        classifier = AutoModelForSequenceClassification.from_pretrained(model, revision=revision, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=True)
        scorer = pipeline(model=model, revision=revision, trust_remote_code=True, device="cpu")
        modules = {type(part).__module__.split(".")[0] for part in (encoder, classifier, processor, scorer, scorer.model)}
        assert modules == {"transformers_modules"}, modules
        assert type(encoder).__name__ == "TxFormerModel", type(encoder)
        results[name] = scorer(transactions, batch_size=8)
    print(json.dumps(results))
    """
)


def test_without_txformer_from_the_folders_and_from_a_recorded_push(
    folders, predicted, synthetic_dir, tmp_path, monkeypatch
):
    transactions = str(synthetic_dir / "transactions.csv")
    hub_cache_from_recorded_push(folders["infinity"], tmp_path / "hf_home" / "hub")
    runs = [[kind, str(folder), None, transactions] for kind, folder in folders.items()]
    runs.append(["hub", REPO_ID, COMMIT, transactions])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    results = json.loads(run_without_txformer(BARE_SCRIPT, [json.dumps(runs)], tmp_path))
    for kind in ATTENTION_TYPES:
        assert_agree(results[kind], predicted[kind])
    assert_agree(results["hub"], predicted["infinity"])


def test_predict_takes_a_hub_repository_and_a_revision(folders, predicted, synthetic_dir, tmp_path, monkeypatch):
    hub_cache_from_recorded_push(folders["performer"], tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    arguments = PredictionArguments(
        model=REPO_ID, revision=COMMIT, transactions=str(synthetic_dir / "transactions.csv"), device="cpu"
    )
    arguments.output_file = str(tmp_path / "predictions.csv")
    assert read_predictions(predict(arguments)) == predicted["performer"]
    report = json.loads(report_path(tmp_path / "predictions.csv").read_text())
    assert (report["model"], report["revision"]) == (REPO_ID, COMMIT)


def copy_folder(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination)
    return destination


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_weight", "missing from the weights: txformer.layers.1.mlp.fc_in.weight"),
        ("extra_weight", "not in the model: txformer.extra.weight"),
        ("fewer_layers", "not in the model: .*txformer.layers.1"),
    ],
)
def test_weights_that_do_not_match_the_config_are_an_error(folders, synthetic_dir, tmp_path, change, message):
    folder = copy_folder(folders["full"], tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    if change == "drop_weight":
        del weights["txformer.layers.1.mlp.fc_in.weight"]
    elif change == "extra_weight":
        weights["txformer.extra.weight"] = torch.zeros(2)
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    output_file = tmp_path / "predictions.csv"
    arguments = PredictionArguments(
        model=str(folder), transactions=str(synthetic_dir / "transactions.csv"), output_file=str(output_file)
    )
    with pytest.raises(ValueError, match=f"{message}.*the folder mixes files of different training runs"):
        predict(arguments)
    assert not output_file.exists()


def test_the_report_and_the_predictions_cannot_disagree(folders, synthetic_dir, tmp_path, monkeypatch):
    output_file = tmp_path / "predictions.csv"
    arguments = PredictionArguments(
        model=str(folders["full"]), transactions=str(synthetic_dir / "transactions.csv"), output_file=str(output_file)
    )
    predict(arguments)
    report = json.loads(report_path(output_file).read_text())
    assert report["predictions_file"] == "predictions.csv" and len(report["run_id"]) == 32
    assert report["predictions_sha256"] == hashlib.sha256(output_file.read_bytes()).hexdigest()

    # A run stopped after writing the new predictions but before its report leaves no report of another run.
    def stop(path, payload):
        raise KeyboardInterrupt

    monkeypatch.setattr("txformer.prediction.atomic_write_json", stop)
    arguments.max_length = 4
    with pytest.raises(KeyboardInterrupt):
        predict(arguments)
    assert output_file.exists() and not report_path(output_file).exists()


def test_an_unwritable_output_is_refused_before_scoring(folders, synthetic_dir, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    arguments = PredictionArguments(
        model_dir=str(folders["full"]),
        transactions=str(synthetic_dir / "transactions.csv"),
        output_file=str(blocker / "predictions.csv"),
    )
    with pytest.raises(OSError, match="not_a_folder"):
        predict(arguments)


def test_model_and_model_dir(folders):
    assert PredictionArguments(model_dir="a", transactions="t").model == "a"
    assert PredictionArguments(model="a", model_dir="a", transactions="t").model == "a"
    with pytest.raises(ValueError, match="differ"):
        PredictionArguments(model="a", model_dir="b", transactions="t")
    with pytest.raises(ValueError, match="Give --model"):
        PredictionArguments(transactions="t")
