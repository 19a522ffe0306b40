"""Scoring raw transactions with a trained model folder: `customer_id,probability` (the Kaggle format)."""

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, HfArgumentParser

from .cli import configure_logging
from .data import EventVocabulary, TransactionCollator, build_customer_dataset, customer_table, read_customer_ids
from .data.reader import list_offsets_and_values
from .data.vocabulary import UNKNOWN_INDEX, VOCABULARY_FILE
from .io_utils import atomic_write, atomic_write_json
from .metrics import positive_class_probability


logger = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class PredictionArguments:
    """What to score, with which model, and where to write the probabilities."""

    model_dir: str = field(metadata={"help": "A trained output folder (model, vocabulary, preprocessing.json)."})
    transactions: str = field(metadata={"help": "transactions.csv in the real format."})
    output_file: str = field(default="predictions.csv", metadata={"help": "Where to write customer_id,probability."})
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


def read_preprocessing(model_dir: str | Path) -> dict:
    """The preprocessing settings saved at training time (`max_length`, `label_prior`)."""
    path = Path(model_dir) / PREPROCESSING_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {model_dir} is not a complete txformer training output.")
    return json.loads(path.read_text())


def check_vocabulary_matches(vocabulary: EventVocabulary, config, model_dir: str | Path) -> None:
    """The vocabulary must be the one the model was trained with: same fields, same sizes (a folder mixing files of
    two runs would otherwise embed codes with another run's indices, or fail with an index error)."""
    expected = [list(config.categorical_fields), list(config.categorical_vocab_sizes), list(config.numeric_fields)]
    found = [vocabulary.categorical_fields, vocabulary.vocab_sizes, vocabulary.numeric_fields]
    if found != expected:
        raise ValueError(
            f"{Path(model_dir) / VOCABULARY_FILE} (fields, sizes, numeric fields {found}) does not match the model's "
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


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, dataset, collator: TransactionCollator, batch_size: int, device: torch.device
) -> np.ndarray:
    """Probability of class 1 for every row of an encoded dataset, in its order."""
    probabilities = np.empty(len(dataset), dtype=np.float64)
    model.eval().to(device)
    for rows, batch in length_sorted_batches(dataset, collator, batch_size, device, desc="scoring"):
        probabilities[rows] = positive_class_probability(model(**batch).logits.float().cpu().numpy())
    return probabilities


def predict(args: PredictionArguments) -> Path:
    """Scores every customer of `args.transactions` (or exactly `args.customer_ids`) and writes the CSV."""
    preprocessing = read_preprocessing(args.model_dir)
    vocabulary = EventVocabulary.from_pretrained(args.model_dir)
    wanted_ids = None if args.customer_ids is None else read_customer_ids(args.customer_ids)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, trust_remote_code=args.trust_remote_code, use_safetensors=True
    )
    check_vocabulary_matches(vocabulary, model.config, args.model_dir)
    max_length = preprocessing.get("max_length") if args.max_length is None else (args.max_length or None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    customers = vocabulary.encode(build_customer_dataset(args.transactions, customer_ids=wanted_ids))
    unknown_shares = unknown_code_shares(vocabulary, customers)
    logger.info("Share of events with codes unseen in training: %s", unknown_shares)
    for name, share in unknown_shares.items():
        if share == 1.0:
            logger.warning(
                "No %s code of %s is in the vocabulary: was it coded as in training?", name, args.transactions
            )
    collator = TransactionCollator(
        categorical_fields=list(vocabulary.categorical_fields),
        numeric_fields=list(vocabulary.numeric_fields),
        max_length=max_length,
    )
    scored_ids = np.asarray(customers["customer_id"], dtype=np.int64)
    probabilities = predict_probabilities(model, customers, collator, args.batch_size, device)
    scores = dict(zip(scored_ids.tolist(), probabilities, strict=True))

    wanted_ids = scored_ids if wanted_ids is None else wanted_ids
    default_probability = float(preprocessing["label_prior"])
    without_history = [int(customer) for customer in wanted_ids if int(customer) not in scores]
    if without_history:
        logger.warning(
            "%d customers have no transactions; they get the training prior %.4f (listed in the report).",
            len(without_history),
            default_probability,
        )

    def write_rows(file) -> None:
        writer = csv.writer(file)
        writer.writerow(["customer_id", "probability"])
        for customer in wanted_ids.tolist():
            writer.writerow([customer, f"{scores.get(customer, default_probability):.6f}"])

    output_file = atomic_write(args.output_file, write_rows)
    atomic_write_json(
        output_file.with_name(output_file.name + ".report.json"),
        {
            "model_dir": str(args.model_dir),
            "num_scored": len(wanted_ids) - len(without_history),
            "max_length": max_length,
            "default_probability": default_probability,
            "customers_without_transactions": without_history,
            "unknown_code_share": unknown_shares,
        },
    )
    logger.info("Wrote %d predictions to %s", len(wanted_ids), output_file)
    return output_file


def main(argv: list[str] | None = None) -> Path:
    """Command line: `python scripts/predict.py --model_dir DIR --transactions FILE [--output_file F]`."""
    configure_logging()
    (args,) = HfArgumentParser(PredictionArguments).parse_args_into_dataclasses(args=argv)
    return predict(args)
