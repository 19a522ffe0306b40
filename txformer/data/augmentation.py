"""Training-time augmentation of customer histories (a `datasets` transform, applied anew each time a history is
read, so that every epoch sees other views of the same customers)."""

import math
from dataclasses import dataclass

import numpy as np

from .reader import EVENT_COLUMNS


@dataclass
class RandomWindow:
    """Cuts each history to a random contiguous window of its events: the window holds between `min_share` and all
    of the events the model would keep (`max_length`, None = all) and starts anywhere in the history.

    Without it, a model sees the same most recent `max_length` events of each training customer at every epoch and
    can learn the customers by heart instead of the signal; random windows (as pytorch-lifestream's supervised runs
    take random slices) show it many views of each customer, with the label unchanged. Draws come from numpy's global
    generator, which the `Trainer` seeds and restores on resume. Use it on training data only: evaluation reads the
    most recent events, as at inference.
    """

    max_length: int | None = None
    min_share: float = 0.5

    def __post_init__(self):
        if not 0 < self.min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {self.min_share}.")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets` transform: a batch of columns (lists per customer) in, the same columns with windows out."""
        if "event_time" not in batch:  # a single non-event column is read (e.g. the lengths, for length grouping)
            return batch
        columns = [name for name in EVENT_COLUMNS if name in batch]
        for row, times in enumerate(batch["event_time"]):
            num_events = len(times)
            kept = num_events if self.max_length is None else min(num_events, self.max_length)
            length = np.random.randint(max(1, math.ceil(self.min_share * kept)), kept + 1)
            start = np.random.randint(0, num_events - length + 1)
            for name in columns:
                batch[name][row] = batch[name][row][start : start + length]
            if "num_events" in batch:
                batch["num_events"][row] = length
        return batch
