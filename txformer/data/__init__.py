"""Data pipeline: real-format transaction files to per-customer datasets (in memory, or prepared once in shards and
cached for data larger than memory), the event vocabulary, the batch collator, the stratified split and synthetic data
with a known Bayes-optimal posterior."""

from .collator import TransactionCollator
from .prepare import (
    PreparedData,
    prepare_customers,
    prepare_encoded_customers,
    prepare_training_data,
    streaming_dataset,
    transaction_files,
)
from .reader import (
    TransactionDataError,
    build_customer_dataset,
    customer_table,
    read_customer_ids,
    read_labels,
    read_transactions,
)
from .split import split_for_evaluation, stratified_split
from .synthetic import (
    SyntheticConfig,
    SyntheticDataInfo,
    SyntheticOracle,
    generate_synthetic_data,
    mean_feature_baseline_auroc,
    oracle_auroc,
)
from .vocabulary import VOCABULARY_FILE, EventVocabulary, FieldVocabulary


__all__ = [
    "VOCABULARY_FILE",
    "EventVocabulary",
    "FieldVocabulary",
    "PreparedData",
    "SyntheticConfig",
    "SyntheticDataInfo",
    "SyntheticOracle",
    "TransactionCollator",
    "TransactionDataError",
    "build_customer_dataset",
    "customer_table",
    "generate_synthetic_data",
    "mean_feature_baseline_auroc",
    "oracle_auroc",
    "prepare_customers",
    "prepare_encoded_customers",
    "prepare_training_data",
    "read_customer_ids",
    "read_labels",
    "read_transactions",
    "split_for_evaluation",
    "stratified_split",
    "streaming_dataset",
    "transaction_files",
]
