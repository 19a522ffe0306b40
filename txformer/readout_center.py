"""The embedding readout's centre, fitted exactly: the mean event embedding of training customers against the log of
their length, as the model reads them at evaluation (`update_bn` for the readout of `embedding_sum_readout=True`)."""

from collections.abc import Callable

import datasets
import numpy as np
import torch
from accelerate import Accelerator

from .data import TokenBudgetBatchSampler
from .modeling_txformer import TxFormerPreTrainedModel


# Padded events per batch of the estimate: the embeddings alone, without the layers, so a large batch fits anywhere.
CENTER_TOKENS_PER_BATCH = 2**17


def center_customers(num_customers: int, max_customers: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of the customers the centre is estimated from: all of them, or a seeded sample of
    `max_customers`."""
    if max_customers is None or num_customers <= max_customers:
        return np.arange(num_customers)
    return np.sort(np.random.default_rng(seed).choice(num_customers, size=max_customers, replace=False))


@torch.no_grad()
def update_readout_center(
    model: TxFormerPreTrainedModel,
    dataset: datasets.Dataset,
    collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    accelerator: Accelerator,
    length_column: str,
    max_length: int | None = None,
    max_customers: int | None = None,
) -> None:
    """Sets the embedding readout's centre of `model` (unwrapped) to its fit over the histories of `dataset` (or a
    sample of `max_customers` of them), as `collator` pads them (the most recent `max_length` events): the line in
    `log(n)` through the histories' mean event embeddings, weighted by their `n` events (`fit_center`). Under a
    distributed launch each process reads its share of the batches and the sums are added up, so every process ends
    with the same centre. Does nothing for a model without the readout."""
    readout = model.base_model.embedding_readout
    if readout is None:
        return
    subset = dataset.select(center_customers(len(dataset), max_customers))
    sampler = TokenBudgetBatchSampler(subset[length_column], max_tokens=CENTER_TOKENS_PER_BATCH, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        gram, moments = center_statistics(model, subset, sampler, collator, accelerator)
    finally:
        model.train(was_training)
    readout.set_center(*fit_center(gram, moments))


def center_statistics(
    model: TxFormerPreTrainedModel,
    dataset: datasets.Dataset,
    sampler: TokenBudgetBatchSampler,
    collator: Callable[[list[dict]], dict[str, torch.Tensor]],
    accelerator: Accelerator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations of the centre's fit over `dataset`, summed over the processes: `Σ n x xᵀ` `[2, 2]` and
    `Σ x Sᵀ` `[2, hidden]` with x = (1, log n). Computed under the accelerator's autocast, as evaluation is."""
    readout = model.base_model.embedding_readout
    device = readout.running_mean.device
    gram = torch.zeros(2, 2, dtype=torch.float64, device=device)
    moments = torch.zeros(2, readout.running_mean.numel(), dtype=torch.float64, device=device)
    for batch_index, indices in enumerate(sampler):
        if batch_index % accelerator.num_processes != accelerator.process_index:
            continue
        batch = collator([dataset[index] for index in indices])
        with accelerator.autocast():
            sums, counts = model.base_model.embedding_sums(
                batch["input_ids"].to(device),
                batch["numeric_values"].to(device),
                batch["event_time"].to(device),
                batch["attention_mask"].to(device),
            )
        read = counts > 0
        counts = counts[read].double()
        features = torch.stack([torch.ones_like(counts), counts.log()], dim=1)
        gram += features.T @ (counts[:, None] * features)
        moments += features.T @ sums[read].double()
    return accelerator.reduce(gram, reduction="sum"), accelerator.reduce(moments, reduction="sum")


def fit_center(gram: torch.Tensor, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log_slope) `[hidden]` each, in float32, from the normal equations `gram` `[2, 2]` and `moments`
    `[2, hidden]` of the weighted least squares over (1, log n). Histories that all have the same length (e.g. all
    cut to `max_length`) give no slope: the mean is then their event-weighted mean embedding."""
    num_events = gram[0, 0]
    if num_events <= 0:
        raise ValueError("the readout's centre needs at least one event: the dataset has no history.")
    mean_log = gram[0, 1] / num_events
    log_variance = gram[1, 1] / num_events - mean_log**2
    if log_variance <= 1e-6:
        return (moments[0] / num_events).float(), torch.zeros_like(moments[0], dtype=torch.float32)
    solution = torch.linalg.solve(gram, moments)
    return solution[0].float(), solution[1].float()
