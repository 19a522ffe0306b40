#!/usr/bin/env python
"""Online scoring: what an update (a customer's new transactions, scored from the saved state) costs against the
length of the history already read, next to rescoring the whole history; and how far the ∞-former's online
probabilities are from rescoring.

    python benchmarks/online.py                                    # costs, random weights (docs/inference.md)
    python benchmarks/online.py --model outputs/infinity           # + fidelity of a trained ∞-former folder

Times are medians of `torch.utils.benchmark.Timer.blocked_autorange`; one process, `--num_threads` threads.
"""

import json
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils import benchmark
from transformers import HfArgumentParser

from txformer import OnlineScorer, OnlineStates, TxFormerConfig, TxFormerForSequenceClassification
from txformer.data import EventVocabulary, build_customer_dataset, generate_synthetic_data
from txformer.data.synthetic import TRANSACTIONS_FILE
from txformer.machine import describe_machine
from txformer.prediction import load_model, load_processor
from txformer.processing_txformer import probability_of_positive_class


@dataclass
class OnlineBenchmarkArguments:
    """What to measure."""

    lengths: list[int] = field(
        default_factory=lambda: [1000, 5000, 10000, 50000], metadata={"help": "Events already read per customer."}
    )
    new_events: list[int] = field(default_factory=lambda: [1, 256], metadata={"help": "New events per update."})
    customers: int = field(default=8, metadata={"help": "Customers per update (one batch)."})
    hidden_size: int = field(default=64, metadata={"help": "Model width (random weights)."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Layers."})
    segment_length: int = field(default=256, metadata={"help": "∞-former segment length."})
    window: int = field(default=256, metadata={"help": "max_length of the window state (full attention)."})
    min_run_time: float = field(default=1.0, metadata={"help": "Seconds of timing per measurement."})
    num_threads: int = field(default=1, metadata={"help": "torch threads."})
    model: str | None = field(default=None, metadata={"help": "A trained ∞-former folder: measure its fidelity."})
    fidelity_customers: int = field(default=100, metadata={"help": "Customers whose updates are compared."})
    fidelity_updates: int = field(default=12, metadata={"help": "Updates per customer in the fidelity check."})
    fidelity_sizes: list[int] = field(default_factory=lambda: [1, 16, 100], metadata={"help": "Update sizes."})
    output_file: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})


def synthetic_histories(vocabulary: EventVocabulary, num_customers: int, length: int, seed: int) -> list[dict]:
    """Histories (the processor's `group_histories` form) of random known codes, gaps of about 2 hours."""
    rng = random.Random(seed)
    codes = {field.name: field.codes for field in vocabulary.fields}
    histories = []
    for customer in range(num_customers):
        times, now = [], 0.0
        for _ in range(length):
            now += rng.expovariate(12.0)
            times.append(now)
        history = {"customer_id": customer, "event_time": times, "amount": [rng.gauss(-500, 300) for _ in times]}
        history.update({name: rng.choices(values, k=length) for name, values in codes.items()})
        histories.append(history)
    return histories


def later_events(histories: list[dict], count: int) -> list[dict]:
    """`count` new events per customer, at one time after its history (so the same update can be timed again)."""
    return [
        {
            **{name: values[-count:] for name, values in history.items() if isinstance(values, list)},
            "customer_id": history["customer_id"],
            "event_time": [history["event_time"][-1] + 1.0] * count,
        }
        for history in histories
    ]


def median_seconds(function, min_run_time: float) -> float:
    return (
        benchmark.Timer(stmt="function()", globals={"function": function})
        .blocked_autorange(min_run_time=min_run_time)
        .median
    )


def measure_costs(args: OnlineBenchmarkArguments, vocabulary: EventVocabulary) -> list[dict]:
    """Per state kind and history length: the time to read the whole history (rescoring) and to update."""
    rows = []
    for attention_type, max_length in (("infinity", None), ("full", args.window)):
        torch.manual_seed(0)
        config = TxFormerConfig(
            categorical_fields=list(vocabulary.categorical_fields),
            categorical_vocab_sizes=list(vocabulary.vocab_sizes),
            numeric_fields=list(vocabulary.numeric_fields),
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            intermediate_size=4 * args.hidden_size,
            attention_type=attention_type,
            segment_length=args.segment_length,
        )
        model = TxFormerForSequenceClassification(config).eval()
        processor = vocabulary.to_processor(max_length=max_length, label_prior=0.5)
        scorer = OnlineScorer(model, processor)
        for length in args.lengths:
            histories = synthetic_histories(vocabulary, args.customers, length, seed=length)
            states = OnlineStates()
            start = time.perf_counter()
            scorer.score_and_update(histories, states, batch_size=args.customers)
            row = {
                "attention_type": attention_type,
                "state": scorer.mode,
                "history_events": length,
                "read_history_s": time.perf_counter() - start,
                "state_floats_per_customer": sum(
                    tensor.numel() for tensor in next(iter(states.customers.values())).values()
                ),
            }
            for count in args.new_events:
                new = later_events(histories, count)
                row[f"update_{count}_s"] = median_seconds(
                    lambda new=new, states=states, scorer=scorer: scorer.score_and_update(
                        new, states, batch_size=args.customers
                    ),
                    args.min_run_time,
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def measure_fidelity(args: OnlineBenchmarkArguments) -> list[dict]:
    """|online − rescored| probability of a trained ∞-former on held-out-like customers: each customer's history
    minus its last `updates × size` events is scored first, then the rest arrives in updates of `size` events."""
    model = load_model(args.model).eval()
    processor = load_processor(args.model)
    if processor.max_length is not None:
        processor.max_length = None
    with tempfile.TemporaryDirectory() as folder:
        generate_synthetic_data(folder, num_customers=args.fidelity_customers, seed=12345)
        customers = build_customer_dataset(Path(folder) / TRANSACTIONS_FILE)
    histories = [
        {name: customers[row][name] for name in ("customer_id", "event_time", *processor.categorical_fields, "amount")}
        for row in range(len(customers))
    ]
    segment_length = model.config.segment_length
    results = []
    for size in args.fidelity_sizes:
        differences = {"whole segments": [], "partial segment": []}
        for history in histories:
            num_new = args.fidelity_updates * size
            if len(history["event_time"]) <= num_new:
                continue
            scorer, states = OnlineScorer(model, processor), OnlineStates()
            first = len(history["event_time"]) - num_new
            for end in [first, *range(first + size, first + num_new + 1, size)]:
                begin = 0 if end == first else end - size
                part = {
                    name: values[begin:end] if isinstance(values, list) else values for name, values in history.items()
                }
                online = scorer.score_and_update([part], states)[0]["probability"]
                whole = {
                    name: values[:end] if isinstance(values, list) else values for name, values in history.items()
                }
                with torch.no_grad():
                    logits = model(**processor.pad([processor.encode(whole)], max_length=None)).logits
                rescored = probability_of_positive_class(logits).item()
                kind = "whole segments" if (end - first) % segment_length == 0 else "partial segment"
                differences[kind].append(abs(online - rescored))
        for kind, values in differences.items():
            if values:
                values.sort()
                results.append(
                    {
                        "update_size": size,
                        "events_since_first_score": kind,
                        "comparisons": len(values),
                        "max_abs_difference": values[-1],
                        "p95_abs_difference": values[int(0.95 * (len(values) - 1))],
                        "mean_abs_difference": sum(values) / len(values),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(OnlineBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(args.num_threads)
    with tempfile.TemporaryDirectory() as folder:
        generate_synthetic_data(folder, num_customers=200, seed=0)
        vocabulary = EventVocabulary.fit(build_customer_dataset(Path(folder) / TRANSACTIONS_FILE))
    results = {
        "command": shlex.join(["python", "benchmarks/online.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": describe_machine(),
        "arguments": asdict(args),
        "costs": measure_costs(args, vocabulary),
        "fidelity": measure_fidelity(args) if args.model else None,
    }
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
