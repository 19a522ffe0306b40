"""Prepared customers as a stream: read shard by shard through a shuffle buffer, split across the ranks of a launch
(`datasets.distributed.split_dataset_by_node`) and grouped by length within a buffer; for training, endlessly, pass
after pass."""

import dataclasses
import itertools
from collections.abc import Iterator

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.distributed import split_dataset_by_node

from .augmentation import RandomWindow


class _LengthGroupedBuffers:
    """Reorders each buffer of customers so that every `batch_size` consecutive ones have similar lengths, batches
    in a random order (the last, partial batch last): `group_by_length` within a buffer. The order is drawn from the
    seed and the buffer's lengths alone, so a stream reads the same however often, and in whichever process, it is
    read."""

    def __init__(self, batch_size: int, seed: int, length_column: str):
        self.batch_size, self.seed, self.length_column = batch_size, seed, length_column

    def __call__(self, buffer: pa.Table) -> pa.Table:
        lengths = buffer.column(self.length_column).to_numpy()
        by_length = np.argsort(lengths, kind="stable")
        num_full = len(by_length) // self.batch_size
        batches = np.split(by_length, np.arange(1, num_full + 1) * self.batch_size)
        random = np.random.default_rng([self.seed, *lengths.tolist()])
        order = [*random.permutation(num_full), *range(num_full, len(batches))]
        return buffer.take(np.concatenate([batches[number] for number in order]))


def streaming_dataset(
    dataset: datasets.Dataset,
    batch_size: int,
    seed: int = 42,
    buffer_batches: int = 64,
    num_shards: int = 64,
    length_column: str | None = "num_events",
    rank: int | None = None,
    world_size: int | None = None,
) -> datasets.IterableDataset:
    """A prepared (memory-mapped) dataset as a stream: `num_shards` contiguous shards read in a seeded random order
    through a shuffle buffer of `buffer_batches * batch_size` customers, split across ranks by `split_dataset_by_node`
    when `rank` and `world_size` are given, then reordered buffer by buffer so that every `batch_size` consecutive
    customers have similar `length_column` values (the length grouping of `group_by_length`, within a buffer; None:
    no grouping). `set_epoch` on the stream draws another order."""
    buffer_size = buffer_batches * batch_size
    stream = dataset.to_iterable_dataset(num_shards=max(1, min(num_shards, len(dataset))))
    stream = stream.shuffle(seed=seed, buffer_size=buffer_size)
    if world_size is not None:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    if length_column is not None:
        grouping = _LengthGroupedBuffers(batch_size, seed, length_column)
        stream = stream.with_format("arrow").map(grouping, batched=True, batch_size=buffer_size).with_format(None)
    return stream


class EndlessStream(torch.utils.data.IterableDataset):
    """A stream read pass after pass for as long as it is read: pass `k` is `stream` at epoch `k` (another shard
    order and shuffle), its histories cut by `window` at epoch `k` when one is given (another view of each customer
    at each pass, as in epochs over a map-style dataset).

    Under a launch, each rank reads its own share of the customers (`streaming_dataset` with `rank` and `world_size`),
    and the shares need not hold the same number of batches: a rank that ran out while the others still step would
    leave them waiting for its gradients. Endless, every rank has a next batch, and training stops at `max_steps`.
    """

    def __init__(self, stream: datasets.IterableDataset, window: RandomWindow | None = None):
        super().__init__()
        self.stream, self.window = stream, window

    def __iter__(self) -> Iterator[dict]:
        for epoch in itertools.count():
            stream = self.stream
            if self.window is not None:
                stream = stream.map(dataclasses.replace(self.window, epoch=epoch), batched=True)
            stream.set_epoch(epoch)
            read = False
            for customer in stream:
                read = True
                yield customer
            if not read:  # nothing to read (e.g. a dataloader worker given no shard): not an endless wait
                return
