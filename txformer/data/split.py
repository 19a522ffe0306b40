"""Seeded, stratified train / held-out split of a customer dataset."""

import datasets
import numpy as np
from sklearn.model_selection import train_test_split


def stratified_split(
    dataset: datasets.Dataset, test_size: float | int, seed: int, label_column: str = "labels"
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) with the label proportions of `dataset` in both parts; the same seed gives the same split."""
    if label_column not in dataset.column_names:
        raise ValueError(f"The dataset has no {label_column!r} column to stratify on; it has {dataset.column_names}.")
    # Through arrow: a `datasets` column read row by row is slow for many customers.
    labels = np.asarray(dataset.with_format("arrow")[label_column].to_pylist(), dtype=object)
    unlabelled = np.flatnonzero(labels == None)  # noqa: E711 (element-wise comparison)
    if unlabelled.size:
        raise ValueError(
            f"{unlabelled.size} customers have no label (e.g. row {unlabelled[0]}); drop them before splitting."
        )
    classes, counts = np.unique(labels.astype(np.int64), return_counts=True)
    if classes.size < 2:
        raise ValueError(
            f"Only one class ({classes.tolist()}) among {len(labels)} customers: cannot train a classifier."
        )
    if counts.min() < 2:
        raise ValueError(f"Class {classes[counts.argmin()]} has a single customer: too few to split stratified.")
    try:
        train_rows, test_rows = train_test_split(
            np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels.astype(np.int64)
        )
    except ValueError as error:  # sklearn's message says which size does not fit
        raise ValueError(
            f"Cannot split {len(labels)} customers ({dict(zip(classes.tolist(), counts.tolist(), strict=True))} per "
            f"class) into stratified parts with test_size={test_size}: {error}"
        ) from None
    return dataset.select(np.sort(train_rows)), dataset.select(np.sort(test_rows))


def split_for_evaluation(
    customers: datasets.Dataset, eval_fraction: float, split_seed: int, max_train_customers: int | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held_out) of labelled customers as every trainer of the package makes it, so that the model and the
    baseline report on the same customers: `stratified_split(customers, eval_fraction, split_seed)`, the training part
    then subsampled to `max_train_customers` (seeded) when given."""
    train, held_out = stratified_split(customers, test_size=eval_fraction, seed=split_seed)
    if max_train_customers is not None and max_train_customers < len(train):
        train = train.shuffle(seed=split_seed).select(range(max_train_customers))
    return train, held_out
