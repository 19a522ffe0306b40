"""Self-supervised pretraining on transactions alone (every customer, labelled or not): CoLES slices, the HF `Trainer`,
and an output folder that `scripts/train.py --model_name_or_path` fine-tunes."""

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .callbacks import AttentionStepCallback
from .cli import configure_logging
from .configuration_txformer import TxFormerConfig
from .data import EventVocabulary, TransactionCollator, prepare_encoded_customers
from .file_names import RESULTS_FILE, TRAINING_RUN_FILE
from .hub import PushCodeFilesCallback
from .io_utils import atomic_write_json
from .profiling import add_profiling_callback
from .recipe import STANDARD_RECIPE
from .training import (
    DataArguments,
    ModelArguments,
    TxFormerTrainingArguments,
    check_model_arguments,
    check_output_dir,
    data_files,
    new_config,
)


logger = logging.getLogger(__name__)

# The Auto class of each objective's head (registered by `txformer`).
OBJECTIVES = {"contrastive": AutoModelForPreTraining, "masked": AutoModelForMaskedLM}


@dataclass
class ContrastiveSliceCollator:
    """CoLES batches: for each customer, `split_count` random contiguous sub-sequences of its history ("slices") with
    lengths uniform in `[min_length, max_length]` (at most the history), padded by [`TransactionCollator`].

    Returns the padded slices, customer by customer, and `slice_labels` [batch * split_count], the row of each slice's
    customer in `features`: slices of one customer are positives, all others negatives. Before slicing, each event is
    dropped with probability `event_dropout` (kept when fewer than `min_length` events would remain). A history shorter
    than `min_length` is an error: filter the dataset first (`keep_long_histories`). Random draws use torch's generator,
    so `set_seed` and the DataLoader's per-worker seeds make them reproducible and distinct across workers.
    """

    categorical_fields: list[str]
    numeric_fields: list[str]
    split_count: int = 5
    min_length: int = 15
    max_length: int = 75
    event_dropout: float = 0.01
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.split_count < 2:
            raise ValueError(f"split_count must be at least 2 (positives come in pairs), got {self.split_count}.")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"Slice lengths need 1 <= min_length <= max_length, got {self.min_length} and {self.max_length}."
            )
        if not 0.0 <= self.event_dropout < 1.0:
            raise ValueError(f"event_dropout must lie in [0, 1), got {self.event_dropout}.")
        self.padding = TransactionCollator(
            categorical_fields=list(self.categorical_fields),
            numeric_fields=list(self.numeric_fields),
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        names = ["event_time", *self.categorical_fields, *self.numeric_fields]
        slices = []
        for row, feature in enumerate(features):
            customer = feature.get("customer_id", f"at batch row {row}")
            events = self.sample_events(len(feature["event_time"]), customer)
            columns = {name: np.asarray(feature[name])[events] for name in names}
            for start, end in self.sample_slices(len(events)):
                slices.append(
                    {"customer_id": customer, **{name: values[start:end] for name, values in columns.items()}}
                )
        batch = self.padding(slices)
        batch["slice_labels"] = torch.arange(len(features)).repeat_interleave(self.split_count)
        return batch

    def sample_events(self, num_events: int, customer) -> np.ndarray:
        """Indices of the events kept after the event dropout."""
        if num_events < self.min_length:
            raise ValueError(
                f"Customer {customer} has {num_events} events, fewer than the slice min_length {self.min_length}: "
                "leave such customers out (keep_long_histories)."
            )
        kept = (torch.rand(num_events) >= self.event_dropout).numpy()
        return np.flatnonzero(kept) if kept.sum() >= self.min_length else np.arange(num_events)

    def sample_slices(self, num_events: int) -> list[tuple[int, int]]:
        """`split_count` (start, end) pairs: lengths uniform in [min_length, min(max_length, num_events)], starts
        uniform over the positions where the slice fits."""
        lengths = torch.randint(self.min_length, min(self.max_length, num_events) + 1, (self.split_count,))
        starts = (torch.rand(self.split_count) * (num_events - lengths + 1)).long()
        return [(int(start), int(start + length)) for start, length in zip(starts, lengths, strict=True)]


def keep_long_histories(customers: datasets.Dataset, min_events: int) -> datasets.Dataset:
    """The customers with at least `min_events` events (`num_events` column of an encoded dataset); logs how many
    were left out."""
    num_events = np.asarray(customers["num_events"])
    kept = np.flatnonzero(num_events >= min_events)
    if len(kept) < len(customers):
        logger.info(
            "%d of %d customers have fewer than %d events and are left out of contrastive pretraining.",
            len(customers) - len(kept),
            len(customers),
            min_events,
        )
    if len(kept) == 0:
        raise ValueError(f"No customer has {min_events} events or more: lower --slice_min_length.")
    return customers.select(kept)


@dataclass
class PretrainingModelArguments(ModelArguments):
    """The objective, and the model: a fresh config of the given attention kind, or a folder to continue from."""

    objective: str = field(
        default="contrastive",
        metadata={
            "help": "contrastive (CoLES: slices of one customer are positives) or masked (masked events).",
            "choices": list(OBJECTIVES),
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue from this folder (its vocabulary is reused; its head is kept if it has one)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; valid objectives: {list(OBJECTIVES)}.")


@dataclass
class PretrainingDataArguments(DataArguments):
    """The transactions (labels are not used) and the slices of the contrastive objective."""

    transactions: str | None = field(
        default=None,
        metadata={"help": "transactions.csv (real format): every customer in it is used. Default: synthetic."},
    )
    labels: str | None = field(default=None, metadata={"help": "Not used: pretraining refuses a labels file."})
    max_length: int | None = field(
        default=256,
        metadata={
            "help": "Most recent events kept per history by the masked objective; saved in the processor as "
            "the window of scripts/embed.py; 0 = whole histories."
        },
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of customers held out for the eval loss (when --eval_strategy is set)."}
    )
    split_count: int = field(default=5, metadata={"help": "Contrastive: slices per customer."})
    slice_min_length: int = field(
        default=15, metadata={"help": "Contrastive: shortest slice; shorter histories are left out."}
    )
    slice_max_length: int = field(default=75, metadata={"help": "Contrastive: longest slice."})
    event_dropout: float = field(
        default=0.01, metadata={"help": "Contrastive: share of events dropped before slicing."}
    )

    def check_data_files(self) -> None:
        """Pretraining reads transactions alone."""
        if self.labels is not None:
            raise ValueError("Pretraining uses no labels: give --transactions alone.")
        if self.streaming:
            raise ValueError(
                "--streaming is for scripts/train.py: pretraining reads the prepared customers as a dataset."
            )


@dataclass
class PretrainingArguments(TxFormerTrainingArguments):
    """`TrainingArguments` with pretraining defaults; the batch size counts customers (each gives `split_count` slices
    to the contrastive objective)."""

    output_dir: str | None = field(default="outputs/txformer-pretrain", metadata={"help": "Output folder."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs."})
    eval_strategy: str = field(default="no", metadata={"help": "When to evaluate the loss on held-out customers."})
    recipe: str = field(
        default=STANDARD_RECIPE.name,
        metadata={
            "help": "Pretraining takes the standard recipe's defaults (scripts/train.py chooses by the data).",
            "choices": [STANDARD_RECIPE.name],
        },
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluate the loss only (no per-event predictions are gathered)."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=None,
        metadata={
            "help": "Let DDP look for parameters without a gradient at every step; default: only where the "
            "objective leaves some (see has_parameters_without_gradient)."
        },
    )


def has_parameters_without_gradient(objective: str, config: TxFormerConfig) -> bool:
    """Whether the objective's loss leaves a parameter without a gradient, so that DDP must look for such
    parameters at every step: only the masked objective's, which reads the events and never the pooled history,
    whose learned sum share (`pooling="mean_sum"`) is then a parameter of its own."""
    return objective == "masked" and config.pooling == "mean_sum"


def prepare_pretraining_data(
    model_args: PretrainingModelArguments,
    data_args: PretrainingDataArguments,
    training_args: TrainingArguments,
    vocabulary: EventVocabulary | None = None,
) -> dict:
    """Every customer of the transactions, encoded with a vocabulary fitted on them all (or the one of
    `model_name_or_path`), prepared once into the cache and memory-mapped (under a launch the main process prepares
    while the others wait); `eval_fraction` held out when evaluation is on."""
    transactions, _, _ = data_files(data_args, training_args)
    with training_args.main_process_first(local=False, desc="preparing the data"):
        prepared = prepare_encoded_customers(
            transactions,
            vocabulary,
            categorical_fields=data_args.categorical_fields,
            cache_dir=data_args.data_cache_dir,
        )
    customers = prepared.customers
    if model_args.objective == "contrastive":
        customers = keep_long_histories(customers, data_args.slice_min_length)
    eval_customers = None
    # In memory: the index files of a split or a shuffle would otherwise go into the shared cache folder.
    if training_args.eval_strategy != "no":
        split = customers.train_test_split(
            test_size=data_args.eval_fraction, seed=data_args.split_seed, keep_in_memory=True
        )
        customers, eval_customers = split["train"], split["test"]
    if data_args.max_train_customers is not None and data_args.max_train_customers < len(customers):
        customers = customers.shuffle(seed=data_args.split_seed, keep_in_memory=True).select(
            range(data_args.max_train_customers)
        )
    return {"train": customers, "eval": eval_customers, "vocabulary": prepared.vocabulary}


def build_pretraining_model(model_args: PretrainingModelArguments, vocabulary: EventVocabulary):
    """The objective's head: fresh, with the vocabulary's event schema, or loaded from `model_name_or_path`."""
    auto_class = OBJECTIVES[model_args.objective]
    if model_args.model_name_or_path is not None:
        return auto_class.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation, use_safetensors=True
        )
    config = new_config(model_args, vocabulary)
    return auto_class.from_config(config, attn_implementation=model_args.attn_implementation)


def pretrain(
    model_args: PretrainingModelArguments, data_args: PretrainingDataArguments, training_args: TrainingArguments
) -> dict:
    """Pretrains and writes the model (safetensors), and the processor (vocabulary, `max_length`) to `output_dir`."""
    pretrained_vocabulary = check_model_arguments(model_args)
    resume_from_checkpoint = check_output_dir(training_args)
    set_seed(training_args.seed)
    data = prepare_pretraining_data(model_args, data_args, training_args, pretrained_vocabulary)
    vocabulary = data["vocabulary"]
    model = build_pretraining_model(model_args, vocabulary)
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = has_parameters_without_gradient(model_args.objective, model.config)
    fields = {"categorical_fields": list(vocabulary.categorical_fields), "numeric_fields": vocabulary.numeric_fields}
    if model_args.objective == "contrastive":
        collator = ContrastiveSliceCollator(
            **fields,
            split_count=data_args.split_count,
            min_length=data_args.slice_min_length,
            max_length=data_args.slice_max_length,
            event_dropout=data_args.event_dropout,
        )
    else:
        collator = TransactionCollator(**fields, max_length=data_args.max_length)
    # The processor that fine-tuning and embedding read back; no labels were seen, so there is no label prior.
    processor = vocabulary.to_processor(max_length=data_args.max_length, label_prior=None)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=collator,
        processing_class=processor,
        callbacks=[AttentionStepCallback(), PushCodeFilesCallback()],
    )
    add_profiling_callback(trainer)
    train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = {**train_result.metrics, "train_samples": len(data["train"])}
    if data["eval"] is not None:
        metrics.update(trainer.evaluate())
    output_dir = Path(training_args.output_dir)
    # On every process: under FSDP and DeepSpeed ZeRO-3 gathering the weights is collective; only the main one writes.
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        atomic_write_json(output_dir / RESULTS_FILE, metrics)
        atomic_write_json(
            output_dir / TRAINING_RUN_FILE,
            {
                "model_args": asdict(model_args),
                "data_args": asdict(data_args),
                "training_args": training_args.to_dict(),
                "loss_history": [
                    {"step": entry["step"], "loss": entry["loss"]}
                    for entry in trainer.state.log_history
                    if "loss" in entry
                ],
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            },
        )
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Command line: `python scripts/pretrain.py [--objective contrastive|masked] [--transactions FILE] [Trainer flags]`."""
    parser = HfArgumentParser((PretrainingModelArguments, PretrainingDataArguments, PretrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    configure_logging(training_args)
    metrics = pretrain(model_args, data_args, training_args)
    if training_args.should_log:
        print(json.dumps({key: value for key, value in metrics.items() if "loss" in key}, indent=2))
    return metrics


__all__ = [
    "ContrastiveSliceCollator",
    "PretrainingArguments",
    "PretrainingDataArguments",
    "PretrainingModelArguments",
    "has_parameters_without_gradient",
    "keep_long_histories",
    "main",
    "pretrain",
]
