"""Sharing trained output folders on the Hugging Face Hub: the file set, the model card, one-commit uploads, and a
callback that makes the Trainer's own pushes complete and pickle-free."""

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx
from safetensors import safe_open
from transformers import (
    HfArgumentParser,
    PreTrainedModel,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import CONFIG_NAME, FEATURE_EXTRACTOR_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from . import __version__
from .cli import configure_logging
from .configuration_txformer import ATTENTION_KINDS, TxFormerConfig
from .data import VOCABULARY_FILE, EventVocabulary
from .file_names import PROFILE_SUMMARY_FILE, RESULTS_FILE, TRAINING_RUN_FILE
from .io_utils import atomic_write
from .modeling_txformer import AUTO_CLASSES
from .pipeline_txformer import PIPELINE_TASK
from .prediction import PREPROCESSING_FILE, serves_the_pipeline, upgrade_model_folder


logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card_template.md"
# `hub_cards/` of a source checkout, else the copy installed inside the package (`txformer/hub_cards/`).
SOURCE_TEMPLATE = Path(__file__).resolve().parent.parent / "hub_cards" / TEMPLATE_NAME
MODEL_CARD_TEMPLATE = (
    SOURCE_TEMPLATE if SOURCE_TEMPLATE.exists() else Path(__file__).resolve().parent / "hub_cards" / TEMPLATE_NAME
)
README_FILE = "README.md"
GITIGNORE_FILE = ".gitignore"
# Pushed when present: the sources of the card, so that readers can check every number it shows.
OPTIONAL_FILES = (RESULTS_FILE, TRAINING_RUN_FILE, PROFILE_SUMMARY_FILE)
# `from_pretrained(..., trust_remote_code=True)` resolves the config, the encoder and every head through `auto_map`.
REQUIRED_AUTO_CLASSES = ("AutoConfig", *AUTO_CLASSES)
# The Hub leaves out of a commit the files that match the root `.gitignore` the commit carries (or, without one, the
# hosted one). The Trainer's own pushes upload `training_args.bin`, a pickle, with every commit; this keeps it out.
HUB_GITIGNORE = "# txformer repositories hold no pickles\n*.bin\n*.pt\n*.pth\n*.pkl\n*.pickle\ncheckpoint-*/\n"
MODEL_LICENSE = "apache-2.0"
# No Hub task describes a variable-length history of tabular events; this closest one keeps the Hub from inferring
# `text-classification` from the architecture name (custom-code models get no hosted widget either way).
PIPELINE_TAG = "tabular-classification"
TASK_NAME = "Customer gender from bank-transaction history"
REPO_PLACEHOLDER = "<namespace>/<repository>"
DEFAULT_COMMIT_MESSAGE = "Upload txformer model: weights, code, processor, metrics and card"
EVAL_METRICS = (
    ("eval_auroc", "roc_auc", "AUROC"),
    ("eval_accuracy", "accuracy", "Accuracy (threshold 0.5)"),
    ("eval_log_loss", "log_loss", "Log loss"),
)
ORACLE_AUROCS = (
    ("oracle_auroc_all", "posterior given all events"),
    ("oracle_auroc_last_64", "posterior given the last 64 events"),
    ("oracle_auroc_last_max_length", "posterior given the events the model saw (same window)"),
)
TRAINING_METRICS = (
    ("train_samples", "Training customers", "{:,}"),
    ("train_runtime", "Training time (s)", "{:.0f}"),
    ("epoch", "Epochs", "{:g}"),
    ("train_loss", "Mean training loss", "{:.4f}"),
    ("train_samples_per_second", "Training samples/s (Trainer)", "{:.1f}"),
)
HYPERPARAMETER_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "seed",
    "bf16",
    "fp16",
)


class IncompleteModelFolderError(ValueError):
    """An output folder lacks something that a loadable, scoreable Hub repository needs."""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _weight_files(output_dir: Path, problems: list[str]) -> list[str]:
    """`model.safetensors`, or the safetensors index and the shards it names."""
    if (output_dir / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME]
    index = _read_json(output_dir / SAFE_WEIGHTS_INDEX_NAME)
    if index is None:
        problems.append(f"{SAFE_WEIGHTS_NAME} (weights must be safetensors; pickled .bin weights are never pushed)")
        return []
    shards = sorted(set(index["weight_map"].values()))
    problems += [f"weight shard {shard}" for shard in shards if not (output_dir / shard).is_file()]
    return [SAFE_WEIGHTS_INDEX_NAME, *shards]


def _code_files(output_dir: Path, problems: list[str]) -> list[str]:
    """The modules that `config.json`'s `auto_map` names and, recursively, their relative imports."""
    config = _read_json(output_dir / CONFIG_NAME)
    if config is None:
        problems.append(CONFIG_NAME)
        return []
    auto_map = config.get("auto_map") or {}
    problems += [
        f"{CONFIG_NAME} auto_map entry {name} (save with txformer imported: it registers the classes for auto_map)"
        for name in REQUIRED_AUTO_CLASSES
        if name not in auto_map
    ]
    references = list(auto_map.values())
    custom_pipelines = config.get("custom_pipelines") or {}
    if PIPELINE_TASK in custom_pipelines:
        references.append(custom_pipelines[PIPELINE_TASK]["impl"])
    elif serves_the_pipeline(config):
        problems.append(
            f"{CONFIG_NAME} custom_pipelines entry {PIPELINE_TASK} (set model.config.custom_pipelines = "
            "txformer.pipeline_txformer.custom_pipelines() before saving)"
        )
    processor = _read_json(output_dir / FEATURE_EXTRACTOR_NAME)
    if processor is None:
        problems.append(f"{FEATURE_EXTRACTOR_NAME} (the TxFormerProcessor: vocabulary and preprocessing settings)")
    else:
        processor_map = processor.get("auto_map") or {}
        problems += [
            f"{FEATURE_EXTRACTOR_NAME} auto_map entry {name} (save with txformer imported)"
            for name in ("AutoFeatureExtractor", "AutoProcessor")
            if name not in processor_map
        ]
        references += list(processor_map.values())
    pending = sorted({f"{reference.split('.')[0]}.py" for reference in references})
    found: list[str] = []
    while pending:
        name = pending.pop()
        if name in found:
            continue
        if not (output_dir / name).is_file():
            problems.append(f"code file {name}")
            continue
        found.append(name)
        pending += [f"{module}.py" for module in get_relative_imports(output_dir / name)]
    return sorted(found)


def files_to_push(output_dir: str | Path) -> list[Path]:
    """The files of `output_dir` that make a complete Hub repository, and nothing else (no pickle, checkpoint or
    optimizer state); raises `IncompleteModelFolderError` naming everything that is missing."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise IncompleteModelFolderError(f"{output_dir} is not a folder.")
    problems: list[str] = []
    names = [CONFIG_NAME, FEATURE_EXTRACTOR_NAME, *_weight_files(output_dir, problems)]
    names += _code_files(output_dir, problems)
    if problems:
        raise IncompleteModelFolderError(
            f"{output_dir} is not a complete txformer output folder; missing: {'; '.join(problems)}."
        )
    names += [name for name in OPTIONAL_FILES if (output_dir / name).is_file()]
    return [output_dir / name for name in names]


def _num_weight_values(output_dir: Path) -> int:
    """Values stored in the safetensors weights (parameters and persistent buffers)."""
    total = 0
    for name in _weight_files(output_dir, []):
        if name.endswith(".safetensors"):
            with safe_open(output_dir / name, framework="pt") as weights:
                total += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return total


def _data_source(training_run: dict | None) -> str:
    """`synthetic`, `real`, or `unrecorded` when the folder has no `training_run.json`."""
    if training_run is None:
        return "unrecorded"
    return "synthetic" if training_run["data_args"].get("transactions") is None else "real"


def _eval_dataset(data_source: str, data_args: dict) -> dict[str, Any]:
    """model-index `dataset` fields of the held-out split."""
    if data_source == "synthetic":
        num_customers, seed = data_args.get("synthetic_num_customers"), data_args.get("synthetic_seed")
        dataset = {
            "type": "synthetic-transactions-gender",
            "name": f"txformer synthetic transactions ({num_customers} customers, seed {seed})",
            "args": {"synthetic_num_customers": num_customers, "synthetic_seed": seed},
        }
    elif data_source == "real":
        dataset = {"type": "transactions-gender", "name": "Sber bank transactions, gender (Kaggle)", "args": {}}
    else:
        dataset = {"type": "unrecorded", "name": "unrecorded data", "args": {}}
    dataset["args"].update({key: data_args[key] for key in ("eval_fraction", "split_seed") if key in data_args})
    return dataset


def _profile_rows(profile: dict) -> list[tuple[str, str]]:
    """Table rows of the profiling summary, skipping what it did not measure."""
    training, hardware = profile.get("training") or {}, profile.get("hardware") or {}
    rows = []
    step_time = (profile.get("step_time_s") or {}).get("median")
    if step_time is not None:
        rows.append(("median optimizer-step time", f"{step_time * 1e3:.1f} ms"))
    for key, label, template in (
        ("samples_per_s_median", "samples/s (median over steps)", "{:,.1f}"),
        ("tokens_per_s_median", "real events/s (median over steps)", "{:,.0f}"),
        ("peak_memory_mib", "peak memory (MiB)", "{:,.0f}"),
        ("num_steps", "optimizer steps", "{}"),
    ):
        if profile.get(key) is not None:
            rows.append((label, template.format(profile[key])))
    memory_sources = {rank.get("memory_source") for rank in profile.get("per_rank") or []} - {None}
    if memory_sources:
        rows.append(("memory measured as", ", ".join(sorted(memory_sources))))
    if training:
        rows.append(
            (
                "processes × batch per device × accumulation",
                f"{training.get('world_size')} × {training.get('per_device_train_batch_size')} × "
                f"{training.get('gradient_accumulation_steps')} on {training.get('device')}",
            )
        )
    if hardware:
        gpus = ", ".join(hardware.get("gpu_names") or []) or "no GPU"
        rows.append(
            ("hardware", f"{hardware.get('cpu_model')} ({hardware.get('cpu_count_usable')} usable cores); {gpus}")
        )
    software = profile.get("software") or {}
    if software:
        rows.append(("software", ", ".join(f"{name} {version}" for name, version in software.items() if version)))
    return rows


def _assignments(values: dict, keys: tuple[str, ...] | None = None) -> list[tuple[str, Any]]:
    """(name, value) pairs of the recorded settings, in `keys` order when given."""
    return [(key, values[key]) for key in (keys or values) if values.get(key) is not None]


def render_model_card(
    output_dir: str | Path, repo_id: str | None = None, template_path: str | Path = MODEL_CARD_TEMPLATE
) -> ModelCard:
    """The model card of a trained output folder: its metadata holds the measured held-out results of
    `all_results.json` as model-index `eval_results`; the text describes the model, data, use and risks."""
    output_dir = Path(output_dir)
    config = TxFormerConfig.from_pretrained(output_dir)
    results = _read_json(output_dir / RESULTS_FILE) or {}
    training_run = _read_json(output_dir / TRAINING_RUN_FILE)
    data_args = (training_run or {}).get("data_args") or {}
    # The processor's settings; a folder of the older layout keeps them in `preprocessing.json`.
    preprocessing = (
        _read_json(output_dir / FEATURE_EXTRACTOR_NAME) or _read_json(output_dir / PREPROCESSING_FILE) or {}
    )
    profile = _read_json(output_dir / PROFILE_SUMMARY_FILE)
    data_source = _data_source(training_run)
    model_name = repo_id or output_dir.resolve().name
    dataset = _eval_dataset(data_source, data_args)
    eval_results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name=TASK_NAME,
            dataset_type=dataset["type"],
            dataset_name=dataset["name"],
            dataset_split="held-out",
            dataset_args=dataset["args"] or None,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=float(results[key]),
        )
        for key, metric_type, metric_name in EVAL_METRICS
        if results.get(key) is not None
    ]
    kind = ATTENTION_KINDS[config.attention_type]
    tags = ["txformer", "transactions", "event-sequences", kind.hub_tag]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=MODEL_LICENSE,
        tags=tags + (["synthetic-data"] if data_source == "synthetic" else []),
        metrics=[result.metric_type for result in eval_results] or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    settings = dataclasses.fields(kind.settings) if kind.settings is not None else ()
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_reference=repo_id or REPO_PLACEHOLDER,
        config=config,
        attention_type=config.attention_type,
        attention_summary=kind.summary,
        attention_settings=[(setting.name, getattr(config, setting.name)) for setting in settings],
        num_weights=f"{_num_weight_values(output_dir):,}",
        categorical_fields=list(zip(config.categorical_fields, config.categorical_vocab_sizes, strict=True)),
        code_files=_code_files(output_dir, []),
        max_length=preprocessing.get("max_length"),
        label_prior=preprocessing.get("label_prior"),
        data_source=data_source,
        data_args=data_args,
        data_files=[Path(data_args[key]).name for key in ("transactions", "labels") if data_args.get(key)],
        eval_fraction=data_args.get("eval_fraction"),
        split_seed=data_args.get("split_seed"),
        eval_metrics=[(result.metric_name, result.metric_value) for result in eval_results],
        eval_samples=results.get("eval_samples"),
        oracle_aurocs=[
            (label, results[key])
            for key, label in ORACLE_AUROCS
            if data_source == "synthetic" and results.get(key) is not None
        ],
        profile=_profile_rows(profile) if profile else None,
        training_metrics=[
            (label, template.format(results[key])) for key, label, template in TRAINING_METRICS if key in results
        ],
        hyperparameters=_assignments((training_run or {}).get("training_args") or {}, HYPERPARAMETER_KEYS),
        model_args=_assignments((training_run or {}).get("model_args") or {}),
    )


def push_folder_to_hub(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Writes the model card as `README.md` into `output_dir`, then uploads exactly `files_to_push` and `README.md` to
    `repo_id` in one commit (repository, and branch `revision`, created if missing); returns the commit URL. A folder
    of the older layout (`event_vocabulary.json`, `preprocessing.json`) gets its processor written first."""
    output_dir = Path(output_dir)
    has_processor = (output_dir / FEATURE_EXTRACTOR_NAME).is_file() or all(
        (output_dir / name).is_file() for name in (VOCABULARY_FILE, PREPROCESSING_FILE)
    )
    if has_processor and (output_dir / CONFIG_NAME).is_file():
        upgrade_model_folder(output_dir)
    files = files_to_push(output_dir)
    card = render_model_card(output_dir, repo_id=repo_id)
    readme = atomic_write(output_dir / README_FILE, lambda file: file.write(str(card)))
    api = api if api is not None else HfApi(library_name="txformer", library_version=__version__)
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_url.repo_id, branch=revision, token=token, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(output_dir).as_posix(), path_or_fileobj=str(path))
        for path in [*files, readme]
    ]
    commit = api.create_commit(
        repo_id=repo_url.repo_id,
        operations=operations,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        revision=revision,
        token=token,
    )
    logger.info("Pushed %d files of %s to %s", len(operations), output_dir, commit.commit_url)
    return commit.commit_url


def write_code_files(model: PreTrainedModel, folder: str | Path) -> list[Path]:
    """Copies the module that defines `model` and its relative imports into `folder`, as `save_pretrained` does;
    files already there with the same content are left alone (an upload may be reading them)."""
    module_file = Path(sys.modules[type(model).__module__].__file__)
    written = []
    for source in [module_file, *map(Path, get_relative_import_files(module_file))]:
        target = Path(folder) / source.name
        code = source.read_text(encoding="utf-8")
        if not target.is_file() or target.read_text(encoding="utf-8") != code:
            atomic_write(target, lambda file, code=code: file.write(code))
        written.append(target)
    return written


class PushCodeFilesCallback(TrainerCallback):
    """Makes every commit of the Trainer's own pushes (`--push_to_hub`) a complete, pickle-free repository.

    The Trainer uploads `args.output_dir`, into which it copies only the config and weights of the new checkpoint,
    saves its `processing_class` (the `TxFormerProcessor`, with its code and the pipeline's) and writes
    `training_args.bin`. So at `on_push_begin`, which precedes every upload, this writes the model code and a
    `.gitignore` that keeps pickles out of the commit into `args.output_dir`.

    Pass the processor to the Trainer as `processing_class`. Training code that does not can give the vocabulary
    and the preprocessing settings here instead; the callback then writes the processor into every checkpoint and
    push itself.
    """

    def __init__(self, vocabulary: EventVocabulary | None = None, preprocessing: dict[str, Any] | None = None):
        self.processor = None if vocabulary is None else vocabulary.to_processor(**(preprocessing or {}))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, processing_class=None, **kwargs
    ):
        """Refuses the hub strategies that push checkpoint folders (they exist to ship optimizer, scheduler and RNG
        pickles for resuming, which txformer repositories never hold), and pushes without a processor."""
        if not args.push_to_hub:
            return
        if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            raise ValueError(
                f"--hub_strategy {args.hub_strategy.value} pushes checkpoint folders with optimizer, scheduler and RNG "
                "pickles; txformer repositories hold no pickles. Use --hub_strategy every_save or end, and resume "
                "from local checkpoints."
            )
        if processing_class is None and self.processor is None:
            raise ValueError(
                "Pushing needs the TxFormerProcessor in every commit: pass processing_class=processor to the Trainer "
                "(EventVocabulary.to_processor(max_length, label_prior))."
            )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Adds the processor given to this callback to the new checkpoint, so it can be scored like the final
        folder (the Trainer saves its own `processing_class` there)."""
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if self.processor is not None and args.should_save and checkpoint.is_dir():
            self.processor.save_pretrained(checkpoint)

    def on_push_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: PreTrainedModel,
        **kwargs,
    ):
        """Writes the model code, the processor given to this callback and the pickle-ignoring `.gitignore` into the
        folder that the Trainer is about to upload."""
        if not state.is_world_process_zero:
            return
        output_dir = Path(args.output_dir)
        write_code_files(model, output_dir)
        if self.processor is not None:
            self.processor.save_pretrained(output_dir)
        atomic_write(output_dir / GITIGNORE_FILE, lambda file: file.write(HUB_GITIGNORE))


@dataclass
class PushArguments:
    """Which trained output folder goes to which Hub repository."""

    output_dir: str = field(metadata={"help": "A trained output folder (the --output_dir of scripts/train.py)."})
    repo_id: str = field(metadata={"help": "Hub repository, e.g. <user>/<name>; created if missing."})
    private: bool = field(default=False, metadata={"help": "Create the repository private (if it does not exist)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to (created if missing); main."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})


def main(argv: list[str] | None = None) -> str:
    """Command line: `python scripts/push_to_hub.py --output_dir DIR --repo_id USER/NAME`; errors are one line."""
    configure_logging()
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=argv)
    try:
        commit_url = push_folder_to_hub(
            args.output_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except IncompleteModelFolderError as error:
        sys.exit(f"push_to_hub: {error}")
    except OfflineModeIsEnabled:
        sys.exit("push_to_hub: offline mode is on (HF_HUB_OFFLINE=1); nothing was pushed. Unset it to push.")
    except LocalTokenNotFoundError:
        sys.exit(
            "push_to_hub: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN. Nothing was pushed."
        )
    except httpx.HTTPError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        sys.exit(f"push_to_hub: the Hub could not be reached or refused the upload ({reason}); nothing was pushed.")
    print(commit_url)
    return commit_url


__all__ = [
    "IncompleteModelFolderError",
    "PushArguments",
    "PushCodeFilesCallback",
    "files_to_push",
    "main",
    "push_folder_to_hub",
    "render_model_card",
    "write_code_files",
]
