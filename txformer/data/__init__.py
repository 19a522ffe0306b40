"""Data pipeline: real-format transaction files to per-customer datasets (in memory, or prepared once in shards and
cached for data larger than memory), the event vocabulary, the batch collator, the stratified split, token-budget
batches, random training windows and synthetic data with a known Bayes-optimal posterior."""

from .augmentation import RandomWindow, RandomWindowEpochCallback
from .collator import TransactionCollator
from .prepare import (
    EncodedCustomers,
    PreparedData,
    prepare_customers,
    prepare_encoded_customers,
    prepare_training_data,
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
from .sampler import TokenBudgetBatchSampler
from .split import split_for_evaluation, stratified_split
from .streaming import EndlessStream, streaming_dataset
from .synthetic import (
    LONG_HISTORY_CONFIG,
    SYNTHETIC_FAMILIES,
    OrderSyntheticConfig,
    SyntheticConfig,
    SyntheticDataInfo,
    SyntheticOracle,
    aggregate_baseline_auroc,
    generate_synthetic_data,
    mean_feature_baseline_auroc,
    oracle_auroc,
)
from .vocabulary import VOCABULARY_FILE, EventVocabulary, FieldVocabulary


__all__ = [
    "LONG_HISTORY_CONFIG",
    "SYNTHETIC_FAMILIES",
    "VOCABULARY_FILE",
    "EncodedCustomers",
    "EndlessStream",
    "EventVocabulary",
    "RandomWindow",
    "RandomWindowEpochCallback",
    "FieldVocabulary",
    "OrderSyntheticConfig",
    "PreparedData",
    "SyntheticConfig",
    "SyntheticDataInfo",
    "SyntheticOracle",
    "TransactionCollator",
    "TokenBudgetBatchSampler",
    "TransactionDataError",
    "aggregate_baseline_auroc",
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
