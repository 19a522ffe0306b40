"""Per-customer embeddings of a trained or pretrained folder, written to Parquet (`customer_id`, `emb_0..emb_{d-1}`)
for downstream models such as LightGBM."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModel, AutoModelForPreTraining, HfArgumentParser

from .cli import configure_logging
from .data import EventVocabulary, TransactionCollator, prepare_encoded_customers, read_customer_ids
from .data.prepare import DEFAULT_CACHE
from .io_utils import atomic_write, check_writable_file
from .prediction import (
    check_processor_matches,
    check_scoring_options,
    length_sorted_batches,
    load_processor,
    load_txformer_config,
    scoring_device,
)


logger = logging.getLogger(__name__)

EMBEDDING_KINDS = ("pooled", "contrastive")
CONTRASTIVE_ARCHITECTURE = "TxFormerForContrastivePretraining"


@dataclass
class EmbeddingArguments:
    """Which folder embeds which transactions, and where the Parquet file goes."""

    model_dir: str = field(
        metadata={
            "help": "A trained or pretrained folder (model and processor, or vocabulary and preprocessing.json)."
        }
    )
    transactions: str = field(
        metadata={
            "help": "Transactions in the real format: a CSV (plain, .gz, .bz2) or Parquet file, or a glob pattern of "
            "several (quoted)."
        }
    )
    output_file: str = field(default="embeddings.parquet", metadata={"help": "Where to write the Parquet file."})
    embedding: str = field(
        default="pooled",
        metadata={
            "help": "pooled: the encoder's pooled output (any folder); contrastive: the normalised embedding of a "
            "contrastive pretraining folder.",
            "choices": list(EMBEDDING_KINDS),
        },
    )
    customer_ids: str | None = field(
        default=None, metadata={"help": "CSV with a customer_id column: embed only these customers."}
    )
    batch_size: int = field(default=64, metadata={"help": "Histories per forward pass."})
    max_length: int | None = field(
        default=None, metadata={"help": "Most recent events kept; default: the folder's setting; 0 = whole histories."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, mps; default: cuda when available."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Load a folder whose package is not installed."})
    data_cache_dir: str = field(
        default=str(DEFAULT_CACHE),
        metadata={"help": "Cache of the encoded transactions (default: env TXFORMER_CACHE or ~/.cache/txformer)."},
    )

    def __post_init__(self):
        if self.embedding not in EMBEDDING_KINDS:
            raise ValueError(f"Unknown embedding {self.embedding!r}; valid kinds: {list(EMBEDDING_KINDS)}.")
        check_scoring_options(self)


def load_embedding_model(args: EmbeddingArguments) -> torch.nn.Module:
    """The encoder (`pooled`) or the contrastive head (`contrastive`, refused for a folder without its weights)."""
    options = {"trust_remote_code": args.trust_remote_code, "use_safetensors": True}
    architectures = load_txformer_config(args.model_dir, trust_remote_code=args.trust_remote_code).architectures
    if args.embedding == "pooled":
        return AutoModel.from_pretrained(args.model_dir, **options)
    if CONTRASTIVE_ARCHITECTURE not in (architectures or []):
        raise ValueError(
            f"{args.model_dir} holds a {architectures} model, not {CONTRASTIVE_ARCHITECTURE}: its contrastive "
            "projection would be random. Use --embedding pooled."
        )
    return AutoModelForPreTraining.from_pretrained(args.model_dir, **options)


@torch.no_grad()
def compute_embeddings(
    model: torch.nn.Module,
    dataset,
    collator: TransactionCollator,
    batch_size: int,
    device: torch.device,
    contrastive: bool = False,
) -> np.ndarray:
    """`[customers, dim]` float32 embeddings of an encoded dataset, in its order: the encoder's pooled output, or
    the contrastive head's normalised embedding (`contrastive`)."""
    model.eval().to(device)
    embeddings = None
    for rows, batch in length_sorted_batches(dataset, collator, batch_size, device, desc="embedding"):
        if contrastive:
            vectors = model(**batch).embeddings
        else:
            vectors = model(**batch, output_last_hidden_state=False).pooler_output
        if embeddings is None:
            embeddings = np.empty((len(dataset), vectors.shape[1]), dtype=np.float32)
        embeddings[rows] = vectors.float().cpu().numpy()
    return embeddings


def embeddings_table(customer_ids: np.ndarray, embeddings: np.ndarray) -> pa.Table:
    """One row per customer: `customer_id` (int64) and float32 columns `emb_0..emb_{d-1}`."""
    columns = {"customer_id": pa.array(customer_ids, pa.int64())}
    columns.update({f"emb_{index}": pa.array(embeddings[:, index]) for index in range(embeddings.shape[1])})
    return pa.table(columns)


def embed(args: EmbeddingArguments) -> Path:
    """Embeds every customer of `args.transactions` (or only `args.customer_ids`) and writes the Parquet file."""
    wanted_ids = None if args.customer_ids is None else read_customer_ids(args.customer_ids)
    check_writable_file(args.output_file, "--output_file")
    model = load_embedding_model(args)
    processor = load_processor(args.model_dir)
    vocabulary = EventVocabulary.from_processor(processor)
    check_processor_matches(processor, model.config, args.model_dir)
    max_length = processor.max_length if args.max_length is None else (args.max_length or None)
    device = scoring_device(args.device)
    customers = prepare_encoded_customers(
        args.transactions, vocabulary, customer_ids=wanted_ids, cache_dir=args.data_cache_dir
    ).customers
    collator = TransactionCollator(
        categorical_fields=list(vocabulary.categorical_fields),
        numeric_fields=list(vocabulary.numeric_fields),
        max_length=max_length,
    )
    embeddings = compute_embeddings(
        model, customers, collator, args.batch_size, device, contrastive=args.embedding == "contrastive"
    )
    table = embeddings_table(np.asarray(customers["customer_id"], dtype=np.int64), embeddings)
    output_file = atomic_write(args.output_file, lambda file: pq.write_table(table, file), binary=True)
    logger.info("Wrote %d embeddings of size %d to %s", len(table), embeddings.shape[1], output_file)
    return output_file


def main(argv: list[str] | None = None) -> Path:
    """Command line: `python scripts/embed.py --model_dir DIR --transactions FILE [--output_file F.parquet]`."""
    configure_logging()
    (args,) = HfArgumentParser(EmbeddingArguments).parse_args_into_dataclasses(args=argv)
    return embed(args)


__all__ = ["EmbeddingArguments", "compute_embeddings", "embed", "embeddings_table", "main"]
