"""Hub side, offline: the pushed file set, the model card, the one-commit upload and the Trainer's own pushes (Hub
client replaced at its boundary), the offline CLI, and loading and scoring from the pushed files alone."""

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import run_without_txformer, tiny_config
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from transformers import Trainer, TrainingArguments

from txformer import TxFormerForSequenceClassification, TxFormerProcessor
from txformer.configuration_txformer import ATTENTION_KINDS
from txformer.data import EventVocabulary, TransactionCollator, build_customer_dataset, generate_synthetic_data
from txformer.hub import (
    IncompleteModelFolderError,
    PushCodeFilesCallback,
    files_to_push,
    push_folder_to_hub,
    render_model_card,
)
from txformer.pipeline_txformer import custom_pipelines
from txformer.prediction import PredictionArguments, predict


REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "someone/tiny-txformer"
NUM_CUSTOMERS = 40
MAX_LENGTH = 16
PREPROCESSING = {"max_length": MAX_LENGTH, "label_prior": 0.45}
RESULTS = {
    "eval_auroc": 0.8123,
    "eval_accuracy": 0.7345,
    "eval_log_loss": 0.5012,
    "eval_loss": 0.5012,
    "eval_samples": 84,
    "train_samples": 756,
    "epoch": 4.0,
    "train_runtime": 12.5,
    "train_loss": 0.6123,
    "oracle_auroc_all": 0.9011,
    "oracle_auroc_last_64": 0.8502,
    "oracle_auroc_last_max_length": 0.8755,
}
PROFILE_SUMMARY = {
    "num_steps": 20,
    "step_time_s": {"median": 0.0421},
    "samples_per_s_median": 1520.5,
    "tokens_per_s_median": 24330.0,
    "peak_memory_mib": 812.0,
    "per_rank": [{"rank": 0, "memory_source": "process_rss_high_water_mark"}],
    "training": {
        "world_size": 1,
        "per_device_train_batch_size": 64,
        "gradient_accumulation_steps": 1,
        "device": "cpu",
    },
    "hardware": {"cpu_model": "Test CPU", "cpu_count_usable": 2, "gpu_names": []},
    "software": {"torch": "2.13.0", "transformers": "5.23.0"},
}


def training_run(transactions: str | None = None) -> dict:
    """`training_run.json` as `txformer.training` writes it; `transactions=None` means synthetic data."""
    return {
        "model_args": {"attention_type": "full", "attn_implementation": "sdpa", "model_name_or_path": None},
        "data_args": {
            "transactions": transactions,
            "labels": None if transactions is None else "gender_train.csv",
            "synthetic_num_customers": NUM_CUSTOMERS,
            "synthetic_seed": 0,
            "max_length": MAX_LENGTH,
            "eval_fraction": 0.1,
            "split_seed": 42,
            "max_train_customers": None,
        },
        "torch": torch.__version__,
    }


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_data(folder, num_customers=NUM_CUSTOMERS, seed=0)
    return folder


@pytest.fixture(scope="module")
def customers(synthetic_dir):
    return build_customer_dataset(synthetic_dir / "transactions.csv", synthetic_dir / "gender_train.csv")


@pytest.fixture(scope="module")
def vocabulary(customers) -> EventVocabulary:
    return EventVocabulary.fit(customers, min_count=1)


def model_for(vocabulary: EventVocabulary, attention_type: str = "full") -> TxFormerForSequenceClassification:
    """A tiny untrained classifier whose event schema is the vocabulary's, which names the pipeline in its config."""
    torch.manual_seed(0)
    config = tiny_config(
        attention_type,
        categorical_fields=list(vocabulary.categorical_fields),
        categorical_vocab_sizes=list(vocabulary.vocab_sizes),
        numeric_fields=list(vocabulary.numeric_fields),
    )
    model = TxFormerForSequenceClassification(config).eval()
    model.config.custom_pipelines = custom_pipelines()
    return model


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload))


@pytest.fixture
def output_folder(tmp_path, vocabulary) -> Path:
    """A training output folder written without training, with the files that must never be pushed next to it."""
    folder = tmp_path / "outputs"
    model = model_for(vocabulary)
    model.save_pretrained(folder)
    vocabulary.to_processor(**PREPROCESSING).save_pretrained(folder)
    write_json(folder / "all_results.json", RESULTS)
    write_json(folder / "training_run.json", training_run())
    write_json(folder / "profile_summary.json", PROFILE_SUMMARY)
    (folder / "profile_steps.jsonl").write_text("{}\n")
    torch.save({"learning_rate": 1e-3}, folder / "training_args.bin")
    model.save_pretrained(folder / "checkpoint-4")
    torch.save({"state": {}}, folder / "checkpoint-4" / "optimizer.pt")
    return folder


def test_files_to_push_is_the_complete_set_and_holds_no_pickle(output_folder):
    pushed = files_to_push(output_folder)
    names = {path.name for path in pushed}
    code_files = {path.name for path in output_folder.glob("*.py")}  # what save_pretrained copied
    assert {"modeling_txformer.py", "configuration_txformer.py", "attention_full.py"} <= code_files
    assert {"processing_txformer.py", "pipeline_txformer.py"} <= code_files
    assert names == code_files | {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "all_results.json",
        "training_run.json",
        "profile_summary.json",
    }
    assert all(path.parent == output_folder and path.is_file() for path in pushed)
    assert not any(path.suffix in {".bin", ".pt", ".pth", ".pkl"} for path in pushed)


@pytest.mark.parametrize(
    "name",
    [
        "preprocessor_config.json",
        "model.safetensors",
        "modeling_txformer.py",
        "attention_full.py",
        "processing_txformer.py",
        "pipeline_txformer.py",
    ],
)
def test_a_missing_essential_file_is_refused_by_name(output_folder, name):
    (output_folder / name).unlink()
    with pytest.raises(IncompleteModelFolderError, match=re.escape(name)):
        files_to_push(output_folder)


def test_pickled_weights_alone_are_refused(output_folder):
    state_dict = TxFormerForSequenceClassification.from_pretrained(output_folder).state_dict()
    (output_folder / "model.safetensors").unlink()
    torch.save(state_dict, output_folder / "pytorch_model.bin")
    with pytest.raises(IncompleteModelFolderError, match="safetensors"):
        files_to_push(output_folder)


def test_a_config_without_auto_map_is_refused(output_folder):
    config = json.loads((output_folder / "config.json").read_text())
    del config["auto_map"]
    write_json(output_folder / "config.json", config)
    with pytest.raises(IncompleteModelFolderError, match="auto_map entry AutoModelForSequenceClassification"):
        files_to_push(output_folder)


def test_a_config_without_the_pipeline_is_refused_and_a_push_adds_it(output_folder):
    config = json.loads((output_folder / "config.json").read_text())
    del config["custom_pipelines"]
    write_json(output_folder / "config.json", config)
    with pytest.raises(IncompleteModelFolderError, match="custom_pipelines entry transaction-classification"):
        files_to_push(output_folder)
    push_folder_to_hub(output_folder, REPO_ID, api=recording_hub_api())
    assert "transaction-classification" in json.loads((output_folder / "config.json").read_text())["custom_pipelines"]


def test_a_folder_of_the_older_layout_is_pushed_with_its_processor(output_folder, vocabulary):
    processor = TxFormerProcessor.from_pretrained(output_folder)
    (output_folder / "preprocessor_config.json").unlink()
    vocabulary.save_pretrained(output_folder)
    write_json(output_folder / "preprocessing.json", PREPROCESSING)
    with pytest.raises(IncompleteModelFolderError, match="preprocessor_config.json"):
        files_to_push(output_folder)
    api = recording_hub_api()
    push_folder_to_hub(output_folder, REPO_ID, api=api)
    pushed = {operation.path_in_repo for operation in api.create_commit.call_args.kwargs["operations"]}
    assert {"preprocessor_config.json", "processing_txformer.py", "pipeline_txformer.py"} <= pushed
    assert not {"event_vocabulary.json", "preprocessing.json"} & pushed
    assert TxFormerProcessor.from_pretrained(output_folder).event_vocabulary == processor.event_vocabulary


def test_the_card_carries_the_measured_results_and_parses_back(output_folder):
    card = ModelCard(str(render_model_card(output_folder, repo_id=REPO_ID)))
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == {
        "roc_auc": RESULTS["eval_auroc"],
        "accuracy": RESULTS["eval_accuracy"],
        "log_loss": RESULTS["eval_log_loss"],
    }
    auroc = results["roc_auc"]
    assert (auroc.dataset_type, auroc.dataset_split) == ("synthetic-transactions-gender", "held-out")
    assert auroc.dataset_args == {
        "synthetic_num_customers": NUM_CUSTOMERS,
        "synthetic_seed": 0,
        "eval_fraction": 0.1,
        "split_seed": 42,
    }
    assert card.data.model_name == REPO_ID
    assert card.data.library_name == "transformers"
    assert {"txformer", "full-attention", "synthetic-data"} <= set(card.data.tags)
    text = card.text
    for expected in (
        "0.9011",  # oracle AUROC
        "**84 held-out labelled customers**",
        "Training customers: 756",
        "1,520.5",  # profiled samples/s
        "Test CPU",
        "Trained on synthetic data",
        f'"{REPO_ID}"',
        "trust_remote_code=True",
        'revision="<commit hash>"',
        "`attention_full.py`",
        f"scripts/predict.py --model {REPO_ID} --revision <commit hash>",
        f'pipeline(model="{REPO_ID}", revision="<commit hash>", trust_remote_code=True)',
        "## Intended use, limitations and risks",
        "GDPR",
    ):
        assert expected in text, expected

    write_json(output_folder / "all_results.json", {**RESULTS, "eval_auroc": 0.6})
    rendered_again = render_model_card(output_folder, repo_id=REPO_ID)
    assert {result.metric_type: result.metric_value for result in rendered_again.data.eval_results}["roc_auc"] == 0.6


def test_every_kind_gets_its_tag_summary_and_settings_on_the_card(tmp_path, vocabulary, attention_type):
    kind = ATTENTION_KINDS[attention_type]
    model = model_for(vocabulary, attention_type)
    model.save_pretrained(tmp_path)
    vocabulary.to_processor(**PREPROCESSING).save_pretrained(tmp_path)
    card = render_model_card(tmp_path, repo_id=REPO_ID)
    assert kind.hub_tag in card.data.tags
    assert f'`attention_type="{attention_type}"`: {kind.summary}' in card.text
    settings = dataclasses.fields(kind.settings) if kind.settings is not None else ()
    for setting in settings:
        assert f"| `{setting.name}` | `{getattr(model.config, setting.name)}` |" in card.text
    assert ("| setting | value |" in card.text) == bool(settings)


def test_a_card_without_results_reports_none(output_folder):
    (output_folder / "all_results.json").unlink()
    (output_folder / "profile_summary.json").unlink()
    card = ModelCard(str(render_model_card(output_folder)))
    assert card.data.eval_results is None and card.data.metrics is None
    assert "no measured results are reported" in card.text
    assert "Training speed and memory" not in card.text


def test_a_card_for_real_data_names_the_dataset_and_no_synthetic_caveat(output_folder):
    write_json(output_folder / "training_run.json", training_run(transactions="/data/sber/transactions.csv"))
    card = ModelCard(str(render_model_card(output_folder, repo_id=REPO_ID)))
    assert {result.dataset_type for result in card.data.eval_results} == {"transactions-gender"}
    assert "synthetic-data" not in card.data.tags
    assert "Trained on synthetic data" not in card.text
    assert "Bayes-optimal" not in card.text  # oracle AUROCs exist for synthetic data only
    assert "`transactions.csv`, `gender_train.csv`" in card.text


def recording_hub_api() -> mock.MagicMock:
    """An `HfApi` whose methods keep their real signatures but record their calls instead of reaching the Hub."""
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.side_effect = lambda repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
    api.create_commit.return_value = CommitInfo(
        commit_url=f"https://huggingface.co/{REPO_ID}/commit/0123abcd",
        commit_message="recorded",
        commit_description="",
        oid="0123abcd",
    )
    return api


def test_push_uploads_exactly_the_file_set_and_card_in_one_commit(output_folder):
    api = recording_hub_api()
    commit_url = push_folder_to_hub(
        output_folder, REPO_ID, private=True, revision="experiment", commit_message="First model", api=api
    )
    assert commit_url == f"https://huggingface.co/{REPO_ID}/commit/0123abcd"
    api.create_repo.assert_called_once_with(REPO_ID, token=None, private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(REPO_ID, branch="experiment", token=None, exist_ok=True)
    api.create_commit.assert_called_once()
    commit = api.create_commit.call_args.kwargs
    assert (commit["repo_id"], commit["revision"], commit["commit_message"]) == (REPO_ID, "experiment", "First model")
    operations = commit["operations"]
    assert all(isinstance(operation, CommitOperationAdd) for operation in operations)
    expected = sorted([path.name for path in files_to_push(output_folder)] + ["README.md"])
    assert sorted(operation.path_in_repo for operation in operations) == expected
    assert all(operation.path_or_fileobj == str(output_folder / operation.path_in_repo) for operation in operations)
    readme = ModelCard.load(output_folder / "README.md")
    assert readme.data.eval_results[0].metric_value == RESULTS["eval_auroc"]


def test_push_checks_the_folder_before_touching_the_hub(output_folder):
    (output_folder / "preprocessor_config.json").unlink()
    api = recording_hub_api()
    with pytest.raises(IncompleteModelFolderError, match="preprocessor_config.json"):
        push_folder_to_hub(output_folder, REPO_ID, api=api)
    assert api.method_calls == []


def run_push_script(output_folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_not_a_real_token",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), "--output_dir", str(output_folder)]
        + ["--repo_id", REPO_ID],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_push_script_offline_exits_with_one_clear_line(output_folder, tmp_path):
    result = run_push_script(output_folder, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.fullmatch(r"push_to_hub: offline mode is on \(HF_HUB_OFFLINE=1\).*", result.stderr.strip())


def test_push_script_on_an_incomplete_folder_names_what_is_missing(output_folder, tmp_path):
    (output_folder / "preprocessor_config.json").unlink()
    result = run_push_script(output_folder, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("push_to_hub: ")
    assert "preprocessor_config.json" in result.stderr


def copy_pushed_files(output_folder: Path, destination: Path) -> Path:
    """What a snapshot of the Hub repository holds: the pushed files and nothing else."""
    destination.mkdir()
    for path in files_to_push(output_folder):
        shutil.copy(path, destination / path.name)
    return destination


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    print(json.dumps(model(**model.dummy_inputs).logits.tolist()))
    """
)


def test_the_pushed_files_alone_load_with_remote_code_and_agree(output_folder, tmp_path):
    hub_copy = copy_pushed_files(output_folder, tmp_path / "hub_copy")
    remote_logits = torch.tensor(json.loads(run_without_txformer(REMOTE_CODE_SCRIPT, [str(hub_copy)], tmp_path)))
    model = TxFormerForSequenceClassification.from_pretrained(output_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(remote_logits, model(**model.dummy_inputs).logits, rtol=1e-5, atol=1e-6)


def test_the_pushed_files_alone_score_raw_transactions(output_folder, synthetic_dir, tmp_path):
    hub_copy = copy_pushed_files(output_folder, tmp_path / "hub_copy")
    written = {}
    for name, model_dir in (("original", output_folder), ("hub_copy", hub_copy)):
        arguments = PredictionArguments(
            model_dir=str(model_dir),
            transactions=str(synthetic_dir / "transactions.csv"),
            output_file=str(tmp_path / f"{name}.csv"),
            device="cpu",
        )
        written[name] = predict(arguments).read_text()
    assert written["hub_copy"] == written["original"]
    assert len(written["hub_copy"].splitlines()) == NUM_CUSTOMERS + 1


def hub_ignores(gitignore: str, path: str) -> bool:
    """Whether a path matches the simple (slash-free) patterns of a `.gitignore`, as git matches them."""
    patterns = [line for line in gitignore.splitlines() if line and not line.startswith("#")]
    parts = path.split("/")
    return any(
        fnmatch.fnmatch(part, pattern.rstrip("/"))
        for pattern in patterns
        for part in (parts[:-1] if pattern.endswith("/") else parts)
    )


def train_with_recorded_pushes(
    tmp_path, monkeypatch, vocabulary, customers, callbacks, processor=None, **arguments
) -> list[dict]:
    """Two optimizer steps with a checkpoint push after each and a final `push_to_hub`; the uploads are recorded at
    the Hub client the Trainer uses (the files `upload_folder` would send, after its ignore patterns)."""
    uploads = []

    def record_upload(*, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        folder = Path(folder_path)
        paths = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
        sent = set(filter_repo_objects(paths, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *(ignore_patterns or [])]))
        gitignore = (folder / ".gitignore").read_text() if ".gitignore" in sent else ""
        uploads.append({"sent": sent, "kept": {path for path in sent if not hub_ignores(gitignore, path)}})
        future = Future()
        future.set_result(None)
        return future if run_as_future else None

    api = recording_hub_api()
    api.upload_folder.side_effect = record_upload
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: api)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer_output"),
        push_to_hub=True,
        hub_model_id=REPO_ID,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=8,
        logging_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        **arguments,
    )
    collator = TransactionCollator(
        categorical_fields=list(vocabulary.categorical_fields),
        numeric_fields=list(vocabulary.numeric_fields),
        max_length=MAX_LENGTH,
    )
    trainer = Trainer(
        model=model_for(vocabulary).train(),
        args=args,
        train_dataset=vocabulary.encode(customers),
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )
    trainer.train()
    trainer.push_to_hub()
    return uploads


@pytest.mark.parametrize("processor_given_to", ["trainer", "callback"])
def test_every_trainer_push_carries_code_and_processor_but_no_pickle(
    tmp_path, monkeypatch, vocabulary, customers, processor_given_to
):
    if processor_given_to == "trainer":
        callback, processor = PushCodeFilesCallback(), vocabulary.to_processor(**PREPROCESSING)
    else:
        callback, processor = PushCodeFilesCallback(vocabulary, PREPROCESSING), None
    uploads = train_with_recorded_pushes(tmp_path, monkeypatch, vocabulary, customers, [callback], processor=processor)
    assert len(uploads) == 3  # after step 1, after step 2, end of training
    output_dir = tmp_path / "trainer_output"
    code_files = {path.name for path in (output_dir / "checkpoint-1").glob("*.py")}
    assert "attention_full.py" in code_files
    assert {"processing_txformer.py", "pipeline_txformer.py"} <= code_files
    required = code_files | {"config.json", "model.safetensors", "preprocessor_config.json"}
    for upload in uploads:
        assert required <= upload["kept"], required - upload["kept"]
        assert "training_args.bin" in upload["sent"]  # the Trainer writes it; the .gitignore keeps it out
        assert not any(Path(path).suffix in {".bin", ".pt", ".pth"} for path in upload["kept"])
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        saved = TxFormerProcessor.from_pretrained(output_dir / checkpoint)
        assert (saved.event_vocabulary, saved.max_length, saved.label_prior) == (
            vocabulary.to_dict(),
            PREPROCESSING["max_length"],
            PREPROCESSING["label_prior"],
        )


def test_without_the_callback_the_trainer_pushes_incomplete_repositories(tmp_path, monkeypatch, vocabulary, customers):
    uploads = train_with_recorded_pushes(tmp_path, monkeypatch, vocabulary, customers, [])
    first = uploads[0]["kept"]
    assert "config.json" in first and "training_args.bin" in first
    assert not {"modeling_txformer.py", "preprocessor_config.json"} & first


def test_pushing_without_the_processor_is_refused(tmp_path, monkeypatch, vocabulary, customers):
    with pytest.raises(ValueError, match="processing_class=processor"):
        train_with_recorded_pushes(tmp_path, monkeypatch, vocabulary, customers, [PushCodeFilesCallback()])


def test_hub_strategies_that_push_optimizer_pickles_are_refused(tmp_path, monkeypatch, vocabulary, customers):
    callback = PushCodeFilesCallback()
    with pytest.raises(ValueError, match="hold no pickles"):
        train_with_recorded_pushes(tmp_path, monkeypatch, vocabulary, customers, [callback], hub_strategy="checkpoint")
