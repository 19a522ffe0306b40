"""Training-time augmentation of customer histories (a `datasets` transform, applied anew each time a history is
read, so that every epoch sees other views of the same customers)."""

import math
from dataclasses import dataclass

import numpy as np
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .reader import EVENT_COLUMNS


@dataclass
class RandomWindow:
    """Cuts each history to a random contiguous window of its events: the window holds between `min_share` and all
    of the events the model would keep (`max_length`, None = all) and starts anywhere in the history.

    Without it, a model sees the same most recent `max_length` events of each training customer at every epoch and
    can learn the customers by heart instead of the signal; random windows (as pytorch-lifestream's supervised runs
    take random slices) show it many views of each customer, with the label unchanged. The window of a customer is a
    function of `(seed, epoch, customer_id)`: the same whatever the batch, the process or the prefetching, so a run
    resumed from a checkpoint draws what the uninterrupted run draws. Set `epoch` at the start of each epoch
    ([`RandomWindowEpochCallback`]). Use it on training data only: evaluation reads the most recent events, as at
    inference.
    """

    max_length: int | None = None
    min_share: float = 0.5
    seed: int = 0
    epoch: int = 0

    def __post_init__(self):
        if not 0 < self.min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {self.min_share}.")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets` transform: a batch of columns (lists per customer) in, the same columns with windows out."""
        if "event_time" not in batch:  # a single non-event column is read (e.g. the lengths, for length grouping)
            return batch
        columns = [name for name in EVENT_COLUMNS if name in batch]
        for row, times in enumerate(batch["event_time"]):
            generator = np.random.default_rng([self.seed, self.epoch, int(batch["customer_id"][row])])
            num_events = len(times)
            kept = num_events if self.max_length is None else min(num_events, self.max_length)
            length = int(generator.integers(max(1, math.ceil(self.min_share * kept)), kept + 1))
            start = int(generator.integers(0, num_events - length + 1))
            for name in columns:
                batch[name][row] = batch[name][row][start : start + length]
            if "num_events" in batch:
                batch["num_events"][row] = length
        return batch


class RandomWindowEpochCallback(TrainerCallback):
    """Tells a [`RandomWindow`] which epoch the `Trainer` starts (also when it resumes in the middle of one)."""

    def __init__(self, window: RandomWindow):
        self.window = window

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        # `state.epoch` is the number of epochs done (fractional in a resumed epoch).
        self.window.epoch = math.floor((state.epoch or 0.0) + 1e-6)
