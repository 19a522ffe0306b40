"""Event vocabulary: categorical codes to embedding indices, fitted on training customers and saved as JSON."""

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..io_utils import atomic_write_json
from ..processing_txformer import MISSING_INDEX, PAD_INDEX, UNKNOWN_INDEX, VOCABULARY_FORMAT_VERSION, TxFormerProcessor
from .reader import customer_table, list_offsets_and_values


VOCABULARY_FILE = "event_vocabulary.json"
# What `TxFormerProcessor.save_pretrained` writes; it holds the vocabulary too.
PROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_CATEGORICAL_FIELDS = ("mcc_code", "tr_type", "term_id")
DEFAULT_NUMERIC_FIELDS = ("amount",)
DEFAULT_MIN_COUNT = 5
DEFAULT_MAX_SIZE = 4096
# Per-part code counts are merged once this many have piled up, so a stream of parts holds few tables at a time.
COUNTS_TO_MERGE = 16


def _per_field(setting, name: str, default):
    """A setting given once for all fields, or as a mapping from field name (fields not named get `default`)."""
    if isinstance(setting, Mapping):
        return setting.get(name, default)
    return setting


@dataclass
class FieldVocabulary:
    """Known codes of one categorical field, most frequent first. Index 0 = padding, 1 = unknown, 2 = missing
    (string fields only), then the codes."""

    name: str
    value_type: str
    codes: list = field(default_factory=list)
    min_count: int = 1
    max_size: int | None = None
    num_distinct_in_training: int = 0

    def __post_init__(self):
        if self.value_type not in ("int", "string"):
            raise ValueError(f"Field {self.name!r}: value_type must be 'int' or 'string', got {self.value_type!r}.")
        arrow_type = pa.int64() if self.value_type == "int" else pa.string()
        self._code_array = pa.array(self.codes, arrow_type)

    @property
    def has_missing_index(self) -> bool:
        """Whether index 2 means "missing value" (string fields: null or empty)."""
        return self.value_type == "string"

    @property
    def first_code_index(self) -> int:
        """Index of the most frequent known code."""
        return MISSING_INDEX + 1 if self.has_missing_index else MISSING_INDEX

    @property
    def size(self) -> int:
        """Number of indices, padding and unknown (and missing) included."""
        return self.first_code_index + len(self.codes)

    def encode_values(self, values: pa.Array) -> pa.Array:
        """Indices (int32) of flat values: unknown codes → 1; null or empty strings → 2 in string fields, else 1."""
        try:
            values = values.cast(self._code_array.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(
                f"Field {self.name!r} holds {values.type} values, the vocabulary {self.value_type}."
            ) from error
        positions = pc.index_in(values, value_set=self._code_array)
        encoded = pc.fill_null(pc.add(positions.cast(pa.int32()), self.first_code_index), UNKNOWN_INDEX)
        if self.has_missing_index:
            missing = pc.or_kleene(pc.is_null(values), pc.equal(values, ""))
            encoded = pc.if_else(missing, pa.scalar(MISSING_INDEX, pa.int32()), encoded)
        return encoded.cast(pa.int32())

    def to_dict(self) -> dict:
        """JSON-ready description."""
        return {
            "name": self.name,
            "value_type": self.value_type,
            "min_count": self.min_count,
            "max_size": self.max_size,
            "num_distinct_in_training": self.num_distinct_in_training,
            "codes": self.codes,
        }


def _value_type(arrow_type: pa.DataType, name: str) -> str:
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    raise ValueError(f"Field {name!r} has {arrow_type} values; categorical fields must hold integers or strings.")


def _count_codes(column: pa.ChunkedArray, value_type: str) -> pa.Table:
    """`values` and their `counts` in a categorical list column; nulls and (string fields) empty strings left out."""
    _, values = list_offsets_and_values(column)
    values = values.drop_null()
    if value_type == "string":
        values = values.filter(pc.not_equal(values, ""))
    return pa.Table.from_struct_array(pc.value_counts(values))


def _merge_counts(counts: list[pa.Table]) -> pa.Table:
    """One `values`, `counts` table from several (the counts of a value are summed)."""
    if len(counts) == 1:
        return counts[0]
    summed = pa.concat_tables(counts).group_by("values").aggregate([("counts", "sum")])
    return pa.table({"values": summed.column("values"), "counts": summed.column("counts_sum")})


def _field_from_counts(
    name: str, value_type: str, counted: pa.Table, min_count: int, max_size: int | None
) -> FieldVocabulary:
    """Codes seen at least `min_count` times, the `max_size` most frequent of them (ties: smaller code first)."""
    counted = counted.take(pc.sort_indices(counted, sort_keys=[("counts", "descending"), ("values", "ascending")]))
    kept = counted.filter(pc.greater_equal(counted.column("counts"), min_count)).column("values")[:max_size]
    return FieldVocabulary(
        name=name,
        value_type=value_type,
        codes=kept.to_pylist(),
        min_count=min_count,
        max_size=max_size,
        num_distinct_in_training=counted.num_rows,
    )


class EventVocabulary:
    """Maps each categorical event field to embedding indices (0 = padding, 1 = unknown, 2 = missing for string
    fields, known codes after) and names the numeric fields; the model's event schema."""

    def __init__(self, fields: Iterable[FieldVocabulary], numeric_fields: Iterable[str] = DEFAULT_NUMERIC_FIELDS):
        self.fields = list(fields)
        self.numeric_fields: list[str] = list(numeric_fields)
        self.categorical_fields: list[str] = [vocabulary.name for vocabulary in self.fields]
        self.vocab_sizes: list[int] = [vocabulary.size for vocabulary in self.fields]

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{name}={size}" for name, size in zip(self.categorical_fields, self.vocab_sizes, strict=True)
        )
        return f"EventVocabulary({sizes}; numeric={self.numeric_fields})"

    @classmethod
    def fit(
        cls,
        dataset: datasets.Dataset,
        categorical_fields: Iterable[str] = DEFAULT_CATEGORICAL_FIELDS,
        numeric_fields: Iterable[str] = DEFAULT_NUMERIC_FIELDS,
        min_count: int | Mapping[str, int] = DEFAULT_MIN_COUNT,
        max_size: int | None | Mapping[str, int | None] = DEFAULT_MAX_SIZE,
    ) -> "EventVocabulary":
        """Fits on the customers of `dataset` (the training split only): per field, the codes seen at least
        `min_count` times, at most `max_size` of them, most frequent first; both may be a per-field mapping."""
        categorical_fields, numeric_fields = list(categorical_fields), list(numeric_fields)
        _check_columns(dataset.column_names, categorical_fields + numeric_fields)
        table = customer_table(dataset.select_columns(categorical_fields))
        return cls.fit_tables([table], categorical_fields, numeric_fields, min_count, max_size)

    @classmethod
    def fit_tables(
        cls,
        tables: Iterable[pa.Table],
        categorical_fields: Iterable[str] = DEFAULT_CATEGORICAL_FIELDS,
        numeric_fields: Iterable[str] = DEFAULT_NUMERIC_FIELDS,
        min_count: int | Mapping[str, int] = DEFAULT_MIN_COUNT,
        max_size: int | None | Mapping[str, int | None] = DEFAULT_MAX_SIZE,
    ) -> "EventVocabulary":
        """`fit` in one pass over customers given as arrow tables (e.g. the shards of data larger than memory): the
        same vocabulary as `fit` on their concatenation, holding only code counts between tables."""
        categorical_fields = list(categorical_fields)
        value_types: dict[str, str] = {}
        counts: dict[str, list[pa.Table]] = {name: [] for name in categorical_fields}
        for table in tables:
            _check_columns(table.column_names, categorical_fields)
            for name in categorical_fields:
                value_types.setdefault(name, _value_type(table.schema.field(name).type.value_type, name))
                counts[name].append(_count_codes(table.column(name), value_types[name]))
                if len(counts[name]) >= COUNTS_TO_MERGE:
                    counts[name] = [_merge_counts(counts[name])]
        if not value_types:
            raise ValueError("No customers to fit the vocabulary on.")
        fields = [
            _field_from_counts(
                name,
                value_types[name],
                _merge_counts(counts[name]),
                _per_field(min_count, name, 1),
                _per_field(max_size, name, None),
            )
            for name in categorical_fields
        ]
        return cls(fields, numeric_fields)

    def encode(self, dataset: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
        """Each categorical list column replaced by its list<int32> of indices (same name); other columns kept;
        `num_events` added. Vectorised per batch of customers."""
        _check_columns(dataset.column_names, [*self.categorical_fields, *self.numeric_fields, "event_time"])
        encoded = dataset.with_format("arrow").map(
            self.encode_table, batched=True, batch_size=1000, num_proc=num_proc, desc="encoding events"
        )
        return encoded.with_format(None)

    def encode_table(self, batch: pa.Table) -> pa.Table:
        """`encode` of the customers of an arrow table (what `encode` runs on each batch)."""
        event_counts = pc.list_value_length(batch.column("event_time")).to_numpy(zero_copy_only=False)
        for name in self.numeric_fields + self.categorical_fields:
            lengths = pc.list_value_length(batch.column(name)).to_numpy(zero_copy_only=False)
            if not np.array_equal(lengths, event_counts):
                row = int(np.flatnonzero(lengths != event_counts)[0])
                customer = batch.column("customer_id")[row].as_py() if "customer_id" in batch.column_names else row
                raise ValueError(
                    f"Customer {customer}: {name} has {lengths[row]} values but {event_counts[row]} events."
                )
        for vocabulary in self.fields:
            offsets, values = list_offsets_and_values(batch.column(vocabulary.name))
            indices = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), vocabulary.encode_values(values))
            batch = batch.set_column(batch.schema.get_field_index(vocabulary.name), vocabulary.name, indices)
        if "num_events" in batch.column_names:
            batch = batch.drop_columns(["num_events"])
        return batch.append_column("num_events", pa.array(event_counts, pa.int64()))

    def to_dict(self) -> dict:
        """JSON-ready description (what `save_pretrained` writes)."""
        return {
            "format_version": VOCABULARY_FORMAT_VERSION,
            "special_indices": {
                "padding": PAD_INDEX,
                "unknown": UNKNOWN_INDEX,
                "missing (string fields)": MISSING_INDEX,
            },
            "numeric_fields": self.numeric_fields,
            "categorical_fields": [vocabulary.to_dict() for vocabulary in self.fields],
        }

    def to_processor(self, max_length: int | None, label_prior: float | None, **kwargs) -> TxFormerProcessor:
        """The processor that turns raw transactions into model inputs with this vocabulary, keeping the most recent
        `max_length` events (None = all); `label_prior` scores customers without transactions."""
        return TxFormerProcessor(
            event_vocabulary=self.to_dict(), max_length=max_length, label_prior=label_prior, **kwargs
        )

    @classmethod
    def from_dict(cls, payload: dict, source: str = "event_vocabulary") -> "EventVocabulary":
        """The vocabulary of a `to_dict` payload (`source` names it in errors)."""
        if payload.get("format_version") != VOCABULARY_FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {payload.get('format_version')}, expected {VOCABULARY_FORMAT_VERSION}."
            )
        fields = [FieldVocabulary(**description) for description in payload["categorical_fields"]]
        return cls(fields, payload["numeric_fields"])

    @classmethod
    def from_processor(cls, processor: TxFormerProcessor) -> "EventVocabulary":
        """The vocabulary a processor holds (for the vectorised `encode` of whole files)."""
        return cls.from_dict(processor.event_vocabulary)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes `event_vocabulary.json` into the folder (created if needed); returns its path."""
        return atomic_write_json(Path(save_directory) / VOCABULARY_FILE, self.to_dict())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "EventVocabulary":
        """Loads the vocabulary of a folder: `event_vocabulary.json` (`save_pretrained`), else the one in the
        processor's `preprocessor_config.json`."""
        path = Path(folder) / VOCABULARY_FILE
        if path.is_file():
            return cls.from_dict(_read_json(path), source=str(path))
        processor_path = Path(folder) / PROCESSOR_FILE
        if processor_path.is_file():
            processor = _read_json(processor_path)
            if "event_vocabulary" not in processor:
                raise ValueError(f"{processor_path}: no event_vocabulary; it is not a txformer processor.")
            return cls.from_dict(processor["event_vocabulary"], source=str(processor_path))
        raise FileNotFoundError(
            f"{path} not found: {folder} holds no saved EventVocabulary ({VOCABULARY_FILE} or {PROCESSOR_FILE})."
        )


def _read_json(path: Path) -> dict:
    """A JSON file's content; a file that is not JSON is an error naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None


def _check_columns(column_names: list[str], names: Iterable[str]) -> None:
    missing = [name for name in names if name not in column_names]
    if missing:
        raise ValueError(f"The dataset has no column(s) {missing}; it has {column_names}.")
