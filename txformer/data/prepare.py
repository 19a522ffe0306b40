"""Transaction files larger than memory, prepared once: read in parts, hash-partitioned by customer into shards that
are grouped one at a time, and cached as memory-mapped `datasets` Arrow datasets keyed by a fingerprint of the inputs
and the settings.

1. Read: each input file (CSV, `.csv.gz`, `.csv.bz2` or Parquet) is cut into parts of about `part_bytes` (CSV text at
   line ends, Parquet row batches). The reader's `read_transactions` checks and parses each part, so errors name the
   input file and its line; the rows go to `num_shards` shard files by a hash of the customer id.
2. Group: each shard alone is sorted by customer and time (stable: ties keep the input order), grouped into one row
   per customer and labelled, as `build_customer_dataset` does with one file in memory.
3. Encode: for training, the parts of `split_for_evaluation` (and a validation part), a vocabulary fitted in one
   pass over the training customers (or a given one); for prediction, every customer with a trained vocabulary; for
   pretraining, every customer with a vocabulary fitted on them all. One encoding pass merges the shards into
   ascending customer id order.

Peak memory is that of one part or one shard, not of the data, and no step memory-maps what it reads, so the resident
size of the preparing process stays bounded too. A second call with the same inputs and settings loads the cache.
"""

import bz2
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from glob import glob
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .. import __version__
from ..io_utils import atomic_write, atomic_write_json, check_writable_folder
from .reader import (
    TRANSACTION_COLUMNS,
    TransactionDataError,
    _warn_absent,
    attach_labels,
    duplicate_rows,
    group_sorted_by_customer,
    is_decoding_error,
    read_labels,
    read_transactions,
    sort_by_customer_and_time,
    undecodable_file_error,
)
from .split import split_for_evaluation, stratified_split
from .vocabulary import (
    DEFAULT_CATEGORICAL_FIELDS,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_COUNT,
    DEFAULT_NUMERIC_FIELDS,
    EventVocabulary,
)


logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("TXFORMER_CACHE", Path.home() / ".cache" / "txformer"))
PREPARED_FOLDER = "prepared"
# Bump when the prepared data of the same inputs and settings changes (the package version is in the key too).
PREPARED_FORMAT_VERSION = 1
PREPARATION_FILE = "preparation.json"
DEFAULT_PART_BYTES = 32 << 20
DEFAULT_SHARD_ROWS = 1_000_000
# Bytes per CSV row, plain and compressed, for the default number of shards only: a wrong estimate changes the size
# of the shards, not the result.
ESTIMATED_CSV_ROW_BYTES = 45
ESTIMATED_COMPRESSED_ROW_BYTES = 10
COMPRESSED_CSV = {".gz": lambda raw: gzip.GzipFile(fileobj=raw), ".bz2": bz2.BZ2File}
NON_BLANK = re.compile(rb"\S")
# Grouped shards are stored in small record batches because the merge holds one batch of every shard at a time.
CUSTOMERS_PER_STORED_BATCH = 64
CUSTOMERS_PER_ENCODED_BATCH = 1000
SINGLE_DATA_FILE = "data-00000-of-00001.arrow"
# Next to the data files of a customers folder: the ids (and labels) of its customers, file by file.
INDEX_FILE = "customer_index.arrow"
INDEX_COLUMNS = ("customer_id", "labels")
# Fibonacci hashing: consecutive or patterned ids still spread evenly over the shards.
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class PreparedData:
    """The encoded training, held-out and (when asked) validation customers, memory-mapped; the vocabulary they are
    encoded with; the cache folder that holds them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    vocabulary: EventVocabulary
    directory: Path
    validation: datasets.Dataset | None = None


@dataclass
class EncodedCustomers:
    """Customers encoded with `vocabulary` (given, or fitted on them all), memory-mapped; the cache folder that holds
    them."""

    customers: datasets.Dataset
    vocabulary: EventVocabulary
    directory: Path


def transaction_files(transactions: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files named or matched by glob patterns (matches sorted), in the given order: CSV files (plain, `.gz` or
    `.bz2`) or Parquet files."""
    patterns = [transactions] if isinstance(transactions, (str, os.PathLike)) else list(transactions)
    files: list[Path] = []
    for pattern in map(str, patterns):
        matches = sorted(glob(pattern)) if any(char in pattern for char in "*?[") else [pattern]
        if not matches:
            raise FileNotFoundError(f"{pattern}: no file matches.")
        for path in map(Path, matches):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file.")
            if _file_format(path) is None:
                raise ValueError(f"{path}: not a transaction file (.csv, .csv.gz, .csv.bz2 or .parquet).")
            files.append(path.resolve())
    if len(set(files)) < len(files):
        raise ValueError(f"A transaction file is given twice: {[str(path) for path in files]}.")
    return files


def _file_format(path: Path) -> str | None:
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    if suffixes[-1:] == [".parquet"]:
        return "parquet"
    if suffixes[-1:] == [".csv"] or (suffixes[:1] == [".csv"] and suffixes[-1] in COMPRESSED_CSV):
        return "csv"
    return None


def prepare_customers(
    transactions: str | os.PathLike | Sequence[str | os.PathLike],
    labels_path: str | os.PathLike | None = None,
    keep_unlabelled: bool = False,
    drop_duplicates: bool = False,
    label_column: str = "gender",
    cache_dir: str | os.PathLike | None = None,
    num_shards: int | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> datasets.Dataset:
    """`build_customer_dataset` for many files and data larger than memory: the same rows (one per customer in
    ascending id order, events sorted by time, `labels` when `labels_path` is given), memory-mapped from a cache
    prepared on the first call. `num_shards` (default: from the input size) changes the memory used, not the rows."""
    directory = _prepare_customers_folder(
        transaction_files(transactions),
        labels_path,
        keep_unlabelled,
        drop_duplicates,
        label_column,
        Path(cache_dir or DEFAULT_CACHE),
        num_shards,
        part_bytes,
    )
    customer_ids = _customer_index(directory).column("customer_id").to_numpy()
    return datasets.load_from_disk(str(directory)).select(np.argsort(customer_ids), keep_in_memory=True)


def prepare_training_data(
    transactions: str | os.PathLike | Sequence[str | os.PathLike],
    labels_path: str | os.PathLike,
    eval_fraction: float = 0.1,
    split_seed: int = 42,
    max_train_customers: int | None = None,
    validation_size: Callable[[int], int] | None = None,
    vocabulary: EventVocabulary | None = None,
    categorical_fields: Sequence[str] = DEFAULT_CATEGORICAL_FIELDS,
    min_count: int = DEFAULT_MIN_COUNT,
    max_size: int | None = DEFAULT_MAX_SIZE,
    label_column: str = "gender",
    cache_dir: str | os.PathLike | None = None,
    num_shards: int | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> PreparedData:
    """The labelled customers split as training splits them in memory, encoded, memory-mapped from a cache prepared on
    the first call; each part in the order of the split (ascending customer id, but for a subsampled training part).

    The held-out part comes from `split_for_evaluation`. With `validation_size` (number of validation customers for a
    number of training customers), a validation part is split off the training part (stratified, `split_seed`). The
    vocabulary is `vocabulary` when given, else fitted on the training part (`categorical_fields`, `min_count`,
    `max_size`). Under
    `accelerate launch`, call it inside `TrainingArguments.main_process_first(local=False)`: the main process prepares
    while the others wait, then they find the cache and memory-map it."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    customers_directory = _prepare_customers_folder(
        transaction_files(transactions), labels_path, False, False, label_column, cache_dir, num_shards, part_bytes
    )
    parts = _training_parts(customers_directory, eval_fraction, split_seed, max_train_customers, validation_size)
    sorted_parts = {name: np.sort(ids) for name, ids in parts.items()}
    fit_settings = _fit_settings(categorical_fields, min_count, max_size)
    settings = {
        "customers": customers_directory.name,
        "parts": {name: hashlib.sha256(ids.tobytes()).hexdigest() for name, ids in sorted_parts.items()},
        "vocabulary": fit_settings if vocabulary is None else vocabulary.to_dict(),
    }
    directory = _cached(
        cache_dir / PREPARED_FOLDER / f"training-{_fingerprint(settings)}",
        lambda folder: {
            "settings": settings,
            **_encode_parts(folder, customers_directory, sorted_parts, "train", vocabulary, fit_settings),
        },
    )
    # Stored in ascending id order: row `searchsorted(sorted ids, id)` holds customer `id`.
    loaded = {
        name: _select_if_reordered(
            datasets.load_from_disk(str(directory / name)), np.searchsorted(sorted_parts[name], ids)
        )
        for name, ids in parts.items()
    }
    return PreparedData(
        train=loaded["train"],
        eval=loaded["eval"],
        vocabulary=EventVocabulary.from_pretrained(directory),
        directory=directory,
        validation=loaded.get("validation"),
    )


def prepare_encoded_customers(
    transactions: str | os.PathLike | Sequence[str | os.PathLike],
    vocabulary: EventVocabulary | None = None,
    customer_ids: Iterable[int] | None = None,
    categorical_fields: Sequence[str] = DEFAULT_CATEGORICAL_FIELDS,
    min_count: int = DEFAULT_MIN_COUNT,
    max_size: int | None = DEFAULT_MAX_SIZE,
    cache_dir: str | os.PathLike | None = None,
    num_shards: int | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> EncodedCustomers:
    """Every customer of the files, in ascending id order, encoded with a trained model's `vocabulary` (what prediction
    scores) or, without one, with a vocabulary fitted on them all (`categorical_fields`, `min_count`, `max_size`; what pretraining
    reads),
    memory-mapped from a cache prepared on the first call. `customer_ids` keeps only those customers (the cache holds
    them all); requested ids without transactions are reported, and none with transactions is an error."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    files = transaction_files(transactions)
    customers_directory = _prepare_customers_folder(
        files, None, False, False, "gender", cache_dir, num_shards, part_bytes
    )
    stored_ids = np.sort(_customer_index(customers_directory).column("customer_id").to_numpy())
    fit_settings = _fit_settings(categorical_fields, min_count, max_size)
    settings = {
        "customers": customers_directory.name,
        "vocabulary": fit_settings if vocabulary is None else vocabulary.to_dict(),
    }
    directory = _cached(
        cache_dir / PREPARED_FOLDER / f"encoded-{_fingerprint(settings)}",
        lambda folder: {
            "settings": settings,
            **_encode_parts(
                folder, customers_directory, {"customers": stored_ids}, "customers", vocabulary, fit_settings
            ),
        },
    )
    customers = datasets.load_from_disk(str(directory / "customers"))
    if customer_ids is not None:
        customers = _requested_customers(customers, stored_ids, customer_ids, _describe(files))
    return EncodedCustomers(customers, EventVocabulary.from_pretrained(directory), directory)


def _fit_settings(categorical_fields: Sequence[str], min_count: int, max_size: int | None) -> dict:
    """What a fitted vocabulary depends on, besides the customers: its fields and thresholds."""
    return {
        "categorical_fields": list(categorical_fields),
        "numeric_fields": list(DEFAULT_NUMERIC_FIELDS),
        "min_count": min_count,
        "max_size": max_size,
    }


def _select_if_reordered(dataset: datasets.Dataset, rows: np.ndarray) -> datasets.Dataset:
    """`dataset.select(rows)`, or `dataset` itself when `rows` are all its rows in order (no indices mapping)."""
    if np.array_equal(rows, np.arange(len(dataset))):
        return dataset
    return dataset.select(rows)


def _requested_customers(
    customers: datasets.Dataset, stored_ids: np.ndarray, customer_ids: Iterable[int], source: str
) -> datasets.Dataset:
    """The rows of `customers` (ids `stored_ids`, ascending) whose id is in `customer_ids`, as the reader keeps
    requested customers."""
    wanted = np.unique(np.asarray(list(customer_ids), dtype=np.int64))
    rows = np.flatnonzero(_is_in_sorted(stored_ids, wanted))
    _warn_absent(wanted, stored_ids[rows], "requested customers", source)
    if not len(rows):
        raise TransactionDataError(f"{source}: no transactions left for the requested customers.")
    return _select_if_reordered(customers, rows)


def _training_parts(
    customers_directory: Path,
    eval_fraction: float,
    split_seed: int,
    max_train_customers: int | None,
    validation_size: Callable[[int], int] | None,
) -> dict[str, np.ndarray]:
    """The customer ids of the `train`, `eval` and (with `validation_size`) `validation` parts in the order of the
    split, made as in memory: the same operations on the (id, label) rows in the same order, read from the customer
    index."""
    index = _customer_index(customers_directory).select(["customer_id", "labels"])
    labelled = datasets.Dataset(index.sort_by("customer_id"))
    train, held_out = split_for_evaluation(labelled, eval_fraction, split_seed, max_train_customers)
    parts = {"train": train, "eval": held_out}
    if validation_size is not None:
        parts["train"], parts["validation"] = stratified_split(
            train, test_size=validation_size(len(train)), seed=split_seed
        )
    return {name: part.with_format("arrow")["customer_id"].to_numpy() for name, part in parts.items()}


def _signature(path: str | os.PathLike) -> dict:
    """What identifies a file's content for the cache: its absolute path, size and modification time."""
    status = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _describe(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"


def _cached(directory: Path, build: Callable[[Path], dict]) -> Path:
    """`directory` if a previous call completed it; else `build` fills a new folder, renamed to `directory` at the end
    so that neither a crash nor a concurrent preparation leaves a folder that looks complete."""
    if (directory / PREPARATION_FILE).exists():
        logger.info("Using the prepared data in %s.", directory)
        return directory
    building = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    building.mkdir(parents=True)
    try:
        summary = build(building)
        atomic_write_json(building / PREPARATION_FILE, {"txformer": __version__, **summary})
        try:
            building.rename(directory)
        except OSError:
            if not (directory / PREPARATION_FILE).exists():
                raise
            logger.info("%s was prepared meanwhile by another process; using it.", directory)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    logger.info("Prepared %s.", directory)
    return directory


def _prepare_customers_folder(
    files: list[Path],
    labels_path: str | os.PathLike | None,
    keep_unlabelled: bool,
    drop_duplicates: bool,
    label_column: str,
    cache_dir: Path,
    num_shards: int | None,
    part_bytes: int,
) -> Path:
    """The cache folder of the grouped customers: a `save_to_disk` dataset with one data file per shard, each sorted
    by customer id."""
    settings = {
        "format": PREPARED_FORMAT_VERSION,
        "txformer": __version__,
        "files": [_signature(path) for path in files],
        "labels": None if labels_path is None else _signature(labels_path),
        # Without labels, the label settings change nothing: one folder for every spelling of them.
        "label_column": None if labels_path is None else label_column,
        "keep_unlabelled": labels_path is not None and keep_unlabelled,
        "drop_duplicates": drop_duplicates,
    }
    num_shards = num_shards or _default_num_shards(files)

    def build(folder: Path) -> dict:
        labels = None if labels_path is None else read_labels(labels_path, label_column=label_column)
        label_ids = None if labels is None else labels.column("customer_id").to_numpy()
        spill = folder / "spill"
        spill.mkdir()
        read = _partition(files, None if keep_unlabelled else label_ids, spill, num_shards, part_bytes)
        if read["num_rows"] == 0:
            raise TransactionDataError(
                f"{_describe(files)}: none of the {len(label_ids)} customers of {labels_path} has transactions "
                f"(e.g. {label_ids[:5].tolist()}): are these the matching files?"
            )
        if read["num_unlabelled"]:
            logger.info("%d customers of %s have no label and are left out.", read["num_unlabelled"], _describe(files))
        if labels is not None:
            _warn_absent(label_ids, read["customer_ids"], f"labelled customers of {labels_path}", _describe(files))
        grouped = _group_shards(folder, spill, num_shards, labels, drop_duplicates)
        shutil.rmtree(spill)
        if grouped["num_duplicates"]:
            logger.warning(
                "%s has %d exact duplicate rows (same customer, time, codes, amount and terminal); %s.",
                _describe(files),
                grouped["num_duplicates"],
                "dropped" if drop_duplicates else "kept as separate events",
            )
        return {"settings": settings, "num_shards": num_shards, "num_rows": read["num_rows"], **grouped}

    return _cached(cache_dir / PREPARED_FOLDER / f"customers-{_fingerprint(settings)}", build)


def _default_num_shards(files: list[Path]) -> int:
    """Shards of about `DEFAULT_SHARD_ROWS` rows, the rows estimated from the file sizes (Parquet: counted)."""
    num_rows = 0.0
    for path in files:
        if _file_format(path) == "parquet":
            num_rows += pq.ParquetFile(path).metadata.num_rows
        elif path.suffix.lower() in COMPRESSED_CSV:
            num_rows += path.stat().st_size / ESTIMATED_COMPRESSED_ROW_BYTES
        else:
            num_rows += path.stat().st_size / ESTIMATED_CSV_ROW_BYTES
    return max(1, math.ceil(num_rows / DEFAULT_SHARD_ROWS))


def _shard_of(customer_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of each row, from a hash of its customer id."""
    mixed = customer_ids.astype(np.uint64) * HASH_MULTIPLIER
    return ((mixed >> np.uint64(32)) % np.uint64(num_shards)).astype(np.int64)


def _partition(files: list[Path], keep_ids: np.ndarray | None, spill: Path, num_shards: int, part_bytes: int) -> dict:
    """Pass 1: the rows of every file, part by part in input order, appended to the shard files of their customers
    (only customers in `keep_ids` when given). Returns the rows written, the ids of the customers written (sorted)
    and the number of customers left out."""
    keep_set = None if keep_ids is None else pa.array(keep_ids, pa.int64())
    written_ids, left_out_ids, num_rows = [], [], 0
    total_bytes = sum(path.stat().st_size for path in files)
    with (
        ExitStack() as writers_stack,
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading transactions") as progress,
    ):
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        for path in files:
            for transactions in _read_parts(path, spill, part_bytes, progress):
                if keep_set is not None:
                    keep = pc.is_in(transactions.column("customer_id"), value_set=keep_set)
                    left_out = pc.filter(transactions.column("customer_id"), pc.invert(keep))
                    left_out_ids.append(np.unique(left_out.to_numpy()))
                    transactions = transactions.filter(keep)
                customer_ids = transactions.column("customer_id").to_numpy()
                written_ids.append(np.unique(customer_ids))
                shard = _shard_of(customer_ids, num_shards)
                order = np.argsort(shard, kind="stable")
                transactions = transactions.take(order)
                bounds = np.searchsorted(shard[order], np.arange(num_shards + 1))
                for index in np.flatnonzero(np.diff(bounds)):
                    if index not in writers:
                        sink = writers_stack.enter_context(pa.OSFile(str(_spill_file(spill, index)), "wb"))
                        writers[index] = writers_stack.enter_context(pa.ipc.new_stream(sink, transactions.schema))
                    writers[index].write_table(transactions.slice(bounds[index], bounds[index + 1] - bounds[index]))
                num_rows += transactions.num_rows
    return {
        "num_rows": num_rows,
        "customer_ids": np.unique(np.concatenate(written_ids)) if written_ids else np.zeros(0, np.int64),
        "num_unlabelled": len(np.unique(np.concatenate(left_out_ids))) if left_out_ids else 0,
    }


def _spill_file(spill: Path, index: int) -> Path:
    return spill / f"shard-{index:05d}.arrow"


def _read_parts(path: Path, spill: Path, part_bytes: int, progress: tqdm) -> Iterator[pa.Table]:
    """The transactions of one input file, part by part, each checked and parsed by `read_transactions`; errors are
    restated for the input file."""
    parts = (_parquet_parts if _file_format(path) == "parquet" else _csv_parts)(path, spill, part_bytes, progress)
    found = False
    try:
        for part, first_line in parts:
            try:
                transactions = read_transactions(part)
            except TransactionDataError as error:
                raise TransactionDataError(_in_source(str(error), part, path, first_line)) from None
            finally:
                part.unlink()
            found = True
            yield transactions
    except (OSError, EOFError, zlib.error) as error:
        if is_decoding_error(error):
            raise undecodable_file_error(path, error) from None
        raise
    if not found:
        if _file_format(path) == "csv":
            read_transactions(path)  # raises the reader's own error for a file without data rows
        raise TransactionDataError(f"{path}: the file has no transactions.")


def _in_source(message: str, part: Path, source: Path, first_line: int) -> str:
    """A reader message about a part restated for its input file: the part's line 1 is the file's header line and
    its line k > 1 the file's line `first_line + k - 2`."""

    def restated(match: re.Match) -> str:
        line = int(match[1])
        return f"{source} line {line if line == 1 else first_line + line - 2}"

    return re.sub(rf"{re.escape(str(part))} line (\d+)", restated, message).replace(str(part), str(source))


def _csv_parts(path: Path, spill: Path, part_bytes: int, progress: tqdm) -> Iterator[tuple[Path, int]]:
    """The data lines of a CSV file (decompressed), copied into part files of about `part_bytes` that start with the
    file's header line and end at a line end outside quotes; yields each part and the file line of its first row."""
    with open(path, "rb") as raw:
        decompress = COMPRESSED_CSV.get(path.suffix.lower())
        with decompress(raw) if decompress else nullcontext(raw) as text:
            header = text.readline()
            first_line, rest, position = 2, b"", 0
            while True:
                block = text.read(part_bytes)
                data = rest + block
                cut = _last_line_end(data) if block else len(data)
                if NON_BLANK.search(data, 0, cut):
                    part = spill / f"{path.name}.line-{first_line}.csv"
                    with open(part, "wb") as file:
                        file.write(header if header.endswith(b"\n") else header + b"\n")
                        file.write(memoryview(data)[:cut])
                    yield part, first_line
                first_line += data.count(b"\n", 0, cut)
                rest = data[cut:]
                progress.update(raw.tell() - position)
                position = raw.tell()
                if not block:
                    return


def _last_line_end(data: bytes) -> int:
    """Length of the longest prefix of `data` that ends with a line end outside double quotes (0 if none)."""
    if b'"' not in data:
        return data.rfind(b"\n") + 1
    codes = np.frombuffer(data, np.uint8)
    outside_quotes = np.cumsum(codes == ord('"'), dtype=np.uint8) % 2 == 0
    line_ends = np.flatnonzero((codes == ord("\n")) & outside_quotes)
    return int(line_ends[-1]) + 1 if line_ends.size else 0


def _parquet_parts(path: Path, spill: Path, part_bytes: int, progress: tqdm) -> Iterator[tuple[Path, int]]:
    """The rows of a Parquet file in batches written as CSV part files, so that they pass the same checks as CSV
    rows; row r (from 1) counts as line r + 1, below a header line."""
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
        raise TransactionDataError(f"{path}: not a readable Parquet file ({error})") from None
    columns = [name for name in TRANSACTION_COLUMNS if name in parquet.schema_arrow.names]
    num_rows, size = max(parquet.metadata.num_rows, 1), path.stat().st_size
    first_line = 2
    for batch in parquet.iter_batches(batch_size=max(1, part_bytes // ESTIMATED_CSV_ROW_BYTES), columns=columns):
        part = spill / f"{path.name}.line-{first_line}.csv"
        pa_csv.write_csv(batch, part)
        yield part, first_line
        first_line += batch.num_rows
        progress.update(size * batch.num_rows / num_rows)


def _group_shards(folder: Path, spill: Path, num_shards: int, labels: pa.Table | None, drop_duplicates: bool) -> dict:
    """Pass 2: each shard alone sorted by customer and time, grouped into one row per customer, labelled, and written
    to `folder` as a data file of a `save_to_disk` dataset."""
    data_files, index_parts, features = [], [], None
    num_events = num_duplicates = 0
    for index in tqdm(range(num_shards), desc="grouping customers", unit="shard"):
        if not _spill_file(spill, index).exists():
            continue
        with pa.OSFile(str(_spill_file(spill, index))) as source:
            transactions = pa.ipc.open_stream(source).read_all()
        _spill_file(spill, index).unlink()
        transactions = sort_by_customer_and_time(transactions)
        duplicate = duplicate_rows(transactions)
        num_duplicates += int(duplicate.sum())
        if drop_duplicates and duplicate.any():
            transactions = transactions.filter(pa.array(~duplicate))
        customers = group_sorted_by_customer(transactions)
        num_events += transactions.num_rows
        del transactions
        if labels is not None:
            customers = attach_labels(customers, labels)
        features = features or datasets.Features.from_arrow_schema(customers.schema)
        data_files.append(folder / f"shard-{index:05d}.arrow")
        _write_arrow(data_files[-1], [customers], features, CUSTOMERS_PER_STORED_BATCH)
        index_parts.append(
            customers.select([name for name in INDEX_COLUMNS if name in customers.column_names]).append_column(
                "data_file", pa.array(np.full(customers.num_rows, len(data_files) - 1, np.int32))
            )
        )
    names = [f"data-{number:05d}-of-{len(data_files):05d}.arrow" for number in range(len(data_files))]
    for path, name in zip(data_files, names, strict=True):
        path.rename(folder / name)
    _write_dataset_state(folder, names, features)
    index = pa.concat_tables(index_parts)
    with pa.OSFile(str(folder / INDEX_FILE), "wb") as sink, pa.ipc.new_file(sink, index.schema) as writer:
        writer.write_table(index)
    return {"num_customers": index.num_rows, "num_events": num_events, "num_duplicates": num_duplicates}


def _write_arrow(path: Path, tables: Iterator[pa.Table], features: datasets.Features, batch_rows: int) -> int:
    """Writes the tables as one data file of a `datasets` dataset, in record batches of `batch_rows`; returns the
    number of rows."""
    writer = ArrowWriter(features=features, path=str(path), writer_batch_size=batch_rows)
    try:
        for table in tables:
            writer.write_table(table)
        num_rows, _ = writer.finalize()
    finally:
        writer.close()
    return num_rows


class _SplitWriter:
    """Writes a one-file `save_to_disk` dataset batch by batch, its features taken from the first batch."""

    def __init__(self, folder: Path):
        self.folder, self.writer = folder, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.folder.mkdir()
            self.features = datasets.Features.from_arrow_schema(table.schema)
            self.writer = ArrowWriter(features=self.features, path=str(self.folder / SINGLE_DATA_FILE))
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is None:
            raise ValueError(f"No customer to write to {self.folder}.")
        self.writer.finalize()
        self.writer.close()
        _write_dataset_state(self.folder, [SINGLE_DATA_FILE], self.features)


def _write_dataset_state(folder: Path, data_files: list[str], features: datasets.Features) -> None:
    """The two JSON files of `Dataset.save_to_disk` next to data files written batch by batch, so that
    `datasets.load_from_disk(folder)` memory-maps them."""
    state = {
        "_data_files": [{"filename": name} for name in data_files],
        "_fingerprint": _fingerprint({"folder": str(folder), "files": data_files}),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = asdict(datasets.DatasetInfo(features=features))
    # Not sorted: the order of the features is the order of the columns.
    for name, payload in (
        (datasets.config.DATASET_STATE_JSON_FILENAME, state),
        (datasets.config.DATASET_INFO_FILENAME, info),
    ):
        atomic_write(folder / name, lambda file, payload=payload: json.dump(payload, file, indent=2))


def _data_files(folder: Path) -> list[Path]:
    state = json.loads((folder / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
    return [folder / entry["filename"] for entry in state["_data_files"]]


def _customer_index(folder: Path) -> pa.Table:
    """`customer_id`, `labels` (when labelled) and `data_file` (position in the folder's data files) of every customer
    of a customers folder, in data file order: what the split and the merge need, without reading the events."""
    with pa.OSFile(str(folder / INDEX_FILE)) as source:
        return pa.ipc.open_file(source).read_all()


def _ids_per_data_file(folder: Path) -> list[np.ndarray]:
    """The customer ids of each data file of a customers folder, in stored order."""
    index = _customer_index(folder)
    data_file = index.column("data_file").to_numpy()
    bounds = np.searchsorted(data_file, np.arange(len(_data_files(folder)) + 1))
    customer_ids = index.column("customer_id").to_numpy()
    return [customer_ids[start:end] for start, end in itertools.pairwise(bounds)]


def _read_stored(path: Path) -> pa.Table:
    """A whole stored data file, read without memory mapping (its pages do not stay in the resident size)."""
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def _is_in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Mask of the `values` found in the sorted array `sorted_set`."""
    position = np.minimum(np.searchsorted(sorted_set, values), max(len(sorted_set) - 1, 0))
    return sorted_set[position] == values if len(sorted_set) else np.zeros(len(values), dtype=bool)


def _encode_parts(
    folder: Path,
    customers_directory: Path,
    parts: dict[str, np.ndarray],
    fit_part: str,
    vocabulary: EventVocabulary | None,
    fit_settings: dict,
) -> dict:
    """Pass 3: the vocabulary (unless given) fitted on the `fit_part` part shard by shard, then one encoding pass that
    merges the shards into ascending customer id order and writes the dataset of each part (sorted ids)."""
    data_files = _data_files(customers_directory)
    if vocabulary is None:
        training_shards = (
            table.filter(_is_in_sorted(table.column("customer_id").to_numpy(), parts[fit_part]))
            for table in map(_read_stored, tqdm(data_files, desc="fitting the vocabulary", unit="shard"))
        )
        vocabulary = EventVocabulary.fit_tables(training_shards, **fit_settings)
    vocabulary.save_pretrained(folder)
    logger.info(
        "Encoding %s customers with %s: one pass over %d shards.",
        ", ".join(f"{len(ids)} {name}" for name, ids in parts.items()),
        vocabulary,
        len(data_files),
    )
    shard_ids = _ids_per_data_file(customers_directory)
    writers = {name: _SplitWriter(folder / name) for name in parts}
    for customers in tqdm(
        _in_id_order(data_files, shard_ids, CUSTOMERS_PER_ENCODED_BATCH),
        total=math.ceil(sum(map(len, shard_ids)) / CUSTOMERS_PER_ENCODED_BATCH),
        desc="encoding events",
        unit="batch",
    ):
        customer_ids = customers.column("customer_id").to_numpy()
        for name, ids in parts.items():
            selected = customers.filter(_is_in_sorted(customer_ids, ids))
            if selected.num_rows:
                writers[name].write(vocabulary.encode_table(selected))
    for writer in writers.values():
        writer.close()
    return {
        "parts": {name: len(ids) for name, ids in parts.items()},
        "vocab_sizes": dict(zip(vocabulary.categorical_fields, vocabulary.vocab_sizes, strict=True)),
    }


class _ShardCursor:
    """Reads a stored data file front to back (no memory map) and hands out its next rows."""

    def __init__(self, path: Path, stack: ExitStack):
        self.reader = pa.ipc.open_stream(stack.enter_context(pa.OSFile(str(path))))
        self.batches: list[pa.RecordBatch] = []
        self.num_buffered = 0

    def take(self, count: int) -> pa.Table:
        while self.num_buffered < count:
            self.batches.append(self.reader.read_next_batch())
            self.num_buffered += self.batches[-1].num_rows
        buffered = pa.Table.from_batches(self.batches, schema=self.reader.schema)
        self.batches, self.num_buffered = buffered.slice(count).to_batches(), self.num_buffered - count
        return buffered.slice(0, count)


def _in_id_order(data_files: list[Path], shard_ids: list[np.ndarray], batch_rows: int) -> Iterator[pa.Table]:
    """The customers of data files that are each sorted by id, merged into ascending id order, `batch_rows` at a
    time; each file is read once, front to back."""
    source = np.repeat(np.arange(len(data_files)), [len(ids) for ids in shard_ids])
    order = np.argsort(np.concatenate(shard_ids), kind="stable")
    with ExitStack() as stack:
        cursors = [_ShardCursor(path, stack) for path in data_files]
        for start in range(0, len(order), batch_rows):
            batch_source = source[order[start : start + batch_rows]]
            counts = np.bincount(batch_source, minlength=len(data_files))
            merged = pa.concat_tables([cursors[shard].take(counts[shard]) for shard in np.flatnonzero(counts)])
            # `merged` holds the rows shard by shard; row j of the batch is row position[j] of `merged`.
            position = np.empty(len(batch_source), dtype=np.int64)
            position[np.argsort(batch_source, kind="stable")] = np.arange(len(batch_source))
            yield merged.take(position)


@dataclass
class PreparationArguments:
    """What `scripts/prepare_data.py` prepares; the flags and defaults of `scripts/train.py`'s data arguments."""

    transactions: list[str] = field(
        metadata={"help": "Transaction files or glob patterns: CSV (plain, .gz, .bz2) or Parquet, in the real format."}
    )
    labels: str | None = field(
        default=None, metadata={"help": "customer_id,gender file: prepare the training data (split, vocabulary)."}
    )
    data_cache_dir: str = field(default=str(DEFAULT_CACHE), metadata={"help": "Cache root (env TXFORMER_CACHE)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share of labelled customers (stratified)."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out split."})
    max_train_customers: int | None = field(default=None, metadata={"help": "Subsample training customers."})
    num_shards: int | None = field(
        default=None, metadata={"help": f"Shards (default: about {DEFAULT_SHARD_ROWS:,} rows each)."}
    )
    part_bytes: int = field(default=DEFAULT_PART_BYTES, metadata={"help": "Bytes of input read at a time."})


def main(argv: list[str] | None = None) -> Path:
    """Command line: `python scripts/prepare_data.py --transactions FILES... [--labels gender_train.csv]`."""
    (args,) = HfArgumentParser(PreparationArguments).parse_args_into_dataclasses(args=argv)
    from ..cli import configure_logging  # here, not on top: the CLI module imports this package

    configure_logging()
    check_writable_folder(args.data_cache_dir, "--data_cache_dir")
    common = {"cache_dir": args.data_cache_dir, "num_shards": args.num_shards, "part_bytes": args.part_bytes}
    if args.labels is None:
        customers = prepare_customers(args.transactions, **common)
        directory = Path(customers.cache_files[0]["filename"]).parent
        print(f"{len(customers):,} customers prepared in {directory}")
        return directory
    prepared = prepare_training_data(
        args.transactions,
        args.labels,
        eval_fraction=args.eval_fraction,
        split_seed=args.split_seed,
        max_train_customers=args.max_train_customers,
        **common,
    )
    print(
        f"{len(prepared.train):,} training and {len(prepared.eval):,} held-out customers prepared in "
        f"{prepared.directory} ({prepared.vocabulary})"
    )
    return prepared.directory
