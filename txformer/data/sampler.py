"""Length-bucketed training batches that fill a token budget: many short histories per batch, few long ones."""

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


# Bucket ceilings round a length up by less than 2**-BUCKET_PRECISION_BITS of itself (1/16: at most ~6% padding).
BUCKET_PRECISION_BITS = 4


def bucket_ceilings(lengths: np.ndarray) -> np.ndarray:
    """The padded length of each length's bucket: the length rounded up to a multiple of
    2**(floor(log2(length)) - BUCKET_PRECISION_BITS) (at least 1), so every bucket spans a few percent of length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"Every history needs at least one event; got a length of {lengths.min()}.")
    exponent = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    quantum = np.left_shift(1, np.maximum(exponent - BUCKET_PRECISION_BITS, 0))
    return -(-lengths // quantum) * quantum


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose size times padded length stays within `max_tokens`.

    `lengths` are the lengths the collator pads to (after truncation to `max_length`). Histories are grouped into
    buckets of nearly equal length (`bucket_ceilings`); each epoch shuffles the histories within a bucket, packs the
    bucket-sorted histories greedily (a batch takes histories while `size x bucket ceiling <= max_tokens`) and
    shuffles the order of the batches, seeded by `seed` and the epoch (`set_epoch`). The batch sizes depend only on
    the lengths, so every epoch has the same number of batches and every history is in exactly one of them. The
    collator pads a batch to its longest history, which is at most the batch's largest ceiling, so a batch holds at
    most `max_tokens` padded events, except a single history longer than `max_tokens`, which is a batch of its own.

    The sampler is not rank-aware: under `accelerate launch`, `accelerator.prepare` wraps it in a
    `BatchSamplerShard` that deals the batches round-robin to the processes and, at the end of an epoch, repeats the
    epoch's first batches so that every process takes the same number of steps.
    """

    def __init__(
        self, lengths: Sequence[int] | np.ndarray, max_tokens: int, seed: int = 0, max_length: int | None = None
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            raise ValueError("Cannot batch an empty dataset.")
        if max_length is not None:
            lengths = np.minimum(lengths, max_length)
        self.ceilings = bucket_ceilings(lengths)
        if max_length is not None:
            self.ceilings = np.minimum(self.ceilings, max_length)
        self.max_tokens = int(max_tokens)
        self.seed = seed
        self.epoch = 0
        self.batch_sizes = self._pack(np.sort(self.ceilings))

    def _pack(self, sorted_ceilings: np.ndarray) -> list[int]:
        """Sizes of the greedy batches over ascending ceilings: a batch grows while its size times its longest
        ceiling fits the budget."""
        sizes, size = [], 0
        for ceiling in sorted_ceilings.tolist():
            if size and (size + 1) * ceiling > self.max_tokens:
                sizes.append(size)
                size = 0
            size += 1
        if size:
            sizes.append(size)
        return sizes

    def set_epoch(self, epoch: int) -> None:
        """Draws the next epoch's batches (the `Trainer` calls this at the start of every epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        # Sorted by ceiling, in a random order within each bucket.
        order = np.lexsort((rng.random(len(self.ceilings)), self.ceilings))
        batches = np.split(order, np.cumsum(self.batch_sizes)[:-1])
        for batch in rng.permutation(len(batches)):
            yield batches[batch].tolist()


__all__ = ["TokenBudgetBatchSampler", "bucket_ceilings"]
