"""Shared by the inference tests: tiny folders trained for two steps with the processor as the Trainer's
`processing_class`, and a reader of written predictions."""

import csv
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_config
from transformers import Trainer, TrainingArguments

from txformer import TxFormerForSequenceClassification
from txformer.data import EventVocabulary, TransactionCollator
from txformer.pipeline_txformer import custom_pipelines


def train_tiny_folder(
    folder: Path, attention_type: str, vocabulary: EventVocabulary, customers, max_length: int | None, **overrides
) -> Path:
    """Two optimizer steps of a tiny classifier on `customers` (a labelled customer dataset), saved by the Trainer
    with its processor, as training saves an output folder."""
    torch.manual_seed(0)
    config = tiny_config(
        attention_type,
        categorical_fields=list(vocabulary.categorical_fields),
        categorical_vocab_sizes=list(vocabulary.vocab_sizes),
        numeric_fields=list(vocabulary.numeric_fields),
        **overrides,
    )
    model = TxFormerForSequenceClassification(config)
    model.config.custom_pipelines = custom_pipelines()
    processor = vocabulary.to_processor(max_length=max_length, label_prior=float(np.mean(customers["labels"])))
    arguments = TrainingArguments(
        output_dir=str(folder),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=vocabulary.encode(customers),
        data_collator=TransactionCollator(processor.categorical_fields, processor.numeric_fields, max_length),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model(folder)
    return folder


def read_predictions(path: Path) -> dict[int, float]:
    """`customer_id,probability` rows of a predictions CSV."""
    with open(path, newline="") as file:
        return {int(row["customer_id"]): float(row["probability"]) for row in csv.DictReader(file)}
