"""Training entry point: data preparation, the HF `Trainer`, metrics and the output folder."""

import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.training_args import ParallelMode

from . import TxFormerConfig, TxFormerForSequenceClassification
from .callbacks import PerformerRedrawCallback
from .data import (
    EventVocabulary,
    TransactionCollator,
    build_customer_dataset,
    generate_synthetic_data,
    oracle_auroc,
    stratified_split,
)
from .hub import PushCodeFilesCallback, push_folder_to_hub
from .io_utils import atomic_write_json
from .metrics import compute_metrics
from .prediction import PREPROCESSING_FILE
from .profiling import add_profiling_callback


logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("TXFORMER_CACHE", Path.home() / ".cache" / "txformer"))
RESULTS_FILE = "all_results.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes a checkpoint's files in turn and trainer_state.json last.
CHECKPOINT_STATE_FILE = "trainer_state.json"


@dataclass
class ModelArguments:
    """Which model to train: a fresh config of the given attention kind, or a trained folder to continue from."""

    attention_type: str = field(default="full", metadata={"help": "full, performer or infinity."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Full attention backend: sdpa or eager."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from this trained model folder."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to override, e.g. 'hidden_size=128,num_hidden_layers=4,segment_length=512'."},
    )


@dataclass
class DataArguments:
    """Where the data comes from and how histories are cut."""

    transactions: str | None = field(
        default=None, metadata={"help": "transactions.csv (real format). Default: synthetic."}
    )
    labels: str | None = field(default=None, metadata={"help": "gender_train.csv (customer_id,gender)."})
    synthetic_num_customers: int = field(default=8000, metadata={"help": "Customers of the generated data."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the generated data."})
    data_cache_dir: str = field(default=str(DEFAULT_CACHE), metadata={"help": "Where generated data is cached."})
    max_length: int | None = field(
        default=256, metadata={"help": "Most recent events kept per history; 0 = whole histories (∞-former)."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share of labelled customers (stratified)."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out split."})
    max_train_customers: int | None = field(default=None, metadata={"help": "Subsample training customers."})

    def __post_init__(self):
        if self.max_length == 0:
            self.max_length = None
        if (self.transactions is None) != (self.labels is None):
            raise ValueError("Give both --transactions and --labels (real data), or neither (synthetic data).")


@dataclass
class TxFormerTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults that suit this package (every Trainer flag still works)."""

    output_dir: str | None = field(default="outputs/txformer", metadata={"help": "Output folder."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up (a fraction of steps when < 1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Train batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Eval batch size per device."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=20, metadata={"help": "Log every so many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the raw event columns: the collator builds the model inputs."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation and shuffling."})
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch histories of similar length together (train_sampling_strategy='group_by_length'): little "
            "padding on whole histories."
        },
    )
    length_column_name: str = field(
        default="num_events", metadata={"help": "Column of the history lengths, for length grouping."}
    )

    def __post_init__(self):
        """On a machine without GPU (or other accelerator), a process of a multi-process launch trains on the CPU
        with gloo; a process that still finds itself alone in such a launch is an error, not a silent lone run."""
        launched_world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if launched_world_size > 1 and not torch.accelerator.is_available():
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()
        if launched_world_size > 1 and self.parallel_mode == ParallelMode.NOT_PARALLEL:
            raise ValueError(
                f"This process was launched as one of WORLD_SIZE={launched_world_size} processes but is not part of a "
                f"distributed run (device {self.device}): pass --use_cpu to train on the CPU, or launch on the GPUs."
            )


def prepare_datasets(data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Reads (or generates) the data, splits it, fits the vocabulary on the training part and encodes both parts."""
    oracle = None
    transactions, labels = data_args.transactions, data_args.labels
    if transactions is None:
        synthetic_dir = Path(data_args.data_cache_dir) / (
            f"synthetic-n{data_args.synthetic_num_customers}-seed{data_args.synthetic_seed}"
        )
        with training_args.main_process_first(desc="generating synthetic data"):
            if not (synthetic_dir / "oracle.json").exists():
                generate_synthetic_data(
                    synthetic_dir, num_customers=data_args.synthetic_num_customers, seed=data_args.synthetic_seed
                )
        transactions, labels = synthetic_dir / "transactions.csv", synthetic_dir / "gender_train.csv"
        oracle = synthetic_dir
    customers = build_customer_dataset(transactions, labels)
    train, held_out = stratified_split(customers, test_size=data_args.eval_fraction, seed=data_args.split_seed)
    if data_args.max_train_customers is not None and data_args.max_train_customers < len(train):
        train = train.shuffle(seed=data_args.split_seed).select(range(data_args.max_train_customers))
    vocabulary = EventVocabulary.fit(train)
    return {
        "train": vocabulary.encode(train),
        "eval": vocabulary.encode(held_out),
        "vocabulary": vocabulary,
        "synthetic_dir": oracle,
    }


def build_model(model_args: ModelArguments, vocabulary: EventVocabulary) -> TxFormerForSequenceClassification:
    """A fresh model whose event schema is the vocabulary's, or a trained one to continue from."""
    if model_args.model_name_or_path is not None:
        return TxFormerForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation, use_safetensors=True
        )
    config = TxFormerConfig(
        categorical_fields=list(vocabulary.categorical_fields),
        categorical_vocab_sizes=list(vocabulary.vocab_sizes),
        numeric_fields=list(vocabulary.numeric_fields),
        attention_type=model_args.attention_type,
        num_labels=2,
    )
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        config.validate_architecture()
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=model_args.attn_implementation)


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether the Trainer finished writing `folder`: its last file, trainer_state.json, reads back as JSON."""
    try:
        json.loads((folder / CHECKPOINT_STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from. `last` (or `true`) is the newest complete checkpoint of `output_dir`, so a run
    killed while saving resumes from the checkpoint before; a given folder must be complete."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() in ("last", "true"):
        folders = [path for path in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_PATTERN.match(path.name)]
        folders.sort(key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)), reverse=True)
        for folder in folders:
            if is_complete_checkpoint(folder):
                return str(folder)
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: {output_dir} has no complete checkpoint."
        )
    if not is_complete_checkpoint(Path(resume_from_checkpoint)):
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete checkpoint (no readable {CHECKPOINT_STATE_FILE}; a run killed "
            "while saving leaves such a folder): pass an earlier checkpoint, or `last` for the newest complete one."
        )
    return resume_from_checkpoint


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Trains, evaluates on the held-out split and writes the model, vocabulary and metrics to `output_dir`."""
    resume_from_checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)
    data = prepare_datasets(data_args, training_args)
    model = build_model(model_args, data["vocabulary"])
    collator = TransactionCollator(
        categorical_fields=list(data["vocabulary"].categorical_fields),
        numeric_fields=list(data["vocabulary"].numeric_fields),
        max_length=data_args.max_length,
    )
    preprocessing = {
        "max_length": data_args.max_length,
        "label_prior": float(np.mean(data["train"]["labels"])),
    }
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=collator,
        compute_metrics=compute_metrics,
        callbacks=[PerformerRedrawCallback(), PushCodeFilesCallback(data["vocabulary"], preprocessing)],
    )
    add_profiling_callback(trainer)
    train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = {
        **train_result.metrics,
        **trainer.evaluate(),
        "train_samples": len(data["train"]),
        "eval_samples": len(data["eval"]),
    }
    if data["synthetic_dir"] is not None:
        eval_ids = np.asarray(data["eval"]["customer_id"])
        for window, name in ((None, "all"), (64, "last_64"), (data_args.max_length, "last_max_length")):
            metrics[f"oracle_auroc_{name}"] = oracle_auroc(data["synthetic_dir"], eval_ids, last_n=window)
    output_dir = Path(training_args.output_dir)
    # On every process: under FSDP and DeepSpeed ZeRO-3 gathering the weights is collective; only the main one writes.
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        data["vocabulary"].save_pretrained(output_dir)
        atomic_write_json(output_dir / PREPROCESSING_FILE, preprocessing)
        atomic_write_json(output_dir / RESULTS_FILE, metrics)
        atomic_write_json(
            output_dir / "training_run.json",
            {
                "model_args": asdict(model_args),
                "data_args": asdict(data_args),
                "training_args": training_args.to_dict(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            },
        )
        if training_args.push_to_hub:
            push_folder_to_hub(
                output_dir,
                training_args.hub_model_id or output_dir.name,
                private=bool(training_args.hub_private_repo),
                revision=training_args.hub_revision,
                token=training_args.hub_token,
            )
    return metrics


def format_result(metrics: dict) -> str:
    """The main job's closing table: the model's held-out AUROC next to the oracle AUROCs of the data."""
    rows = [("model (held-out)", metrics.get("eval_auroc"), metrics.get("eval_accuracy"))]
    labels = {
        "all": "oracle, all events",
        "last_64": "oracle, last 64 events",
        "last_max_length": "oracle, same window",
    }
    rows += [
        (text, metrics[f"oracle_auroc_{key}"], None)
        for key, text in labels.items()
        if f"oracle_auroc_{key}" in metrics
    ]
    lines = ["| | AUROC | accuracy |", "|---|---|---|"]
    lines += [
        f"| {name} | {auroc:.4f} | {'' if accuracy is None else f'{accuracy:.4f}'} |" for name, auroc, accuracy in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line: `python scripts/train.py [--attention_type ...] [--transactions ... --labels ...] [Trainer flags]`."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TxFormerTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout
    )
    transformers.utils.logging.set_verbosity_warning()
    metrics = train(model_args, data_args, training_args)
    if training_args.should_log:
        print(f"\nHeld-out results ({training_args.output_dir}):\n{format_result(metrics)}")
        print(json.dumps({key: value for key, value in metrics.items() if "auroc" in key}, indent=2))
    return metrics


__all__ = ["DataArguments", "ModelArguments", "TxFormerTrainingArguments", "main", "train"]
