"""Training entry point: data preparation, the HF `Trainer`, metrics and the output folder."""

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import EvalLoopOutput, IntervalStrategy, SaveStrategy, seed_worker
from transformers.training_args import ParallelMode

from . import TxFormerConfig, TxFormerForSequenceClassification
from .callbacks import AttentionStepCallback
from .cli import configure_logging, merge_config_overrides, parse_config_overrides
from .configuration_txformer import ATTENTION_KINDS
from .data import (
    SYNTHETIC_FAMILIES,
    EndlessStream,
    EventVocabulary,
    RandomWindow,
    RandomWindowEpochCallback,
    TokenBudgetBatchSampler,
    TransactionCollator,
    generate_synthetic_data,
    oracle_auroc,
    prepare_training_data,
    streaming_dataset,
)
from .data.prepare import DEFAULT_CACHE
from .data.synthetic import ORACLE_FILE, TRAIN_LABELS_FILE, TRANSACTIONS_FILE
from .file_names import EVAL_PREDICTIONS_FILE, RESULTS_FILE, TRAINING_RUN_FILE
from .hp_search import SearchResult, check_search_backend, search_hyperparameters, search_started
from .hub import PushCodeFilesCallback, push_folder_to_hub
from .io_utils import atomic_write_json, check_writable_folder, incomplete_files
from .metrics import compute_metrics, positive_class_probability, write_evaluated_predictions
from .pipeline_txformer import custom_pipelines
from .prediction import check_processor_matches, load_processor, load_txformer_config
from .profiling import add_profiling_callback
from .readout_center import update_readout_center
from .recipe import (
    AUTO_RECIPE,
    FINE_TUNING_LEARNING_RATE_SCALE,
    RECIPE_CHOICES,
    Recipe,
    choose_recipe,
    fill_from_recipe,
    recipe_overrides,
    set_from_recipe,
)


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Config keys that a checkpoint may differ in from the model the flags build: bookkeeping, not the model.
RESUME_IGNORED_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "architectures", "auto_map", "dtype", "problem_type", "custom_pipelines"}
)
# Trainer flags that torch or the Trainer would only refuse once training runs, with a traceback.
NON_NEGATIVE_NUMBER_FLAGS = ("learning_rate", "weight_decay", "num_train_epochs", "max_grad_norm", "warmup_steps")
VALIDATION_DATASET = "validation"
DEFAULT_ATTENTION_TYPE = "full"
# `TrainingArguments.train_sampling_strategy` when no flag sets it.
DEFAULT_SAMPLING_STRATEGY = "random"
# The validation split takes at most this share of the training customers, whatever its minimum size.
MAX_VALIDATION_SHARE = 0.25
# The categorical fields a model reads by default: not the terminal id, whose thousands of codes let a model learn its
# training customers by heart (docs/recipe.md).
MODEL_CATEGORICAL_FIELDS = ("mcc_code", "tr_type")
# Windows of most recent events whose oracle AUROC a run on synthetic data records (`oracle_auroc_last_<n>`), next to
# whole histories and the run's own window: the curve that models of every context are compared with.
ORACLE_WINDOWS = (64, 256, 1024, 4096)


@dataclass
class ModelArguments:
    """Which model to train: a fresh config of the given attention kind, or a trained folder to continue from."""

    attention_type: str | None = field(
        default=None,
        metadata={
            "help": "Attention kind of a new model (default: full); a --model_name_or_path folder keeps its own.",
            "choices": list(ATTENTION_KINDS),
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Exact attention backend (full attention, the ∞-former's short-term attention): sdpa, eager, "
            "flex_attention (trains on a GPU only) or flash_attention_2 (GPU, flash-attn package).",
            "choices": ["sdpa", "eager", "flex_attention", "flash_attention_2"],
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this trained or pretrained model folder; its vocabulary (processor), if any, is used "
            "instead of fitting a new one, and a missing classifier head is newly initialised."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config fields of a new model to override, e.g. 'hidden_size=128,num_hidden_layers=4'; a "
            "--model_name_or_path folder keeps its own config."
        },
    )
    freeze_encoder: bool = field(
        default=False,
        metadata={
            "help": "Train the classifier head alone on the encoder of --model_name_or_path, whose weights stay as "
            "they are (a linear probe: with few labels, pretrained features are not overwritten by a fit to them)."
        },
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.attention_type is None:
            self.attention_type = DEFAULT_ATTENTION_TYPE
        if self.freeze_encoder and self.model_name_or_path is None:
            raise ValueError(
                "--freeze_encoder trains the head on the encoder of a trained or pretrained folder: give "
                "--model_name_or_path (a new model's encoder would stay random)."
            )


@dataclass
class DataArguments:
    """Where the data comes from and how histories are cut."""

    transactions: str | None = field(
        default=None,
        metadata={
            "help": "Transactions in the real format: a CSV (plain, .gz, .bz2) or Parquet file, or a glob pattern of "
            "several (quoted). Default: synthetic."
        },
    )
    labels: str | None = field(default=None, metadata={"help": "gender_train.csv (customer_id,gender)."})
    synthetic_num_customers: int = field(default=8000, metadata={"help": "Customers of the generated data."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the generated data."})
    synthetic_family: str = field(
        default="independent",
        metadata={"help": "Generator family of the synthetic data.", "choices": list(SYNTHETIC_FAMILIES)},
    )
    synthetic_labelled_fraction: float | None = field(
        default=None, metadata={"help": "Share of generated customers that get a label (default: all)."}
    )
    data_cache_dir: str = field(
        default=str(DEFAULT_CACHE),
        metadata={"help": "Cache of generated and prepared data (default: env TXFORMER_CACHE or ~/.cache/txformer)."},
    )
    max_length: int | None = field(
        default=256, metadata={"help": "Most recent events kept per history; 0 = whole histories (∞-former)."}
    )
    categorical_fields: list[str] = field(
        default_factory=lambda: list(MODEL_CATEGORICAL_FIELDS),
        metadata={
            "help": "Categorical event fields the model reads (the first one also forms the event pairs), e.g. "
            "mcc_code tr_type term_id. A folder given by --model_name_or_path keeps its own."
        },
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share of labelled customers (stratified)."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out and validation splits."})
    max_train_customers: int | None = field(default=None, metadata={"help": "Subsample training customers."})
    train_window_min_share: float | None = field(
        default=None,
        metadata={
            "help": "Training reads each history as a random window of at least this share of the events it keeps "
            "(anywhere in the history), anew at each epoch, so the model cannot learn customers by heart; evaluation "
            "reads the most recent events. 0 = off. Default: 0.5, or 0.05 under the long-history recipe (--recipe)."
        },
    )
    train_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Training reads random windows of at most this many events (at least --train_window_min_share of "
            "them, anywhere in the history) while validation, evaluation and inference read --max_length: a model "
            "that reads whole histories trains at the cost of short ones. 0 = --max_length. Default: --max_length, "
            "or 4096 under the long-history recipe (--recipe)."
        },
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the training customers (stratified) held back to evaluate during training, pick the "
            "best checkpoint and stop early; the reported held-out customers never steer training. 0 = none."
        },
    )
    min_validation_customers: int = field(
        default=200,
        metadata={"help": "Validation customers at least (but at most a quarter of the training customers)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Train from an endless stream of the prepared training customers (an IterableDataset read shard by "
            "shard through a shuffle buffer, split across ranks, grouped by length within the buffer with "
            "--group_by_length) instead of random access to them; needs --max_steps. For data far larger than the "
            "page cache or on slow disks (docs/data.md)."
        },
    )
    # The flags left to the recipe (filled from the standard one until `use_recipe`).
    recipe_fields: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self):
        self.recipe_fields = fill_from_recipe(self)
        if self.max_length is not None and self.max_length < 0:
            raise ValueError(f"--max_length must be positive, or 0 for whole histories, got {self.max_length}.")
        if self.max_length == 0:
            self.max_length = None
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}.")
        self.train_max_length = self.train_max_length or None
        if self.train_max_length is not None and self.train_max_length < 0:
            raise ValueError(
                f"--train_max_length must be positive (or 0 = --max_length), got {self.train_max_length}."
            )
        if not 0 <= self.train_window_min_share <= 1:
            raise ValueError(f"--train_window_min_share must be in [0, 1], got {self.train_window_min_share}.")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        self.check_data_files()

    def use_recipe(self, recipe: Recipe) -> None:
        """Sets the flags left to the recipe to `recipe`'s values."""
        set_from_recipe(self, recipe, self.recipe_fields)
        self.train_max_length = self.train_max_length or None

    def check_data_files(self) -> None:
        """Real data is a transactions file and a labels file."""
        if (self.transactions is None) != (self.labels is None):
            raise ValueError("Give both --transactions and --labels (real data), or neither (synthetic data).")

    @property
    def train_window_length(self) -> int | None:
        """Most events a training history holds: the shorter of `max_length` and `train_max_length` (None = all)."""
        lengths = [length for length in (self.max_length, self.train_max_length) if length is not None]
        return min(lengths, default=None)

    @property
    def synthetic_dir_name(self) -> str:
        """Cache folder of the generated data: one per family, size, seed and labelled share."""
        name = f"synthetic-{self.synthetic_family}-n{self.synthetic_num_customers}-seed{self.synthetic_seed}"
        if self.synthetic_labelled_fraction is not None:
            name += f"-labelled{self.synthetic_labelled_fraction:g}"
        return name


@dataclass
class TxFormerTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults that suit this package (every Trainer flag still works).

    The budget is counted in optimizer steps: `max(min_train_steps, ceil(num_train_epochs x steps per epoch))` unless
    `--max_steps` is given. Training evaluates on the validation split at every checkpoint (`save_steps`, a share of
    the budget by default), stops after `early_stopping_patience` evaluations without a better validation AUROC (not
    before `early_stopping_start` of the budget), and ends with the best checkpoint. The flags whose default says
    "by the recipe" follow `--recipe` (docs/recipe.md).
    """

    output_dir: str | None = field(default="outputs/txformer", metadata={"help": "Output folder."})
    num_train_epochs: float = field(
        default=6.0,
        metadata={"help": "Budget in passes over the training customers (unless --max_steps): see min_train_steps."},
    )
    recipe: str = field(
        default=AUTO_RECIPE,
        metadata={
            "help": "Defaults of the flags marked 'by the recipe': standard, long_histories (on histories of "
            "thousands of events), or auto: long_histories when the training customers' median history holds more "
            "than 1,024 events. A flag given on the command line wins.",
            "choices": RECIPE_CHOICES,
        },
    )
    min_train_steps: int | None = field(
        default=None,
        metadata={
            "help": "Fewest optimizer steps of a run: the budget is max(min_train_steps, ceil(num_train_epochs x "
            "optimizer steps per epoch)); --max_steps, when given, replaces it. By the recipe: 500, long 300."
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate. By the recipe: 1e-3, long histories 2e-4; a tenth of that to fine-tune the "
            "encoder of --model_name_or_path."
        },
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Decay after the warm-up."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up (a fraction of steps when < 1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Train batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Eval batch size per device."})
    eval_strategy: str = field(
        default="steps", metadata={"help": "When to evaluate on the validation split (steps: at every checkpoint)."}
    )
    eval_steps: float | None = field(
        default=None,
        metadata={"help": "Evaluate every so many steps (a share of the budget when < 1); default: save_steps."},
    )
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint."})
    save_steps: float | None = field(
        default=None,
        metadata={
            "help": "Checkpoint every so many steps (a share of the budget when < 1); default: eval_steps, else by "
            "the recipe: 0.05, long histories 1/12."
        },
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (and the best one)."})
    load_best_model_at_end: bool | None = field(
        default=None,
        metadata={"help": "End with the best checkpoint on the validation split (default: when evaluating)."},
    )
    metric_for_best_model: str | None = field(
        default=f"{VALIDATION_DATASET}_auroc", metadata={"help": "Validation metric that picks the best checkpoint."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after so many evaluations without a better metric_for_best_model; 0 = never. By the "
            "recipe: 5, long histories 0."
        },
    )
    early_stopping_start: float = field(
        default=0.5,
        metadata={
            "help": "Share of the step budget before which early stopping never stops training, so that a slow start "
            "(validation AUROC at chance for a while, on weak-signal data) is not cut short."
        },
    )
    logging_steps: float = field(default=20, metadata={"help": "Log every so many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the raw event columns: the collator builds the model inputs."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation and shuffling."})
    group_by_length: bool | None = field(
        default=None,
        metadata={
            "help": "Batch histories of similar length together (train_sampling_strategy='group_by_length'): little "
            "padding on whole histories. By the recipe: false, long histories true (unless --max_tokens_per_batch).",
            # A bare `--group_by_length` means true, as for the other boolean flags.
            "nargs": "?",
            "const": True,
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the files of another run in --output_dir (refused otherwise, unless resuming)."},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Fill each training batch with histories of similar length up to this many padded events "
            "(batch size x padded length) instead of per_device_train_batch_size histories."
        },
    )
    length_column_name: str = field(
        default="num_events", metadata={"help": "Column of the history lengths, for length grouping."}
    )
    hp_search_trials: int = field(
        default=0,
        metadata={
            "help": "Before the run, this many trials of Trainer.hyperparameter_search (optuna) over the learning rate, "
            "weight decay and a new model's dropout, each scored by its best validation AUROC; the run then trains "
            "with the best trial's values (docs/recipe.md). 0 = no search."
        },
    )
    readout_center_customers: int | None = field(
        default=4096,
        metadata={
            "help": "With embedding_sum_readout: training customers (a seeded sample, or all when fewer or 0) whose "
            "mean event embeddings, fitted against the log of their length, give the readout's centre before every "
            "evaluation."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "Let DDP look for parameters without a gradient at every step: not needed, as the classifier's "
            "loss reaches every parameter of every attention kind."
        },
    )
    # The flags left to the recipe (filled from the standard one until `use_recipe`).
    recipe_fields: tuple[str, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self):
        """On a machine without GPU (or other accelerator), a process of a multi-process launch trains on the CPU
        with gloo; a process that still finds itself alone in such a launch is an error, not a silent lone run.
        Evaluations and checkpoints follow each other when only one of `eval_steps` and `save_steps` is given."""
        if self.save_steps is None:
            self.save_steps = self.eval_steps
        self.recipe_fields = fill_from_recipe(self)
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        launched_world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if launched_world_size > 1 and not torch.accelerator.is_available():
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        # Pinned memory serves only transfers to an accelerator; without one, every loader would warn about it.
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False
        if self.group_by_length:
            if self.max_tokens_per_batch is not None:
                raise ValueError("--group_by_length and --max_tokens_per_batch both group by length: pass one.")
            self.train_sampling_strategy = "group_by_length"
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ValueError(f"--max_tokens_per_batch must be positive, got {self.max_tokens_per_batch}.")
        if self.per_device_train_batch_size < 1 or self.per_device_eval_batch_size < 1:
            raise ValueError(
                f"--per_device_train_batch_size ({self.per_device_train_batch_size}) and --per_device_eval_batch_size "
                f"({self.per_device_eval_batch_size}) must be at least 1."
            )
        for name in NON_NEGATIVE_NUMBER_FLAGS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number, 0 or more, got {value}.")
        if self.min_train_steps < 1 or self.early_stopping_patience < 0 or not 0 <= self.early_stopping_start <= 1:
            raise ValueError(
                f"--min_train_steps must be positive ({self.min_train_steps}), --early_stopping_patience at least 0 "
                f"({self.early_stopping_patience}) and --early_stopping_start in [0, 1] ({self.early_stopping_start})."
            )
        if self.hp_search_trials < 0:
            raise ValueError(f"--hp_search_trials must be 0 (no search) or more, got {self.hp_search_trials}.")
        if self.hp_search_trials and IntervalStrategy(self.eval_strategy) == IntervalStrategy.NO:
            raise ValueError("--hp_search_trials scores each trial on the validation split: drop --eval_strategy no.")
        if self.hp_search_trials and self.deepspeed:
            raise ValueError(
                "--hp_search_trials does not search under --deepspeed (its config fixes the learning rate when the "
                "flags are parsed): search without it, then give the best values (hp_search/best.json) as flags."
            )
        if self.hp_search_trials:
            check_search_backend()
        if self.readout_center_customers is not None and self.readout_center_customers < 0:
            raise ValueError(
                f"--readout_center_customers must be positive, or 0 for all, got {self.readout_center_customers}."
            )
        if self.readout_center_customers == 0:
            self.readout_center_customers = None
        if self.load_best_model_at_end is None:
            self.load_best_model_at_end = self.evaluates and SaveStrategy(self.save_strategy) in (
                SaveStrategy(self.eval_strategy),
                SaveStrategy.BEST,
            )
        super().__post_init__()
        if launched_world_size > 1 and self.parallel_mode == ParallelMode.NOT_PARALLEL:
            raise ValueError(
                f"This process was launched as one of WORLD_SIZE={launched_world_size} processes but is not part of a "
                f"distributed run (device {self.device}): pass --use_cpu to train on the CPU, or launch on the GPUs."
            )

    def use_recipe(self, recipe: Recipe, learning_rate_scale: float = 1.0) -> None:
        """Sets the flags left to the recipe to `recipe`'s values, the learning rate times `learning_rate_scale` (the
        evaluations follow the checkpoints; batches of a token budget, or of another sampling strategy given, are not
        grouped by length)."""
        parsed_learning_rate = self.learning_rate
        set_from_recipe(self, recipe, self.recipe_fields)
        if "learning_rate" in self.recipe_fields:
            self.learning_rate *= learning_rate_scale
        if self.deepspeed and self.learning_rate != parsed_learning_rate:
            raise ValueError(
                f"--deepspeed fills its config's 'auto' learning rate when the flags are parsed ({parsed_learning_rate}"
                f"), before the data chooses the recipe ({self.learning_rate} here): give --learning_rate."
            )
        if "save_steps" in self.recipe_fields:
            self.eval_steps = self.save_steps
        if "group_by_length" in self.recipe_fields and (
            self.max_tokens_per_batch is not None or self.train_sampling_strategy != DEFAULT_SAMPLING_STRATEGY
        ):
            self.group_by_length = False
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"

    @property
    def evaluates(self) -> bool:
        """Whether training evaluates (on the validation split)."""
        return IntervalStrategy(self.eval_strategy) != IntervalStrategy.NO


def steps_per_epoch(
    num_batches: int, world_size: int = 1, gradient_accumulation_steps: int = 1, drop_last: bool = False
) -> int:
    """Optimizer steps in one pass over `num_batches` batches, as the `Trainer` takes them: the batches are dealt to
    `world_size` processes, which all take as many (the last round is completed with repeated batches, or dropped
    with `drop_last`), and `gradient_accumulation_steps` batches of a process make one step."""
    per_process = num_batches // world_size if drop_last else math.ceil(num_batches / world_size)
    return max(1, math.ceil(per_process / gradient_accumulation_steps))


def training_budget(args: TxFormerTrainingArguments, num_steps_per_epoch: int) -> int:
    """Optimizer steps of a run: `--max_steps` when given, else
    `max(min_train_steps, ceil(num_train_epochs x num_steps_per_epoch))`."""
    if args.max_steps > 0:
        return args.max_steps
    return max(args.min_train_steps, math.ceil(args.num_train_epochs * num_steps_per_epoch))


class BudgetEarlyStoppingCallback(EarlyStoppingCallback):
    """`EarlyStoppingCallback` that counts evaluations without improvement from the start but stops training only
    once `start` of the step budget is done."""

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0, start: float = 0.0):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.start = start

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics, **kwargs):
        """The parent's decision, withdrawn before `start` of `state.max_steps`."""
        should_training_stop = control.should_training_stop
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if state.global_step < self.start * state.max_steps:
            control.should_training_stop = should_training_stop

    def state(self) -> dict:
        """The parent's exportable state, with `start`."""
        state = super().state()
        state["args"]["start"] = self.start
        return state


class TxFormerTrainer(Trainer):
    """The `Trainer`, whose training batches come from `train_batch_sampler` when one is given (token budgets), or
    from this process's own stream when the training dataset is an `EndlessStream` (`--streaming`). Before every
    evaluation or prediction, a model with the embedding readout gets its centre fitted over the customers of
    `readout_center_data`, read as evaluation reads them (the last `max_length` events; `update_readout_center`)."""

    def __init__(
        self,
        *args,
        train_batch_sampler: TokenBudgetBatchSampler | None = None,
        readout_center_data: datasets.Dataset | None = None,
        max_length: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if readout_center_data is not None and self.is_fsdp_enabled and self.model.config.embedding_sum_readout:
            raise ValueError(
                "embedding_sum_readout=True does not train under FSDP yet: the readout's centre is fitted on the "
                "embeddings outside the model's forward pass, which FSDP does not gather; use DDP."
            )
        self.train_batch_sampler = train_batch_sampler
        self.readout_center_data = readout_center_data
        self.max_length = max_length

    def evaluation_loop(self, *args, **kwargs) -> EvalLoopOutput:
        """The `Trainer`'s loop, after setting the readout's centre for the current weights."""
        if self.readout_center_data is not None:
            update_readout_center(
                self.accelerator.unwrap_model(self.model),
                self.readout_center_data,
                self.data_collator,
                self.accelerator,
                length_column=self.args.length_column_name,
                max_length=self.max_length,
                max_customers=self.args.readout_center_customers,
            )
        return super().evaluation_loop(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """The `Trainer`'s loader; one over `train_batch_sampler`, whose batches `accelerator.prepare` deals to the
        processes of a distributed run; or one over the stream, left unprepared: the stream is this process's share
        already, and `accelerator.prepare` would split it again (the `Trainer` moves each batch to the device)."""
        if self.train_batch_sampler is None and not isinstance(self.train_dataset, EndlessStream):
            return super().get_train_dataloader()
        args = self.args
        options = dict(
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor,
            in_order=args.dataloader_in_order,
        )
        if isinstance(self.train_dataset, EndlessStream):
            collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
            return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=collator, **options)
        dataloader = DataLoader(
            self._remove_unused_columns(self.train_dataset, description="Training"),
            batch_sampler=self.train_batch_sampler,
            collate_fn=self.data_collator,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
            **options,
        )
        return self.accelerator.prepare(dataloader)

    def evaluate_with_predictions(self, dataset: datasets.Dataset) -> tuple[dict[str, float], np.ndarray]:
        """`evaluate(dataset)` (the same `eval_*` metrics, logged) that also returns the probability of class 1 of
        every row of `dataset`, in the dataset's order.

        The evaluation loop gathers predictions in its sampler's order (length-grouped with `--group_by_length`;
        accelerate deals whole batches to the processes and gathers them back in turn), so they are put back in the
        dataset's order through that sampler, and checked against the dataset's labels."""
        output = self.predict(dataset, metric_key_prefix="eval")
        self.log(output.metrics)
        sampler = self._get_eval_sampler(dataset)
        order = np.arange(len(dataset)) if sampler is None else np.fromiter(iter(sampler), dtype=np.int64)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        labels = np.asarray(dataset["labels"])
        if not np.array_equal(np.sort(order), np.arange(len(dataset))) or not np.array_equal(
            np.asarray(output.label_ids).reshape(-1), labels[order]
        ):
            raise RuntimeError("the evaluation loop returned the predictions in an order its sampler does not give.")
        probabilities = np.empty(len(dataset), dtype=np.float64)
        probabilities[order] = positive_class_probability(logits)
        return output.metrics, probabilities


def prepare_datasets(
    data_args: DataArguments, training_args: TrainingArguments, vocabulary: EventVocabulary | None = None
) -> dict:
    """The data of the flags (generated first, for synthetic data) prepared once into the cache, then memory-mapped
    (`prepare_training_data`; under a launch the main process prepares while the others wait): the labelled customers
    split into held-out (reported, never seen in training) and training customers, then, when training evaluates, a
    validation split of the training customers; the vocabulary fitted on the training part unless one is given; every
    part encoded."""
    transactions, labels, synthetic_dir = data_files(data_args, training_args)
    validation = None
    if IntervalStrategy(training_args.eval_strategy) != IntervalStrategy.NO and data_args.validation_fraction > 0:
        validation = partial(
            validation_size, fraction=data_args.validation_fraction, minimum=data_args.min_validation_customers
        )
    with training_args.main_process_first(local=False, desc="preparing the data"):
        prepared = prepare_training_data(
            transactions,
            labels,
            eval_fraction=data_args.eval_fraction,
            split_seed=data_args.split_seed,
            max_train_customers=data_args.max_train_customers,
            validation_size=validation,
            vocabulary=vocabulary,
            categorical_fields=data_args.categorical_fields,
            cache_dir=data_args.data_cache_dir,
        )
    return {
        "train": prepared.train,
        "validation": prepared.validation,
        "eval": prepared.eval,
        "vocabulary": prepared.vocabulary,
        "synthetic_dir": synthetic_dir,
    }


def training_stream(
    train: datasets.Dataset, training_args: TxFormerTrainingArguments, seed: int, window: RandomWindow | None = None
) -> EndlessStream:
    """The training customers as this process's endless stream (`--streaming`): its share of them
    (`split_dataset_by_node` by `process_index` of `world_size`), batches of similar length within the shuffle buffer
    with `--group_by_length`, histories cut by `window` anew at each pass."""
    stream = streaming_dataset(
        train,
        training_args.per_device_train_batch_size,
        seed=seed,
        length_column=training_args.length_column_name if training_args.group_by_length else None,
        rank=training_args.process_index,
        world_size=training_args.world_size,
    )
    return EndlessStream(stream, window)


def data_files(
    data_args: DataArguments, training_args: TrainingArguments | None = None
) -> tuple[Path, Path | None, Path | None]:
    """The transactions file, the labels file and, for synthetic data, its folder (with the oracle). Synthetic data
    is generated once into the cache folder named by the data flags (the main process first, when `training_args`
    is given, while the other processes of a launch wait)."""
    if data_args.transactions is not None:
        return Path(data_args.transactions), None if data_args.labels is None else Path(data_args.labels), None
    synthetic_dir = Path(data_args.data_cache_dir) / data_args.synthetic_dir_name
    waiting = (
        training_args.main_process_first(desc="generating synthetic data")
        if training_args is not None
        else contextlib.nullcontext()
    )
    with waiting:
        if not (synthetic_dir / ORACLE_FILE).exists():
            # Written in a folder of its own, then renamed into place: processes that generate the same data at once
            # (several runs, or several machines on a shared cache) never see, or write into, a half-written folder.
            synthetic_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=synthetic_dir.parent, prefix=f".{synthetic_dir.name}."))
            try:
                generate_synthetic_data(
                    staging,
                    num_customers=data_args.synthetic_num_customers,
                    seed=data_args.synthetic_seed,
                    family=data_args.synthetic_family,
                    labelled_fraction=data_args.synthetic_labelled_fraction,
                )
                if not (synthetic_dir / ORACLE_FILE).exists():  # a folder left half-written by an older version
                    shutil.rmtree(synthetic_dir, ignore_errors=True)
                os.replace(staging, synthetic_dir)  # fails when another process has just put its copy in place
            except OSError:
                if not (synthetic_dir / ORACLE_FILE).exists():
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return synthetic_dir / TRANSACTIONS_FILE, synthetic_dir / TRAIN_LABELS_FILE, synthetic_dir


def validation_size(num_customers: int, fraction: float, minimum: int) -> int:
    """Customers of the validation split: `fraction` of `num_customers`, at least `minimum`, at most a quarter."""
    return min(max(round(fraction * num_customers), minimum), int(MAX_VALIDATION_SHARE * num_customers))


def new_config(model_args: ModelArguments, vocabulary: EventVocabulary | None = None) -> TxFormerConfig:
    """A fresh config from the model flags: the vocabulary's event schema (when given), the attention kind, two labels
    and the `--config_overrides`, each checked against the field's type."""
    schema = {}
    if vocabulary is not None:
        schema = dict(
            categorical_fields=list(vocabulary.categorical_fields),
            categorical_vocab_sizes=list(vocabulary.vocab_sizes),
            numeric_fields=list(vocabulary.numeric_fields),
        )
    config = TxFormerConfig(**schema, attention_type=model_args.attention_type, num_labels=2)
    if model_args.config_overrides:
        config.update(parse_config_overrides(model_args.config_overrides, config))
        config.validate_architecture()
        config.validate_pretraining()
    return config


def check_model_arguments(model_args: ModelArguments) -> EventVocabulary | None:
    """Checks the model flags before any data is read: the config of a new model (attention kind and
    `--config_overrides`), or a folder (or Hub repository) to start from that holds a whole txformer model, which the
    flags do not contradict, and its vocabulary (of its processor, or an older `event_vocabulary.json`), which the
    model's embeddings index codes by and which this function returns (None for a new model)."""
    if model_args.model_name_or_path is None:
        new_config(model_args)
        return None
    folder = model_args.model_name_or_path
    if model_args.config_overrides:
        raise ValueError(
            f"--config_overrides sets up a new model; --model_name_or_path {folder} keeps its own config: drop one."
        )
    config = load_txformer_config(folder)
    if model_args.attention_type not in (None, config.attention_type):
        raise ValueError(
            f"--attention_type {model_args.attention_type}: --model_name_or_path {folder} is a "
            f"{config.attention_type!r} model, which keeps its attention kind; drop --attention_type."
        )
    if Path(folder).is_dir():
        vocabulary = EventVocabulary.from_pretrained(folder)
    else:
        vocabulary = EventVocabulary.from_processor(load_processor(folder))
    check_processor_matches(vocabulary, config, folder)
    return vocabulary


def build_model(model_args: ModelArguments, vocabulary: EventVocabulary) -> TxFormerForSequenceClassification:
    """A fresh model whose event schema is the vocabulary's, or a trained or pretrained one to fine-tune (a
    pretraining folder gets a newly initialised classifier head), its encoder frozen with `--freeze_encoder`."""
    if model_args.model_name_or_path is not None:
        model = TxFormerForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=2,
            attn_implementation=model_args.attn_implementation,
            use_safetensors=True,
        )
        model.base_model.requires_grad_(not model_args.freeze_encoder)
        return model
    config = new_config(model_args, vocabulary)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=model_args.attn_implementation)


def checkpoint_defect(folder: Path) -> str | None:
    """What keeps `folder` from being a complete checkpoint (None when nothing does): its last file,
    trainer_state.json, does not read back as JSON, or one of its weights, optimizer, scheduler or RNG files is cut
    short (a run killed while saving, a full disk, an interrupted copy)."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE_NAME}"
    for path, defect in incomplete_files(folder).items():
        return f"{path.name} is incomplete: {defect}"
    return None


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether the Trainer finished writing `folder` and every file it wrote is whole (`checkpoint_defect`)."""
    return checkpoint_defect(folder) is None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` folder of `output_dir`, None if it has none."""
    folders = [path for path in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_PATTERN.match(path.name)]
    folders.sort(key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)), reverse=True)
    return next((folder for folder in folders if is_complete_checkpoint(folder)), None)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from. `last` (or `true`) is the newest complete checkpoint of `output_dir`: a newer
    incomplete one is skipped with a warning naming what is wrong, so a run killed while saving resumes from the
    checkpoint before; a given folder must be complete."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() in ("last", "true"):
        folders = [path for path in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_PATTERN.match(path.name)]
        folders.sort(key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)), reverse=True)
        for folder in folders:
            defect = checkpoint_defect(folder)
            if defect is None:
                return str(folder)
            logger.warning("Skipping the incomplete checkpoint %s (%s).", folder, defect)
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: {output_dir} has no complete checkpoint."
        )
    defect = checkpoint_defect(Path(resume_from_checkpoint))
    if defect is not None:
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete checkpoint ({defect}; a run killed while saving leaves such "
            "a folder): pass an earlier checkpoint, or `last` for the newest complete one."
        )
    return resume_from_checkpoint


def check_output_dir_is_free(output_dir: str | os.PathLike) -> None:
    """Refuses an output folder that holds files, so that a new run never silently overwrites another run's model,
    metrics and profile."""
    folder = Path(output_dir)
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(
            f"--output_dir {folder} already holds files of another run: pass --overwrite_output_dir to replace them, "
            "--resume_from_checkpoint last to continue that run, or another --output_dir."
        )


def check_output_dir(training_args: TxFormerTrainingArguments) -> str | None:
    """Checks `--output_dir` before any data is read and returns the checkpoint to resume from: a folder that can be
    written, and that holds no other run's files unless resuming (`--resume_from_checkpoint`) or replacing them
    (`--overwrite_output_dir`)."""
    check_writable_folder(training_args.output_dir, "--output_dir")
    if continues_search_only(training_args):
        return None
    resume_from_checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume_from_checkpoint is None and not training_args.overwrite_output_dir:
        check_output_dir_is_free(training_args.output_dir)
    return resume_from_checkpoint


def continues_search_only(training_args: TxFormerTrainingArguments) -> bool:
    """Whether `--resume_from_checkpoint last` continues a run that stopped in its hyperparameter search, or after it
    but before the final run's first checkpoint: the search (or its result) is taken up and the final run starts."""
    resume = training_args.resume_from_checkpoint
    return (
        bool(training_args.hp_search_trials)
        and resume is not None
        and resume.lower() in ("last", "true")
        and last_complete_checkpoint(training_args.output_dir) is None
        and search_started(training_args.output_dir)
    )


def check_checkpoint_matches(checkpoint: str | os.PathLike, config: TxFormerConfig) -> None:
    """Refuses to resume from a checkpoint whose model differs from the one the flags build (kind, sizes, schema)."""
    saved = TxFormerConfig.from_pretrained(checkpoint).to_dict()
    built = config.to_dict()
    differences = sorted(
        key
        for key in saved.keys() | built.keys()
        if key not in RESUME_IGNORED_KEYS and saved.get(key) != built.get(key)
    )
    if differences:
        shown = ", ".join(f"{key}: {saved.get(key)!r} there, {built.get(key)!r} here" for key in differences[:5])
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds another model ({shown}): resume with the flags of that run, "
            "or start a new run in another --output_dir."
        )


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TxFormerTrainingArguments) -> dict:
    """Trains within the step budget (early stopping and the best checkpoint on the validation split), evaluates on
    the held-out split and writes the model, vocabulary and metrics to `output_dir`."""
    if training_args.evaluates and data_args.validation_fraction == 0:
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy} evaluates on the validation split, but "
            "--validation_fraction is 0: give a share of the training customers, or pass --eval_strategy no."
        )
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError(
            "--streaming trains from an endless stream, which has no epochs to count: give --max_steps (the optimizer "
            "steps of the run)."
        )
    if data_args.streaming and training_args.max_tokens_per_batch is not None:
        raise ValueError(
            "--max_tokens_per_batch draws batches from the whole dataset and --streaming reads it as a stream: pass "
            "one (with --streaming, --group_by_length groups histories of similar length within the stream's buffer)."
        )
    if model_args.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ValueError(
            "--attn_implementation flex_attention trains on CUDA only (torch has no CPU backward for it): pass sdpa "
            "or eager here; a model trained elsewhere with flex attention still scores on the CPU."
        )
    pretrained_vocabulary = check_model_arguments(model_args)
    resume_from_checkpoint = check_output_dir(training_args)
    set_seed(training_args.seed)
    data = prepare_datasets(data_args, training_args, pretrained_vocabulary)
    recipe = choose_recipe(training_args.recipe, data["train"][training_args.length_column_name])
    use_recipe(recipe, model_args, data_args, training_args)
    collator = TransactionCollator(
        categorical_fields=list(data["vocabulary"].categorical_fields),
        numeric_fields=list(data["vocabulary"].numeric_fields),
        max_length=data_args.max_length,
    )
    # What turns raw transactions into model inputs: saved (and pushed) with every checkpoint and the final folder.
    processor = data["vocabulary"].to_processor(
        max_length=data_args.max_length, label_prior=float(np.mean(data["train"]["labels"]))
    )
    data_seed = training_args.seed if training_args.data_seed is None else training_args.data_seed
    batch_sampler = None
    if training_args.max_tokens_per_batch is not None:
        batch_sampler = TokenBudgetBatchSampler(
            data["train"][training_args.length_column_name],
            max_tokens=training_args.max_tokens_per_batch,
            seed=data_seed,
            max_length=data_args.train_window_length,
        )
        num_batches, drop_last = len(batch_sampler), False
    else:
        drop_last = training_args.dataloader_drop_last
        num_batches = len(data["train"]) / training_args.train_batch_size
        num_batches = math.floor(num_batches) if drop_last else math.ceil(num_batches)
    training_args.max_steps = training_budget(
        training_args,
        steps_per_epoch(
            num_batches, training_args.world_size, training_args.gradient_accumulation_steps, drop_last=drop_last
        ),
    )
    callbacks = [AttentionStepCallback(), PushCodeFilesCallback()]
    if training_args.evaluates and training_args.early_stopping_patience > 0:
        callbacks.append(
            BudgetEarlyStoppingCallback(
                training_args.early_stopping_patience, start=training_args.early_stopping_start
            )
        )
    window = None
    if data_args.train_window_min_share > 0 or data_args.train_window_length != data_args.max_length:
        # Without random windows, a shorter training length still cuts each history to one window of that length.
        window = RandomWindow(
            max_length=data_args.train_window_length, min_share=data_args.train_window_min_share or 1.0, seed=data_seed
        )
    if data_args.streaming:
        train_dataset = training_stream(data["train"], training_args, data_seed, window)
    elif window is not None:
        train_dataset = data["train"].with_transform(window)
        callbacks.append(RandomWindowEpochCallback(window))
    else:
        train_dataset = data["train"]
    trainer_inputs = dict(
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset={VALIDATION_DATASET: data["validation"]} if training_args.evaluates else None,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=compute_metrics,
        train_batch_sampler=batch_sampler,
        readout_center_data=data["train"],
        max_length=data_args.max_length,
    )
    search = None
    if training_args.hp_search_trials:
        search = searched_hyperparameters(
            model_args, data["vocabulary"], trainer_inputs, callbacks, resume_from_checkpoint
        )
        search.apply(training_args)
        model_args = with_config_fields(model_args, search.config_fields)

    def model_init() -> TxFormerForSequenceClassification:
        model = build_model(model_args, data["vocabulary"])
        model.config.custom_pipelines = custom_pipelines()
        return model

    model = model_init()
    if resume_from_checkpoint is not None:
        check_checkpoint_matches(resume_from_checkpoint, model.config)
    # After a search, the run builds its model as the trials did (the `Trainer` seeds, then calls `model_init`), so
    # it repeats the best trial.
    trainer = TxFormerTrainer(
        model=None if search else model,
        model_init=model_init if search else None,
        callbacks=callbacks,
        **trainer_inputs,
    )
    add_profiling_callback(trainer)
    train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    # The evaluations below do not steer training.
    trainer.remove_callback(BudgetEarlyStoppingCallback)
    eval_metrics, eval_probabilities = trainer.evaluate_with_predictions(data["eval"])
    metrics = {
        **train_result.metrics,
        "train_steps": trainer.state.global_step,
        "train_max_steps": training_args.max_steps,
        **eval_metrics,
        "train_samples": len(data["train"]),
        "eval_samples": len(data["eval"]),
    }
    if data["validation"] is not None:
        metrics.update(trainer.evaluate(data["validation"], metric_key_prefix=VALIDATION_DATASET))
        metrics[f"{VALIDATION_DATASET}_samples"] = len(data["validation"])
    if trainer.state.best_global_step is not None:
        metrics["best_global_step"] = trainer.state.best_global_step
    if data["synthetic_dir"] is not None:
        eval_ids = np.asarray(data["eval"]["customer_id"])
        windows = [
            (None, "all"),
            *((n, f"last_{n}") for n in ORACLE_WINDOWS),
            (data_args.max_length, "last_max_length"),
        ]
        for window, name in windows:
            metrics[f"oracle_auroc_{name}"] = oracle_auroc(data["synthetic_dir"], eval_ids, last_n=window)
    output_dir = Path(training_args.output_dir)
    # On every process: under FSDP and DeepSpeed ZeRO-3 gathering the weights is collective; only the main one writes.
    trainer.save_model(output_dir)
    trainer.save_state()  # trainer_state.json: the loss and validation curves of the run
    if trainer.is_world_process_zero():
        atomic_write_json(output_dir / RESULTS_FILE, metrics)
        write_evaluated_predictions(
            output_dir / EVAL_PREDICTIONS_FILE, data["eval"]["customer_id"], data["eval"]["labels"], eval_probabilities
        )
        atomic_write_json(
            output_dir / TRAINING_RUN_FILE,
            {
                "recipe": recipe.name,
                "hp_search": None if search is None else asdict(search),
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


def searched_hyperparameters(
    model_args: ModelArguments,
    vocabulary: EventVocabulary,
    trainer_inputs: dict,
    callbacks: list,
    resume_from_checkpoint: str | None,
) -> SearchResult:
    """The best trial of a search (`--hp_search_trials`) over the run's data; a resumed run takes the result its
    first call saved instead of searching again."""
    training_args = trainer_inputs["args"]
    resumes = training_args.resume_from_checkpoint is not None
    search = SearchResult.load(training_args.output_dir) if resumes else None
    if search is not None:
        return search
    if resume_from_checkpoint is not None:
        raise ValueError(
            f"--hp_search_trials: the run of {training_args.output_dir} being resumed did not search (it has no "
            "hp_search/best.json); resume it with the flags it was started with."
        )
    if training_args.world_size > 1:
        raise ValueError(
            "--hp_search_trials searches in one process: search with python (the same flags), copy its "
            f"hp_search/best.json into {training_args.output_dir}/hp_search/, and launch with "
            "--resume_from_checkpoint last."
        )
    return search_hyperparameters(
        TxFormerTrainer,
        lambda config_fields: build_model(with_config_fields(model_args, config_fields), vocabulary),
        trainer_inputs,
        callbacks,
        training_args.hp_search_trials,
        searches_dropout=model_args.model_name_or_path is None,
        resume=resumes,
    )


def with_config_fields(model_args: ModelArguments, config_fields: dict[str, float]) -> ModelArguments:
    """`model_args` whose `--config_overrides` also set `config_fields` (which win)."""
    if not config_fields:
        return model_args
    texts = [model_args.config_overrides, ",".join(f"{name}={value}" for name, value in config_fields.items())]
    return replace(model_args, config_overrides=merge_config_overrides(*(text for text in texts if text)))


def use_recipe(
    recipe: Recipe, model_args: ModelArguments, data_args: DataArguments, training_args: TxFormerTrainingArguments
) -> None:
    """Sets the flags left to the recipe to `recipe`'s values, and adds its config overrides to a new model's; a
    trained or pretrained encoder is fine-tuned at `FINE_TUNING_LEARNING_RATE_SCALE` of the recipe's learning rate."""
    data_args.use_recipe(recipe)
    fine_tunes_encoder = model_args.model_name_or_path is not None and not model_args.freeze_encoder
    training_args.use_recipe(recipe, FINE_TUNING_LEARNING_RATE_SCALE if fine_tunes_encoder else 1.0)
    if model_args.model_name_or_path is None:
        model_args.config_overrides = recipe_overrides(recipe, model_args.config_overrides)


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
    configure_logging(training_args)
    metrics = train(model_args, data_args, training_args)
    if training_args.should_log:
        print(f"\nHeld-out results ({training_args.output_dir}):\n{format_result(metrics)}")
        best = metrics.get("best_global_step")
        print(
            f"{metrics['train_steps']} optimizer steps of a budget of {metrics['train_max_steps']}"
            + ("" if best is None else f"; best validation AUROC at step {best}, restored")
            + f"; {metrics['train_runtime']:.0f} s of training."
        )
        print(json.dumps({key: value for key, value in metrics.items() if "auroc" in key}, indent=2))
    return metrics


__all__ = [
    "DataArguments",
    "ModelArguments",
    "TxFormerTrainer",
    "TxFormerTrainingArguments",
    "main",
    "steps_per_epoch",
    "train",
    "training_budget",
]
