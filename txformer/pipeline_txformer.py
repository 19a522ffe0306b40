"""`pipeline(model=folder_or_repo, trust_remote_code=True)`: customer probabilities from raw transactions, in batches
or online from saved per-customer states.

Part of the remote-code set (standard library, torch, transformers), copied next to every saved processor. The
safetensors functions come through `transformers.modeling_utils`, as the config takes `strict` from transformers.
"""

import bz2
import csv
import ctypes
import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Pipeline
from transformers.modeling_utils import safe_open, safe_save_file  # the safetensors functions transformers uses

from .configuration_txformer import ATTENTION_KINDS
from .modeling_txformer import TxFormerState
from .processing_txformer import probability_of_positive_class, time_origin


PIPELINE_TASK = "transaction-classification"
DEFAULT_BATCH_SIZE = 64
STATES_FORMAT = "txformer-online-states"
STATES_FORMAT_VERSION = "1"


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of a model's config that lets `pipeline(model=...)` find this pipeline."""
    return {
        PIPELINE_TASK: {
            "impl": f"{__name__.rsplit('.', 1)[-1]}.{TransactionClassificationPipeline.__name__}",
            "pt": ["AutoModelForSequenceClassification"],
            "type": "multimodal",
        }
    }


class TransactionClassificationPipeline(Pipeline):
    r"""
    Scores customers from their raw transactions with a [`TxFormerForSequenceClassification`] and its
    [`TxFormerProcessor`] (the pipeline's `feature_extractor`).

    Inputs: rows (dicts with the real CSV's columns `customer_id, tr_datetime, mcc_code, tr_type, amount, term_id`),
    columns (a dict of lists), a pandas DataFrame, or the path of a CSV file in the real format (`.gz`/`.bz2` too).
    Returns `[{"customer_id", "probability"}]`, one per customer, in ascending `customer_id` order; histories are
    batched by length (`batch_size`, default 64). `max_length` overrides the training setting (None = whole
    histories).

    With `states` (an [`OnlineStates`] or the path of its safetensors file), the rows are each customer's *new*
    transactions: customers with a state continue from it without rereading their history, the others start one,
    and `states` is updated (the file rewritten). See [`OnlineScorer`].

    Example:

    ```python
    >>> from transformers import pipeline
    >>> scorer = pipeline(model="<user>/<repo>", trust_remote_code=True, revision="<commit>")
    >>> scorer("transactions.csv")
    [{'customer_id': 7, 'probability': 0.61...}, ...]
    ```
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = True
    _load_tokenizer = False

    def __call__(self, transactions: Any, batch_size: int | None = None, states: Any = None, **kwargs):
        """Probabilities of the customers in `transactions` (see the class docstring)."""
        if self.feature_extractor is None:
            raise ValueError(
                "This pipeline needs the model's TxFormerProcessor (preprocessor_config.json next to the model)."
            )
        batch_size = batch_size or self._batch_size or DEFAULT_BATCH_SIZE
        histories = self.read_histories(transactions)
        if states is not None:
            preprocess_parameters = {**self._preprocess_params, **self._sanitize_parameters(**kwargs)[0]}
            scorer = OnlineScorer(self.model, self.feature_extractor, **preprocess_parameters)
            return scorer.score_and_update(histories, states, batch_size=batch_size)
        encoded = [self.feature_extractor.encode(history) for history in histories]
        # Batched by length so little compute goes to padding; the answers come back in customer order.
        order = sorted(range(len(encoded)), key=lambda index: encoded[index]["num_events"])
        outputs = super().__call__([encoded[index] for index in order], batch_size=batch_size, **kwargs)
        results = [None] * len(order)
        for position, index in enumerate(order):
            results[index] = outputs[position]
        return results

    def read_histories(self, transactions: Any) -> list[dict[str, Any]]:
        """Each customer's history (`TxFormerProcessor.group_histories`) from rows, columns, a DataFrame or a CSV
        path; errors name the file and line, or the row."""
        if isinstance(transactions, (str, os.PathLike)):
            rows, line_numbers = read_csv_rows(transactions)
            return self.feature_extractor.group_histories(rows, source=str(transactions), line_numbers=line_numbers)
        return self.feature_extractor.group_histories(transactions)

    def _sanitize_parameters(self, max_length: int | None = -1):
        # -1: the processor's setting; only a given value overrides the one the pipeline was built with.
        return ({} if max_length == -1 else {"max_length": max_length}), {}, {}

    def preprocess(self, history: Mapping[str, Any], max_length: int | None = -1) -> dict[str, Any]:
        inputs = dict(self.feature_extractor.pad([history], max_length=max_length))
        return {**inputs, "customer_id": history["customer_id"]}

    def _forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        customer_ids = inputs.pop("customer_id")
        logits = self.model(**inputs).logits
        # `logits` first: the pipeline infers the batch size from the first entry when it splits the batch.
        return {"logits": logits, "customer_id": customer_ids}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        probability = probability_of_positive_class(outputs["logits"].cpu())
        return {"customer_id": outputs["customer_id"], "probability": float(probability[0])}


def read_csv_rows(path: str | os.PathLike) -> tuple[list[dict[str, str]], list[int]]:
    """The rows of a transactions CSV as dicts of strings (header names trimmed; blank lines skipped), with the
    line where each row starts; a row with the wrong number of fields names its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise ValueError(f"{path}: the file is empty (no header line).")
        rows, line_numbers = [], []
        line = reader.line_num + 1
        for fields in reader:
            if fields:
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path} line {line}: expected {len(header)} fields ({','.join(header)}), found {len(fields)}."
                    )
                rows.append(dict(zip(header, fields, strict=True)))
                line_numbers.append(line)
            line = reader.line_num + 1
    if not rows:
        raise ValueError(f"{path}: the file has a header but no transactions.")
    return rows, line_numbers


class OnlineStates:
    """Per-customer states of online scoring, saved as one safetensors file.

    Two kinds, chosen by [`OnlineScorer`]: `"memory"` (a streaming attention kind, the ∞-former, reading whole
    histories: the model's [`TxFormerState`] after the last whole segment, plus the fewer events read since) and
    `"window"` (any attention kind with a `max_length`: the last `max_length` events). Each state also records the
    time of the customer's last event, so that older events are refused rather than appended out of order.
    """

    def __init__(self, mode: str | None = None, model_fingerprint: str | None = None):
        self.mode = mode
        self.model_fingerprint = model_fingerprint
        self.customers: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.customers)

    def __contains__(self, customer_id: int) -> bool:
        return customer_id in self.customers

    def num_events(self, customer_id: int) -> int:
        """Events read so far for a customer (its whole history)."""
        return int(self.customers[customer_id]["num_events_read"])

    def save(self, path: str | os.PathLike) -> Path:
        """Writes every state into one safetensors file (atomically: a temporary file renamed over `path`)."""
        path = Path(path)
        ids = sorted(self.customers)
        states = [self.customers[customer_id] for customer_id in ids]
        tensors = {"customer_id": torch.tensor(ids, dtype=torch.int64)}
        if states:
            for name in states[0]:
                if name.startswith("events."):
                    tensors[name] = torch.cat([state[name] for state in states])
                else:
                    tensors[name] = torch.stack([state[name] for state in states])
            lengths = torch.tensor([len(state["events.event_time"]) for state in states])
            tensors["events.offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        metadata = {
            "format": STATES_FORMAT,
            "format_version": STATES_FORMAT_VERSION,
            "mode": str(self.mode),
            "model_fingerprint": str(self.model_fingerprint),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            safe_save_file(
                {name: tensor.contiguous() for name, tensor in tensors.items()}, temporary, metadata=metadata
            )
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OnlineStates":
        """Reads a file written by `save`."""
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        if metadata.get("format") != STATES_FORMAT or metadata.get("format_version") != STATES_FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a txformer online-states file of format version {STATES_FORMAT_VERSION} "
                f"(metadata {metadata})."
            )
        states = cls(mode=metadata["mode"], model_fingerprint=metadata["model_fingerprint"])
        offsets = tensors.pop("events.offsets").tolist() if "events.offsets" in tensors else None
        for row, customer_id in enumerate(tensors.pop("customer_id").tolist()):
            states.customers[customer_id] = {
                name: tensor[offsets[row] : offsets[row + 1]] if name.startswith("events.") else tensor[row]
                for name, tensor in tensors.items()
            }
        return states


class OnlineScorer:
    r"""
    Scores customers' *new* transactions from saved per-customer states, without rereading their histories.

    - a streaming kind (`AttentionKind.streaming`: `attention_type="infinity"`) with whole histories
      (`max_length=None`): a state holds the ∞-former's memory
      after the last whole segment (long-term memory of every layer, pooling sums, event context, last event) and
      the fewer than `segment_length` events read since. New events are appended to those; whole segments are read
      into the memory, the rest is read on top of it to score. The cost of an update depends on the new events and
      `segment_length`, not on the history length. The probability equals rescoring the whole history exactly
      when the events read since the history was first scored are a whole number of segments; otherwise the two
      read the same events in differently aligned segments (docs/inference.md measures the difference).
    - any attention kind with a window (`max_length=N`): a state holds the last N events, and an update rescores
      them with the new ones: exactly what rescoring the whole history with `max_length=N` gives, at a cost set by N.
    - the other kinds with whole histories: refused (no state bounds the cost of an update).

    States are tied to the model's weights (a fingerprint is saved with them).
    """

    def __init__(self, model, processor, max_length: int | None = -1):
        self.model = model
        self.processor = processor
        self.max_length = processor.max_length if max_length == -1 else max_length
        attention_type = model.config.attention_type
        self.streaming = ATTENTION_KINDS[attention_type].streaming
        if self.max_length is not None:
            self.mode = "window"
        elif self.streaming is not None:
            self.mode = "memory"
        else:
            raise ValueError(
                f"Online scoring of attention_type={attention_type!r} over whole histories would reread every "
                "history at each update. Give a window instead (max_length=N): the state then keeps the last N "
                "events and an update rescores them, exactly as pipeline(..., max_length=N) scores them."
            )
        self.model_fingerprint = weights_fingerprint(model)

    @torch.no_grad()
    def score_and_update(
        self, histories: Sequence[Mapping[str, Any]], states: Any, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[dict[str, Any]]:
        """Probabilities of the customers of `histories` (their new events, from `group_histories`), continuing
        from `states` (an `OnlineStates`, or the path of its file: read if it exists, rewritten after) and updating
        them; `[{"customer_id", "probability"}]` in the order of `histories`."""
        path = None
        if isinstance(states, (str, os.PathLike)):
            path = Path(states)
            states = OnlineStates.load(path) if path.exists() else OnlineStates()
        self._check_states(states)
        self.model.eval()
        encoded = [self.processor.encode(history) for history in histories]
        for history in encoded:
            customer_id = history["customer_id"]
            if customer_id in states.customers:
                last_time = float(states.customers[customer_id]["last_event_time"])
                if history["event_time"][0] < last_time:
                    raise ValueError(
                        f"Customer {customer_id}: a new transaction at day {history['event_time'][0]:.6f} precedes "
                        f"the last one already scored (day {last_time:.6f}); online scoring only appends events."
                    )
        probabilities = {}
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            update = self._update_memory if self.mode == "memory" else self._update_window
            probabilities.update(update(batch, states))
        states.mode, states.model_fingerprint = self.mode, self.model_fingerprint
        if path is not None:
            states.save(path)
        return [
            {"customer_id": history["customer_id"], "probability": probabilities[history["customer_id"]]}
            for history in encoded
        ]

    def _check_states(self, states: OnlineStates) -> None:
        if not states.customers:
            return
        if states.mode != self.mode:
            raise ValueError(
                f"These states were saved for {states.mode!r} online scoring, this scorer does {self.mode!r}."
            )
        if states.model_fingerprint != self.model_fingerprint:
            raise ValueError(
                "These states were saved with another model (weights fingerprint "
                f"{states.model_fingerprint[:12]}…, this model {self.model_fingerprint[:12]}…); start new states."
            )

    def _events(self, history: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A history's events as tensors: times (days, float64), vocabulary indices, numeric values (float64)."""
        return {
            "events.event_time": torch.tensor(history["event_time"], dtype=torch.float64),
            "events.input_ids": torch.tensor(
                [history[name] for name in self.processor.categorical_fields], dtype=torch.int64
            ).T.reshape(-1, len(self.processor.categorical_fields)),
            "events.numeric_values": torch.tensor(
                [history[name] for name in self.processor.numeric_fields], dtype=torch.float64
            ).T.reshape(-1, len(self.processor.numeric_fields)),
        }

    def _as_history(self, customer_id: int, events: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Events (tensors) back in the encoded-history form that `TxFormerProcessor.pad` takes."""
        history = {"customer_id": customer_id, "event_time": events["events.event_time"].tolist()}
        for index, name in enumerate(self.processor.categorical_fields):
            history[name] = events["events.input_ids"][:, index].tolist()
        for index, name in enumerate(self.processor.numeric_fields):
            history[name] = events["events.numeric_values"][:, index].tolist()
        return history

    def _forward(self, histories: list[dict[str, Any]], **pad_arguments) -> Any:
        inputs = self.processor.pad(histories, **pad_arguments)
        return self.model(**{name: tensor.to(self.model.device) for name, tensor in inputs.items()})

    def _update_window(self, batch: list[dict[str, Any]], states: OnlineStates) -> dict[int, float]:
        windows = []
        for history in batch:
            customer_id, events = history["customer_id"], self._events(history)
            previous = states.customers.get(customer_id)
            num_read = len(history["event_time"])
            if previous is not None:
                events = {name: torch.cat([previous[name], events[name]]) for name in events}
                num_read += int(previous["num_events_read"])
            events = {name: tensor[-self.max_length :] for name, tensor in events.items()}
            states.customers[customer_id] = {
                **events,
                "last_event_time": events["events.event_time"][-1],
                "num_events_read": torch.tensor(num_read),
            }
            windows.append(self._as_history(customer_id, events))
        logits = self._forward(windows, max_length=self.max_length).logits
        return dict(zip([history["customer_id"] for history in batch], _probabilities(logits), strict=True))

    def _update_memory(self, batch: list[dict[str, Any]], states: OnlineStates) -> dict[int, float]:
        segment_length = self.streaming.segment_length(self.model.config)
        probabilities = {}
        starting = [history for history in batch if history["customer_id"] not in states.customers]
        if starting:
            output = self._forward(starting, max_length=None)
            model_states = split_state(output.past_state)
            for history, model_state, probability in zip(
                starting, model_states, _probabilities(output.logits), strict=True
            ):
                events = self._events(history)
                states.customers[history["customer_id"]] = {
                    **model_state,
                    **{name: tensor[:0] for name, tensor in events.items()},
                    "time_origin": torch.tensor(time_origin(history["event_time"][0]), dtype=torch.float64),
                    "last_event_time": events["events.event_time"][-1],
                    "num_events_read": torch.tensor(len(history["event_time"])),
                }
                probabilities[history["customer_id"]] = probability

        # Continuing customers: the events read since the last whole segment, then the new ones.
        pending = {}
        for history in batch:
            customer_id = history["customer_id"]
            if customer_id in probabilities:
                continue
            state, events = states.customers[customer_id], self._events(history)
            pending[customer_id] = {name: torch.cat([state[name], events[name]]) for name in events}
            state["last_event_time"] = events["events.event_time"][-1]
            state["num_events_read"] = state["num_events_read"] + len(history["event_time"])
        # Whole segments go into the memory.
        committing = [
            customer_id
            for customer_id, events in pending.items()
            if len(events["events.event_time"]) >= segment_length
        ]
        if committing:
            output = self._continue(committing, states, pending, lambda count: count - count % segment_length)
            for customer_id, model_state, probability in zip(
                committing, split_state(output.past_state), _probabilities(output.logits), strict=True
            ):
                count = len(pending[customer_id]["events.event_time"])
                kept = count % segment_length
                states.customers[customer_id].update(model_state)
                pending[customer_id] = {name: tensor[count - kept :] for name, tensor in pending[customer_id].items()}
                if kept == 0:
                    probabilities[customer_id] = probability
        # The rest is read on top of the memory to score, and kept for the next update.
        peeking = [customer_id for customer_id, events in pending.items() if len(events["events.event_time"]) > 0]
        if peeking:
            output = self._continue(peeking, states, pending, lambda count: count)
            probabilities.update(zip(peeking, _probabilities(output.logits), strict=True))
        for customer_id, events in pending.items():
            states.customers[customer_id].update(events)
        return probabilities

    def _continue(self, customer_ids: list[int], states: OnlineStates, pending: dict, count_to_read) -> Any:
        """One forward over the first `count_to_read(n)` of each customer's `n` pending events, from its state."""
        histories = []
        for customer_id in customer_ids:
            events = pending[customer_id]
            count = count_to_read(len(events["events.event_time"]))
            histories.append(self._as_history(customer_id, {name: tensor[:count] for name, tensor in events.items()}))
        customer_states = [states.customers[customer_id] for customer_id in customer_ids]
        past_state = stack_state(customer_states, self.streaming.state_class, self.model.device)
        inputs = self.processor.pad(
            histories,
            max_length=None,
            time_origins=[float(state["time_origin"]) for state in customer_states],
        )
        return self.model(
            **{name: tensor.to(self.model.device) for name, tensor in inputs.items()}, past_state=past_state
        )


def _probabilities(logits: torch.Tensor) -> list[float]:
    return probability_of_positive_class(logits.cpu()).tolist()


def split_state(state: TxFormerState) -> list[dict[str, torch.Tensor]]:
    """A batched streaming state as one dict of named CPU tensors per row: every per-row tensor of the state
    (`state.<field>`) and of each layer's memory (`layer.<index>.<field>`); `stack_state` reverses it."""
    tensors = {}
    for state_field in dataclasses.fields(state):
        value = getattr(state, state_field.name)
        if state_field.name == "layer_states":
            for index, layer in enumerate(value):
                for layer_field in dataclasses.fields(layer):
                    tensors[f"layer.{index}.{layer_field.name}"] = getattr(layer, layer_field.name)
        else:
            tensors[f"state.{state_field.name}"] = value
    # Per-row tensors only: a layer's regularisation loss is one number for the batch.
    batch_size = state.num_events.shape[0]
    tensors = {
        name: tensor.detach().cpu()
        for name, tensor in tensors.items()
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.shape[0] == batch_size
    }
    return [{name: tensor[row].clone() for name, tensor in tensors.items()} for row in range(batch_size)]


def stack_state(
    rows: Sequence[Mapping[str, torch.Tensor]], layer_state_class: type, device: torch.device
) -> TxFormerState:
    """The batched streaming state of rows split by `split_state`, each layer's state a `layer_state_class`."""
    stacked = {
        name: torch.stack([row[name] for row in rows]).to(device)
        for name in rows[0]
        if name.startswith(("state.", "layer."))
    }
    layers = {}
    for name, tensor in stacked.items():
        if name.startswith("layer."):
            _, index, field_name = name.split(".")
            layers.setdefault(int(index), {})[field_name] = tensor
    return TxFormerState(
        **{name.removeprefix("state."): tensor for name, tensor in stacked.items() if name.startswith("state.")},
        layer_states=tuple(layer_state_class(**layers[index]) for index in sorted(layers)),
    )


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, dtypes and bytes): states are valid for these weights only."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            # The raw bytes, read without numpy (not a dependency of remote code).
            digest.update(ctypes.string_at(tensor.data_ptr(), tensor.nbytes))
    return digest.hexdigest()


__all__ = [
    "OnlineScorer",
    "OnlineStates",
    "PIPELINE_TASK",
    "TransactionClassificationPipeline",
    "custom_pipelines",
]
