"""Scoring raw transactions with a trained model (a folder or a Hub repository): `customer_id,probability` (the
Kaggle format) and a report of the run."""

import csv
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import CONFIG_NAME, FEATURE_EXTRACTOR_NAME, cached_file

from .cli import configure_logging
from .configuration_txformer import TxFormerConfig
from .data import EventVocabulary, TransactionCollator, customer_table, prepare_encoded_customers, read_customer_ids
from .data.prepare import DEFAULT_CACHE
from .data.reader import list_offsets_and_values
from .data.vocabulary import UNKNOWN_INDEX, VOCABULARY_FILE
from .file_names import PREDICTIONS_FILE, PREDICTIONS_REPORT_SUFFIX
from .io_utils import atomic_write, atomic_write_json, check_weights_are_whole, check_writable_file
from .modeling_txformer import TxFormerForSequenceClassification
from .pipeline_txformer import PIPELINE_TASK, TransactionClassificationPipeline, custom_pipelines
from .processing_txformer import TxFormerProcessor, probability_of_positive_class


logger = logging.getLogger(__name__)

# Older folders keep the processor's content in two files: the vocabulary and this one.
PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class PredictionArguments:
    """What to score, with which model, and where to write the probabilities."""

    transactions: str = field(
        metadata={
            "help": "Transactions in the real format: a CSV (plain, .gz, .bz2) or Parquet file, or a glob pattern of "
            "several (quoted)."
        }
    )
    model: str | None = field(
        default=None, metadata={"help": "A trained output folder, or a Hub repository id (pin it with --revision)."}
    )
    model_dir: str | None = field(default=None, metadata={"help": "Alias of --model (a trained output folder)."})
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (a commit hash pins exactly what runs); default: main."}
    )
    output_file: str = field(default=PREDICTIONS_FILE, metadata={"help": "Where to write customer_id,probability."})
    customer_ids: str | None = field(
        default=None,
        metadata={"help": "CSV with a customer_id column (e.g. the sample submission): score exactly these ids."},
    )
    batch_size: int = field(default=64, metadata={"help": "Histories per forward pass."})
    max_length: int | None = field(
        default=None, metadata={"help": "Most recent events kept; default: the training setting; 0 = whole histories."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps; default: cuda when available."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Load a folder whose package is not installed."})
    data_cache_dir: str = field(
        default=str(DEFAULT_CACHE),
        metadata={"help": "Cache of the encoded transactions (default: env TXFORMER_CACHE or ~/.cache/txformer)."},
    )

    def __post_init__(self):
        check_scoring_options(self)
        if self.model is not None and self.model_dir is not None and self.model != self.model_dir:
            raise ValueError(f"--model {self.model} and --model_dir {self.model_dir} differ; give one of them.")
        self.model = self.model or self.model_dir
        if self.model is None:
            raise ValueError("Give --model: a trained output folder or a Hub repository id.")


def check_scoring_options(args: "PredictionArguments") -> None:
    """Refuses a `batch_size` below 1, a negative `max_length` and a `device` that torch does not know or this machine
    lacks (the scoring flags of prediction and embedding)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if args.max_length is not None and args.max_length < 0:
        raise ValueError(f"--max_length must be positive, or 0 for whole histories, got {args.max_length}.")
    scoring_device(args.device)


def scoring_device(name: str | None) -> torch.device:
    """The device named by `--device`, by default cuda when available, else the CPU; a name torch does not know, or
    a device this machine lacks, is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1, mps).") from None
    if device.type != "cpu" and (
        accelerator is None
        or device.type != accelerator.type
        or (device.index or 0) >= torch.accelerator.device_count()
    ):
        available = "cpu" if accelerator is None else f"cpu and {torch.accelerator.device_count()} {accelerator.type}"
        raise ValueError(f"--device {name}: this machine has no such device (it has {available}).")
    return device


def resolve_file(model: str, filename: str, revision: str | None = None) -> Path | None:
    """The local path of `filename` in a folder or Hub repository (downloaded and cached), None if it has none."""
    path = cached_file(
        model,
        filename,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return None if path is None else Path(path)


def load_processor(model: str, revision: str | None = None) -> TxFormerProcessor:
    """The processor saved with a model (`preprocessor_config.json`), or one built from the `event_vocabulary.json`
    and `preprocessing.json` of a folder written by an older version."""
    if resolve_file(model, FEATURE_EXTRACTOR_NAME, revision) is not None:
        return TxFormerProcessor.from_pretrained(model, revision=revision)
    legacy = {name: resolve_file(model, name, revision) for name in (VOCABULARY_FILE, PREPROCESSING_FILE)}
    missing = [name for name, path in legacy.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"{model}: {FEATURE_EXTRACTOR_NAME} is missing, and so is {' and '.join(missing)} of the older layout; "
            "it is not a complete txformer training output."
        )
    logger.info("%s holds %s and %s (an older layout); building the processor from them.", model, *legacy)
    vocabulary = EventVocabulary.from_dict(
        json.loads(legacy[VOCABULARY_FILE].read_text()), source=str(legacy[VOCABULARY_FILE])
    )
    preprocessing = json.loads(legacy[PREPROCESSING_FILE].read_text())
    return vocabulary.to_processor(preprocessing.get("max_length"), preprocessing.get("label_prior"))


def serves_the_pipeline(config: dict) -> bool:
    """Whether a saved `config.json` is a classifier's, which the transaction-classification pipeline scores (a
    pretraining folder is not)."""
    return TxFormerForSequenceClassification.__name__ in (config.get("architectures") or [])


def upgrade_model_folder(folder: str | os.PathLike) -> TxFormerProcessor:
    """Makes a trained folder serve `AutoProcessor` and `pipeline(model=folder, trust_remote_code=True)`: writes the
    processor (built from `event_vocabulary.json` and `preprocessing.json` in a folder of the older layout) and, for
    a classifier, the pipeline entry of `config.json`, where they are missing; returns the processor."""
    folder = Path(folder)
    processor = load_processor(str(folder))
    if not (folder / FEATURE_EXTRACTOR_NAME).is_file():
        processor.save_pretrained(folder)
        logger.info("Wrote the processor into %s (%s and its code).", folder, FEATURE_EXTRACTOR_NAME)
    config = json.loads((folder / CONFIG_NAME).read_text())
    if serves_the_pipeline(config) and PIPELINE_TASK not in (config.get("custom_pipelines") or {}):
        config["custom_pipelines"] = {**(config.get("custom_pipelines") or {}), **custom_pipelines()}
        atomic_write_json(folder / CONFIG_NAME, config)
        custom_object_save(TransactionClassificationPipeline, folder)
        logger.info("Added the %s pipeline to %s.", PIPELINE_TASK, folder / CONFIG_NAME)
    return processor


def load_txformer_config(model: str, revision: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a trained folder or repository, once it is known to describe a txformer model and, for a local
    folder, to sit next to whole weights (`check_weights_are_whole`): a damaged or foreign folder is named, not left to
    fail deep in the loading code."""
    if Path(model).is_dir():
        check_weights_are_whole(model)
    elif Path(model).exists():
        raise NotADirectoryError(f"{model} is a file, not a model folder.")
    else:
        try:
            validate_repo_id(model)
        except HFValidationError:
            raise FileNotFoundError(f"{model}: no such model folder (nor a Hub repository id).") from None
    config_dict, _ = PretrainedConfig.get_config_dict(model, revision=revision)
    if not config_dict:
        raise FileNotFoundError(f"{model}: no {CONFIG_NAME}, so it is not a trained model folder.")
    if config_dict.get("model_type") != TxFormerConfig.model_type:
        raise ValueError(
            f"{model}: its {CONFIG_NAME} describes a {config_dict.get('model_type')!r} model, not a "
            f"{TxFormerConfig.model_type!r} one."
        )
    return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)


def load_model(model: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs) -> PreTrainedModel:
    """The classifier of a trained folder or repository (`load_txformer_config`), safetensors only; a weight the
    config does not expect, or one it expects and the file lacks, is an error (the folder mixes runs or is damaged),
    not a warning."""
    load_txformer_config(model, revision, trust_remote_code)
    loaded, loading_info = AutoModelForSequenceClassification.from_pretrained(
        model,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        output_loading_info=True,
        **kwargs,
    )
    problems = [
        f"{what}: {', '.join(map(str, loading_info[key]))}"
        for key, what in (
            ("missing_keys", "missing from the weights"),
            ("unexpected_keys", "not in the model"),
            ("mismatched_keys", "of another shape"),
        )
        if loading_info.get(key)
    ]
    if problems:
        raise ValueError(
            f"{model}: the weights do not match config.json ({'; '.join(problems)}): the folder mixes files of "
            "different training runs or is damaged."
        )
    return loaded


def check_processor_matches(processor: TxFormerProcessor | EventVocabulary, config, model: str) -> None:
    """The processor (or its vocabulary) must be the one the model was trained with: same fields, same sizes (a
    folder mixing files of two runs would otherwise embed codes with another run's indices, or fail with an index
    error)."""
    expected = [list(config.categorical_fields), list(config.categorical_vocab_sizes), list(config.numeric_fields)]
    found = [list(processor.categorical_fields), list(processor.vocab_sizes), list(processor.numeric_fields)]
    if found != expected:
        raise ValueError(
            f"{model}: the vocabulary (fields, sizes, numeric fields {found}) does not match the model's "
            f"config.json ({expected}): the folder mixes files of different training runs."
        )


def unknown_code_shares(vocabulary: EventVocabulary, customers) -> dict[str, float]:
    """Per categorical field, the share of events whose code the vocabulary does not know (encoded as unknown)."""
    table = customer_table(customers.select_columns(vocabulary.categorical_fields))
    shares = {}
    for name in vocabulary.categorical_fields:
        _, values = list_offsets_and_values(table.column(name))
        shares[name] = pc.sum(pc.equal(values, UNKNOWN_INDEX)).as_py() / max(len(values), 1)
    return shares


def length_sorted_batches(
    dataset, collator: TransactionCollator, batch_size: int, device: torch.device, desc: str
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """The model inputs of an encoded dataset (no labels) on `device`, with the rows they hold, behind a progress
    bar. Histories are batched by length so little compute goes to padding."""
    order = np.argsort(np.asarray(dataset["num_events"]), kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        rows = order[start : start + batch_size]
        batch = collator([dataset[int(row)] for row in rows])
        yield rows, {key: value.to(device) for key, value in batch.items() if key != "labels"}


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module, dataset, collator: TransactionCollator, batch_size: int, device: torch.device
) -> np.ndarray:
    """Probability of class 1 for every row of an encoded dataset, in its order."""
    probabilities = np.empty(len(dataset), dtype=np.float64)
    model.eval().to(device)
    for rows, batch in length_sorted_batches(dataset, collator, batch_size, device, desc="scoring"):
        probabilities[rows] = probability_of_positive_class(model(**batch).logits.double().cpu()).numpy()
    return probabilities


def report_path(output_file: str | os.PathLike) -> Path:
    """Where the report of a predictions file goes: next to it, `<name>.report.json`."""
    output_file = Path(output_file)
    return output_file.with_name(output_file.name + PREDICTIONS_REPORT_SUFFIX)


def write_predictions(output_file: str | os.PathLike, rows: list[tuple[int, float]], report: dict) -> Path:
    """Writes the CSV and its report so that they never disagree: the old report is removed first, the CSV is
    written (atomically), then the report (atomically) with the run id and the CSV's SHA-256. A run stopped
    between the steps leaves a CSV without a report, never a report of another CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["customer_id", "probability"])
    writer.writerows((customer, f"{probability:.6f}") for customer, probability in rows)
    text = buffer.getvalue()
    report_file = report_path(output_file)
    report_file.unlink(missing_ok=True)
    output_file = atomic_write(output_file, lambda file: file.write(text))
    report = {
        **report,
        "predictions_file": output_file.name,
        "predictions_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    atomic_write_json(report_file, report)
    return output_file


def predict(args: PredictionArguments) -> Path:
    """Scores every customer of `args.transactions` (or exactly `args.customer_ids`) and writes the CSV and its
    report."""
    run_id = uuid.uuid4().hex
    wanted_ids = None if args.customer_ids is None else read_customer_ids(args.customer_ids)
    check_writable_file(args.output_file, "--output_file")
    model = load_model(args.model, args.revision, args.trust_remote_code)
    processor = load_processor(args.model, args.revision)
    check_processor_matches(processor, model.config, args.model)
    max_length = processor.max_length if args.max_length is None else (args.max_length or None)
    device = scoring_device(args.device)

    vocabulary = EventVocabulary.from_processor(processor)
    customers = prepare_encoded_customers(
        args.transactions, vocabulary, customer_ids=wanted_ids, cache_dir=args.data_cache_dir
    ).customers
    unknown_shares = unknown_code_shares(vocabulary, customers)
    logger.info("Share of events with codes unseen in training: %s", unknown_shares)
    for name, share in unknown_shares.items():
        if share == 1.0:
            logger.warning(
                "No %s code of %s is in the vocabulary: was it coded as in training?", name, args.transactions
            )
    collator = TransactionCollator(processor.categorical_fields, processor.numeric_fields, max_length=max_length)
    scored_ids = np.asarray(customers["customer_id"], dtype=np.int64)
    probabilities = predict_probabilities(model, customers, collator, args.batch_size, device)
    scores = dict(zip(scored_ids.tolist(), probabilities, strict=True))

    wanted_ids = scored_ids if wanted_ids is None else wanted_ids
    default_probability = processor.label_prior
    without_history = [int(customer) for customer in wanted_ids if int(customer) not in scores]
    if without_history and default_probability is None:
        raise ValueError(
            f"{len(without_history)} customers have no transactions (e.g. {without_history[:5]}) and the processor "
            f"of {args.model} has no label_prior to score them with."
        )
    if without_history:
        logger.warning(
            "%d customers have no transactions; they get the training prior %.4f (listed in the report).",
            len(without_history),
            default_probability,
        )
    rows = [(customer, scores.get(customer, default_probability)) for customer in wanted_ids.tolist()]
    output_file = write_predictions(
        args.output_file,
        rows,
        {
            "run_id": run_id,
            "model": str(args.model),
            "revision": args.revision,
            "model_commit": getattr(model.config, "_commit_hash", None),
            "transactions": str(args.transactions),
            "num_scored": len(wanted_ids) - len(without_history),
            "max_length": max_length,
            "default_probability": default_probability,
            "customers_without_transactions": without_history,
            "unknown_code_share": unknown_shares,
        },
    )
    logger.info("Wrote %d predictions to %s (run %s)", len(wanted_ids), output_file, run_id)
    return output_file


def main(argv: list[str] | None = None) -> Path:
    """Command line: `python scripts/predict.py --model DIR_OR_REPO [--revision SHA] --transactions FILE
    [--output_file F]`."""
    configure_logging()
    (args,) = HfArgumentParser(PredictionArguments).parse_args_into_dataclasses(args=argv)
    return predict(args)
