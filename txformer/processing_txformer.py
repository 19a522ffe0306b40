"""TxFormerProcessor: raw transaction rows to padded TxFormer inputs, with the event vocabulary fitted in training.

Part of the remote-code set (standard library, torch and transformers only), so that a saved folder or Hub repository
turns raw transactions into model inputs without the txformer package. The package's vectorised reader
(`txformer.data`) and this processor give the same inputs; the collator of training pads with `pad_histories`.
"""

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature, FeatureExtractionMixin
from transformers.dynamic_module_utils import custom_object_save


PAD_INDEX = 0
UNKNOWN_INDEX = 1
# Only fields with string values (term_id) can be missing; they reserve this index for it.
MISSING_INDEX = 2
VOCABULARY_FORMAT_VERSION = 1
DAYS_PER_WEEK = 7
SECONDS_PER_DAY = 86400
# `D HH:MM:SS`, with seconds up to 60 (the real data has `454 10:54:60`).
DATETIME_PATTERN = r"^(?P<day>\d+) (?P<hour>\d{1,2}):(?P<minute>\d{2}):(?P<second>\d{2})$"
# Event times are float64 days: below 10^9 days they keep a resolution of 0.01 s or finer.
MAX_DAY_DIGITS = 9
INTEGER_PATTERN = r"^-?\d+$"
FLOAT_PATTERN = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
INFINITY_PATTERN = r"^\s*[+-]?(inf|Inf|INF|infinity|Infinity)\s*$"
# Spellings of a missing value. In `term_id` they mean "no terminal"; in every other column they are an error.
MISSING_VALUE_STRINGS = ("", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A")
# The model computes in float32: a larger magnitude becomes infinite there, and NaN after the signed log.
MAX_NUMERIC_MAGNITUDE = float(torch.finfo(torch.float32).max)
MODEL_INPUT_NAMES = ["input_ids", "numeric_values", "event_time", "attention_mask"]

_DATETIME = re.compile(DATETIME_PATTERN)
_INTEGER = re.compile(INTEGER_PATTERN)
_FLOAT = re.compile(FLOAT_PATTERN)
_INFINITY = re.compile(INFINITY_PATTERN)
_MISSING = frozenset(MISSING_VALUE_STRINGS)


def pad_histories(
    histories: Sequence[Mapping[str, Any]],
    categorical_fields: Sequence[str],
    numeric_fields: Sequence[str],
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    time_origins: Sequence[float | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pads encoded histories into model inputs.

    Each history holds `event_time` (days), the categorical fields as vocabulary indices, the numeric fields, and
    optionally `labels` and `customer_id` (named in errors). Returns `input_ids` [batch, length, n_categorical]
    (0 = pad), `numeric_values` [batch, length, n_numeric] (raw, float32), `event_time` [batch, length] (float32),
    `attention_mask` [batch, length] and `labels` [batch] when present. Keeps the most recent `max_length` events
    (None = all). Each row's times are shifted by whole weeks: by `7 * floor(t0 / 7)` days, `t0` its first kept
    event, or by its entry of `time_origins` when that is not None (a stream continued with the origin it began with).
    """
    if not histories:
        raise ValueError("Cannot collate an empty list of customers.")
    names = [*categorical_fields, *numeric_fields]
    kept_lengths = []
    for row, history in enumerate(histories):
        num_events = len(history["event_time"])
        if num_events == 0:
            raise ValueError(f"Customer {_customer(history, row)} has no events.")
        for name in names:
            if name not in history:
                raise KeyError(f"Customer {_customer(history, row)} has no field {name!r} (fields: {list(history)}).")
            if len(history[name]) != num_events:
                raise ValueError(
                    f"Customer {_customer(history, row)}: {name} has {len(history[name])} values, {num_events} events."
                )
        kept_lengths.append(num_events if max_length is None else min(num_events, max_length))

    length = max(kept_lengths)
    if pad_to_multiple_of is not None:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    attention_mask = torch.arange(length)[None, :] < torch.tensor(kept_lengths)[:, None]

    def padded(name: str, dtype: torch.dtype) -> torch.Tensor:
        # The most recent events are the last ones; the mask's True cells are filled row by row.
        kept = [
            torch.as_tensor(history[name][-count:], dtype=dtype)
            for history, count in zip(histories, kept_lengths, strict=True)
        ]
        values = torch.zeros(len(histories), length, dtype=dtype)
        values[attention_mask] = torch.cat(kept)
        return values

    event_time = padded("event_time", torch.float64)
    numeric_values = torch.stack([padded(name, torch.float64) for name in numeric_fields], dim=-1)
    for values, what in ((event_time, "event_time"), (numeric_values, "numeric value")):
        not_finite = ~torch.isfinite(values)
        if not_finite.any():
            row = int(not_finite.reshape(len(histories), -1).any(dim=1).nonzero()[0])
            raise ValueError(f"Customer {_customer(histories[row], row)} has a NaN or infinite {what}.")
        too_large = values.abs() > MAX_NUMERIC_MAGNITUDE
        if too_large.any():
            row = int(too_large.reshape(len(histories), -1).any(dim=1).nonzero()[0])
            raise ValueError(
                f"Customer {_customer(histories[row], row)}: {what} {values[too_large][0].item():g} is beyond "
                f"±{MAX_NUMERIC_MAGNITUDE:g}, the float32 range of the model."
            )
    # float32 keeps ~1 s resolution only near 0: shift each row by whole weeks before its first kept event, which
    # leaves hour of day, day of week and gaps unchanged.
    week_start = DAYS_PER_WEEK * torch.floor(event_time[:, 0] / DAYS_PER_WEEK)
    if time_origins is not None:
        given = [origin is not None for origin in time_origins]
        origins = torch.tensor([0.0 if origin is None else origin for origin in time_origins], dtype=torch.float64)
        week_start = torch.where(torch.tensor(given), origins, week_start)
    event_time = torch.where(attention_mask, event_time - week_start[:, None], 0.0)

    input_ids = torch.stack([padded(name, torch.int64) for name in categorical_fields], dim=-1)
    batch = {
        "input_ids": input_ids,
        "numeric_values": numeric_values.to(torch.float32),
        "event_time": event_time.to(torch.float32),
        "attention_mask": attention_mask.to(torch.int64),
    }
    labels = [history.get("labels") for history in histories]
    if any(label is not None for label in labels):
        unlabelled = [row for row, label in enumerate(labels) if label is None]
        if unlabelled:
            row = unlabelled[0]
            raise ValueError(f"Customer {_customer(histories[row], row)} has no label while others have.")
        batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.int64)
    return batch


def probability_of_positive_class(logits: torch.Tensor) -> torch.Tensor:
    """Probability of class 1 from `[n, 2]` logits (softmax) or `[n]`/`[n, 1]` logits (sigmoid), in float64."""
    logits = logits.double()
    if logits.dim() == 2 and logits.shape[1] == 2:
        return 1.0 / (1.0 + torch.exp(logits[:, 0] - logits[:, 1]))
    return 1.0 / (1.0 + torch.exp(-logits.reshape(-1)))


def time_origin(event_time_days: float) -> float:
    """The whole-week origin (days) that `pad_histories` subtracts from a history starting at `event_time_days`."""
    return DAYS_PER_WEEK * math.floor(event_time_days / DAYS_PER_WEEK)


def _customer(history: Mapping[str, Any], row: int) -> str:
    """How an error names a customer: its id, or its row in the batch."""
    return str(history["customer_id"]) if "customer_id" in history else f"at batch row {row}"


class TxFormerProcessor(FeatureExtractionMixin):
    r"""
    Turns raw bank transactions into padded [`TxFormerModel`] inputs exactly as training did: the event vocabulary
    fitted on the training customers (codes to indices; unseen codes to 1 = unknown; missing `term_id` to 2), the
    most recent `max_length` events of each customer, event times in days shifted by whole weeks.

    Args:
        event_vocabulary (`dict`): the fitted vocabulary, as `txformer.data.EventVocabulary.to_dict()` writes it
            (`event_vocabulary.json` of older folders): per categorical field its name, value type (`"int"` or
            `"string"`) and known codes, most frequent first; and the numeric field names.
        max_length (`int`, *optional*): most recent events kept per customer (None = whole histories).
        label_prior (`float`, *optional*): share of positive labels among the training customers; the probability
            for customers without transactions.
        customer_id_field, datetime_field, event_time_field (`str`): column names of the raw rows: the customer,
            the `"D HH:MM:SS"` time of the real data, or (instead of it) the time already in days.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification, AutoProcessor
    >>> processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    >>> rows = [{"customer_id": 7, "tr_datetime": "12 10:30:00", "mcc_code": 5411, "tr_type": 1010,
    ...          "amount": -250.0, "term_id": None}]
    >>> inputs = processor(rows)  # one row per customer, customers in ascending id order
    >>> logits = model(**inputs).logits
    ```
    """

    model_input_names = MODEL_INPUT_NAMES
    # Read by the pipelines' batch collation: pad every input with zeros on the right, as `pad_histories` does.
    padding_value = 0.0
    padding_side = "right"

    def __init__(
        self,
        event_vocabulary: dict | None = None,
        max_length: int | None = None,
        label_prior: float | None = None,
        customer_id_field: str = "customer_id",
        datetime_field: str = "tr_datetime",
        event_time_field: str = "event_time",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if event_vocabulary is None:
            raise ValueError("TxFormerProcessor needs the event_vocabulary fitted in training.")
        if event_vocabulary.get("format_version") != VOCABULARY_FORMAT_VERSION:
            raise ValueError(
                f"event_vocabulary format_version {event_vocabulary.get('format_version')}, expected "
                f"{VOCABULARY_FORMAT_VERSION}."
            )
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive or None, got {max_length}.")
        if label_prior is not None and not 0 <= label_prior <= 1:
            raise ValueError(f"label_prior must be a probability, got {label_prior}.")
        self.event_vocabulary = event_vocabulary
        self.max_length = max_length
        self.label_prior = label_prior
        self.customer_id_field = customer_id_field
        self.datetime_field = datetime_field
        self.event_time_field = event_time_field
        self._index_of_code, self._value_types, self._vocab_sizes = {}, {}, []
        for description in event_vocabulary["categorical_fields"]:
            value_type = description["value_type"]
            if value_type not in ("int", "string"):
                raise ValueError(f"Field {description['name']!r}: value_type must be 'int' or 'string'.")
            # Known codes follow padding, unknown and, in string fields, missing.
            first_index = MISSING_INDEX + 1 if value_type == "string" else MISSING_INDEX
            self._index_of_code[description["name"]] = {
                code: first_index + position for position, code in enumerate(description["codes"])
            }
            self._value_types[description["name"]] = value_type
            self._vocab_sizes.append(first_index + len(description["codes"]))

    @property
    def categorical_fields(self) -> list[str]:
        """Names of the categorical fields, in the order of `input_ids`' last dimension."""
        return [description["name"] for description in self.event_vocabulary["categorical_fields"]]

    @property
    def numeric_fields(self) -> list[str]:
        """Names of the numeric fields, in the order of `numeric_values`' last dimension."""
        return list(self.event_vocabulary["numeric_fields"])

    @property
    def vocab_sizes(self) -> list[int]:
        """Indices per categorical field, padding, unknown and missing included (the config's vocabulary sizes)."""
        return list(self._vocab_sizes)

    def to_dict(self) -> dict[str, Any]:
        """What `save_pretrained` writes to `preprocessor_config.json` (derived lookups left out)."""
        return {key: value for key, value in super().to_dict().items() if not key.startswith("_")}

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """`FeatureExtractionMixin.save_pretrained`, with an `auto_map` for `AutoFeatureExtractor` and
        `AutoProcessor` when the class is registered for auto classes; the processor's code and the pipeline's are
        then copied next to it, so the folder serves `pipeline(model=folder, trust_remote_code=True)`."""
        if self._auto_class is not None:
            # Imported here because the pipeline module imports this one; the relative import also makes the Hub
            # loader fetch the pipeline file with this one.
            from .pipeline_txformer import TransactionClassificationPipeline

            reference = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            self.auto_map = {"AutoFeatureExtractor": reference, "AutoProcessor": reference}
            saved = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
            # The pipeline's module and its relative imports (this one), as `Pipeline.save_pretrained` copies them.
            custom_object_save(TransactionClassificationPipeline, save_directory)
            return saved
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def __call__(
        self,
        transactions: Any,
        max_length: int | None = -1,
        return_customer_ids: bool = False,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Model inputs for the transactions of one or more customers: one row per customer, in ascending
        `customer_id` order. `transactions`: rows (dicts with the real CSV's columns, values as read from the file or
        parsed), columns (a dict of lists) or a pandas DataFrame. `max_length=-1` keeps the training setting.
        `return_customer_ids` adds `customer_id`, the id of each row."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"TxFormerProcessor returns torch tensors only, not return_tensors={return_tensors!r}.")
        histories = self.group_histories(transactions, **kwargs)
        batch = self.pad([self.encode(history) for history in histories], max_length=max_length)
        if return_customer_ids:
            batch["customer_id"] = [history["customer_id"] for history in histories]
        return batch

    def pad(
        self,
        encoded_histories: Sequence[Mapping[str, Any]],
        max_length: int | None = -1,
        time_origins: Sequence[float | None] | None = None,
    ) -> BatchFeature:
        """Padded model inputs of encoded histories (`encode`), as the training collator builds them;
        `max_length=-1` keeps the training setting."""
        batch = pad_histories(
            encoded_histories,
            self.categorical_fields,
            self.numeric_fields,
            max_length=self.max_length if max_length == -1 else max_length,
            time_origins=time_origins,
        )
        return BatchFeature(batch)

    def encode(self, history: Mapping[str, Any]) -> dict[str, Any]:
        """A history (`group_histories`) with each categorical field's codes replaced by vocabulary indices
        (unknown codes: 1; missing `term_id`: 2) and `num_events` added, as `EventVocabulary.encode` does."""
        encoded = dict(history)
        for name, index_of_code in self._index_of_code.items():
            if self._value_types[name] == "string":
                encoded[name] = [
                    MISSING_INDEX if code is None else index_of_code.get(code, UNKNOWN_INDEX) for code in history[name]
                ]
            else:
                encoded[name] = [index_of_code.get(code, UNKNOWN_INDEX) for code in history[name]]
        encoded["num_events"] = len(history["event_time"])
        return encoded

    def group_histories(
        self, transactions: Any, source: str | None = None, line_numbers: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """One history per customer, in ascending `customer_id` order, as `txformer.data.build_customer_dataset`
        builds them: `customer_id`, `event_time` (days), the categorical codes (None = missing `term_id`) and the
        numeric values, sorted by time (ties keep the input order). Values are checked as the package's reader checks
        them; an error names the row (`source` and `line_numbers`, when given, name the file and line)."""
        rows = _as_rows(transactions)
        events: dict[int, list[tuple]] = {}
        spellings: dict[int, tuple[str, str]] = {}
        for index, row in enumerate(rows):
            where = f"transactions[{index}]" if source is None else f"{source} line {line_numbers[index]}"
            customer_id = self._parse_customer_id(row, where, spellings)
            event = (
                self._parse_event_time(row, where),
                *(self._parse_code(row, name, where) for name in self.categorical_fields),
                *(self._parse_amount(row, name, where) for name in self.numeric_fields),
            )
            events.setdefault(customer_id, []).append(event)
        names = ["event_time", *self.categorical_fields, *self.numeric_fields]
        histories = []
        for customer_id in sorted(events):
            # `sorted` is stable: events at the same time keep their input order, as the reader's sort does.
            ordered = sorted(events[customer_id], key=lambda event: event[0])
            columns = zip(*ordered, strict=True)
            histories.append({"customer_id": customer_id, **dict(zip(names, map(list, columns), strict=True))})
        return histories

    def _value(self, row: Mapping[str, Any], name: str, where: str) -> Any:
        if name not in row:
            raise ValueError(f"{where}: no column {name!r} (columns: {list(row)}).")
        return row[name]

    def _parse_customer_id(self, row: Mapping[str, Any], where: str, spellings: dict[int, tuple[str, str]]) -> int:
        """The integer id; two spellings of one number (`073598595` and `73598595`) are refused, not merged."""
        value = self._value(row, self.customer_id_field, where)
        if isinstance(value, str):
            value = value.strip()
        customer_id = _parse_integer(value, self.customer_id_field, where)
        if isinstance(value, str):
            spelling, first_where = spellings.setdefault(customer_id, (value, where))
            if spelling != value:
                raise ValueError(
                    f"{where}: customer_id {value!r} and {spelling!r} ({first_where}) are the same number; ids that "
                    "differ only in leading zeros or signs would be merged into one customer."
                )
        return customer_id

    def _parse_event_time(self, row: Mapping[str, Any], where: str) -> float:
        """Days: `D + (3600 h + 60 m + s) / 86400` from the `"D HH:MM:SS"` column, else the days column itself."""
        if self.datetime_field not in row and self.event_time_field in row:
            days = _parse_float(row[self.event_time_field], self.event_time_field, where)
            if not math.isfinite(days):
                raise ValueError(f"{where}: {self.event_time_field} is not finite.")
            return days
        value = self._value(row, self.datetime_field, where)
        match = _DATETIME.match(value) if isinstance(value, str) else None
        if match is None:
            if _is_missing(value):
                raise ValueError(f"{where}: {self.datetime_field} is missing.")
            raise ValueError(f"{where}: {self.datetime_field} {value!r} is not 'D HH:MM:SS'.")
        if len(match.group("day").lstrip("0")) > MAX_DAY_DIGITS:
            raise ValueError(
                f"{where}: {self.datetime_field} {value!r} has a day index beyond {10**MAX_DAY_DIGITS - 1:,}."
            )
        day, hour, minute, second = (int(match.group(name)) for name in ("day", "hour", "minute", "second"))
        if hour > 23 or minute > 59 or second > 60:
            raise ValueError(f"{where}: {self.datetime_field} {value!r} has an hour, minute or second out of range.")
        return day + (3600 * hour + 60 * minute + second) / SECONDS_PER_DAY

    def _parse_code(self, row: Mapping[str, Any], name: str, where: str) -> int | str | None:
        """An integer code, or a string code (None = missing; surrounding spaces trimmed, as the reader does)."""
        value = self._value(row, name, where)
        if self._value_types[name] == "int":
            return _parse_integer(value, name, where)
        if _is_missing(value):
            return None
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: {name} {value!r} is a {type(value).__name__}, not a string; codes such as '022915' lose "
                "their leading zeros as numbers (read the CSV with this column as text, e.g. dtype={name!r: str})."
            )
        return value.strip() or None

    def _parse_amount(self, row: Mapping[str, Any], name: str, where: str) -> float:
        amount = _parse_float(self._value(row, name, where), name, where)
        if not math.isfinite(amount):
            raise ValueError(f"{where}: {name} is not finite.")
        return amount


def _as_rows(transactions: Any) -> list[Mapping[str, Any]]:
    """Rows from a list of dicts, a dict of columns, or a pandas DataFrame (never imported here)."""
    if hasattr(transactions, "to_dict") and hasattr(transactions, "columns"):
        return transactions.to_dict(orient="records")
    if isinstance(transactions, Mapping):
        names = list(transactions)
        columns = [list(transactions[name]) for name in names]
        lengths = {name: len(column) for name, column in zip(names, columns, strict=True)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"The columns have different lengths: {lengths}.")
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    if isinstance(transactions, Iterable) and not isinstance(transactions, (str, bytes)):
        rows = list(transactions)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"transactions[{index}] is a {type(row).__name__}, not a dict of column values.")
        return rows
    raise ValueError(
        f"Transactions must be rows (dicts), columns (a dict of lists) or a DataFrame, not {type(transactions).__name__}."
    )


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and value in _MISSING)
    )


def _parse_integer(value: Any, name: str, where: str) -> int:
    if isinstance(value, str):
        if value in _MISSING:
            raise ValueError(f"{where}: {name} is missing.")
        if not _INTEGER.match(value):
            raise ValueError(f"{where}: {name} {value!r} is not a number.")
        return int(value)
    if _is_missing(value):
        raise ValueError(f"{where}: {name} is missing.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where}: {name} {value!r} is not an integer.")
        return int(value)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{where}: {name} {value!r} is not an integer.")
    return int(value.__index__())


def _parse_float(value: Any, name: str, where: str) -> float:
    if isinstance(value, str):
        if value in _MISSING:
            raise ValueError(f"{where}: {name} is missing.")
        if _INFINITY.match(value):
            return math.inf
        if not _FLOAT.match(value):
            raise ValueError(f"{where}: {name} {value!r} is not a number.")
        return float(value)
    if _is_missing(value):
        raise ValueError(f"{where}: {name} is missing.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"{where}: {name} {value!r} is not a number.")
    return float(value)


__all__ = ["TxFormerProcessor", "pad_histories", "probability_of_positive_class", "time_origin"]
