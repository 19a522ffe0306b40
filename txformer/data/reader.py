"""Reading the bank-transaction CSV files into one row per customer (vectorised pyarrow and numpy, no row loops)."""

import bz2
import csv
import gzip
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv


logger = logging.getLogger(__name__)

TRANSACTION_COLUMNS = ("customer_id", "tr_datetime", "mcc_code", "tr_type", "amount", "term_id")
TRANSACTION_COLUMN_TYPES = {
    "customer_id": pa.int64(),
    "tr_datetime": pa.string(),
    "mcc_code": pa.int64(),
    "tr_type": pa.int64(),
    "amount": pa.float64(),
    "term_id": pa.string(),
}
# Spellings of a missing value. In `term_id` they mean "no terminal"; in every other column they are an error.
MISSING_VALUE_STRINGS = ["", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A"]
DATETIME_PATTERN = r"^(?P<day>\d+) (?P<hour>\d{1,2}):(?P<minute>\d{2}):(?P<second>\d{2})$"
DATETIME_FIELDS = ("day", "hour", "minute", "second")
SECONDS_PER_DAY = 86400
EVENT_COLUMNS = ("event_time", "mcc_code", "tr_type", "term_id", "amount")
# A value pyarrow refused to convert is looked up again with these patterns to name its line.
NUMBER_PATTERNS = {
    pa.int64(): r"^[+-]?\d+$",
    pa.float64(): r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|Inf|INF|infinity|Infinity)$",
}


class TransactionDataError(ValueError):
    """A transaction or label file that cannot be read without guessing; the message names the file and line."""


def _open_text(path: Path):
    """Opens a plain, `.gz` or `.bz2` text file (the compressions pyarrow detects from the extension)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    return path


def _read_header(path: Path, required: Iterable[str]) -> list[str]:
    """The column names of the first line; an error names the missing or renamed ones."""
    with _open_text(path) as file:
        first_line = file.readline()
    if not first_line.strip():
        raise TransactionDataError(f"{path}: the file is empty (no header line).")
    header = [name.strip() for name in next(csv.reader([first_line]))]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise TransactionDataError(f"{path} line 1: duplicated column names {duplicated}.")
    missing = [name for name in required if name not in header]
    if missing:
        raise TransactionDataError(
            f"{path} line 1: missing column(s) {missing}; expected {list(required)}, found {header}."
        )
    return header


def _line_number(path: Path, row_index: int) -> int:
    """1-based line of data row `row_index` (0-based, header excluded), skipping empty lines as pyarrow does.
    Only called on the error path, so a plain scan is fine."""
    data_rows_seen = -1
    with _open_text(path) as file:
        for line_number, line in enumerate(file, start=1):
            if line_number > 1 and line.strip("\r\n"):
                data_rows_seen += 1
                if data_rows_seen == row_index:
                    return line_number
    raise IndexError(f"{path} has no data row {row_index}.")


def _first_invalid_row(path: Path, reason: str, invalid: pa.Array | np.ndarray) -> TransactionDataError:
    """An error naming the line of the first row flagged in the boolean `invalid` (and how many there are)."""
    invalid = np.asarray(invalid, dtype=bool)
    rows = np.flatnonzero(invalid)
    more = f" ({rows.size} rows in all)" if rows.size > 1 else ""
    return TransactionDataError(f"{path} line {_line_number(path, int(rows[0]))}: {reason}{more}.")


def _read_csv_strictly(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    """Reads the named columns with explicit types. A line with the wrong number of fields or a value that is not a
    number raises `TransactionDataError` with its line; other columns are ignored."""
    header = _read_header(path, column_types)
    bad_lines: list[str] = []

    def reject_row(row) -> str:
        bad_lines.append(
            f"{path} line {row.number if row.number is not None else '?'}: expected {row.expected_columns} "
            f"fields ({','.join(header)}), found {row.actual_columns}: {row.text!r}."
        )
        return "error"

    def read(use_threads: bool, types: dict[str, pa.DataType]) -> pa.Table:
        return pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(use_threads=use_threads, block_size=1 << 24),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=reject_row),
            convert_options=pa_csv.ConvertOptions(
                column_types=types,
                include_columns=list(column_types),
                null_values=MISSING_VALUE_STRINGS,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )

    try:
        return read(True, column_types)
    except pa.ArrowInvalid as error:
        if bad_lines:
            # Threaded parsing does not know line numbers: parse once more on one thread to name the line.
            bad_lines.clear()
            try:
                read(False, column_types)
            except pa.ArrowInvalid:
                pass
            raise TransactionDataError(bad_lines[0]) from error
        as_strings = read(True, dict.fromkeys(column_types, pa.string()))
        for name, data_type in column_types.items():
            if data_type in NUMBER_PATTERNS:
                values = as_strings.column(name)
                invalid = pc.and_(
                    pc.is_valid(values), pc.invert(pc.match_substring_regex(values, NUMBER_PATTERNS[data_type]))
                )
                if pc.any(invalid).as_py():
                    example = pc.filter(values, invalid)[0].as_py()
                    raise _first_invalid_row(path, f"{name} {example!r} is not a number", invalid) from error
        raise TransactionDataError(f"{path}: {error}") from error


def _require_values(path: Path, table: pa.Table, columns: Iterable[str]) -> None:
    for name in columns:
        if table.column(name).null_count:
            raise _first_invalid_row(path, f"{name} is missing", pc.is_null(table.column(name)))


def parse_event_time(path: Path, tr_datetime: pa.ChunkedArray) -> np.ndarray:
    """`"D HH:MM:SS"` strings to float64 days `D + (3600 h + 60 m + s) / 86400`; seconds may be 60 (real data has
    `454 10:54:60`), so no datetime parser is used. An unparseable value raises with its line."""
    parts = pc.extract_regex(tr_datetime.combine_chunks(), DATETIME_PATTERN)
    if parts.null_count:
        invalid = pc.is_null(parts)
        example = pc.filter(tr_datetime, invalid)[0].as_py()
        raise _first_invalid_row(path, f"tr_datetime {example!r} is not 'D HH:MM:SS'", invalid)
    day, hour, minute, second = (
        pc.cast(pc.struct_field(parts, name), pa.int64()).to_numpy() for name in DATETIME_FIELDS
    )
    out_of_range = (hour > 23) | (minute > 59) | (second > 60)
    if out_of_range.any():
        example = tr_datetime[int(np.flatnonzero(out_of_range)[0])].as_py()
        raise _first_invalid_row(
            path, f"tr_datetime {example!r} has an hour, minute or second out of range", out_of_range
        )
    return day + (3600 * hour + 60 * minute + second) / SECONDS_PER_DAY


def read_transactions(path: str | os.PathLike) -> pa.Table:
    """The transactions file as a flat table in file order: `customer_id` int64, `event_time` float64 (days),
    `mcc_code` int64, `tr_type` int64, `amount` float64 (raw, signed), `term_id` string (null = missing)."""
    path = _check_file(path)
    table = _read_csv_strictly(path, TRANSACTION_COLUMN_TYPES)
    if table.num_rows == 0:
        raise TransactionDataError(f"{path}: the file has a header but no transactions.")
    _require_values(path, table, ("customer_id", "tr_datetime", "mcc_code", "tr_type", "amount"))
    amount = table.column("amount").to_numpy()
    if not np.isfinite(amount).all():
        raise _first_invalid_row(path, "amount is not finite", ~np.isfinite(amount))
    event_time = parse_event_time(path, table.column("tr_datetime"))
    term_id = pc.utf8_trim_whitespace(table.column("term_id"))
    term_id = pc.if_else(pc.equal(term_id, ""), pa.scalar(None, pa.string()), term_id)
    return pa.table(
        {
            "customer_id": table.column("customer_id"),
            "event_time": pa.array(event_time, pa.float64()),
            "mcc_code": table.column("mcc_code"),
            "tr_type": table.column("tr_type"),
            "amount": table.column("amount"),
            "term_id": term_id,
        }
    )


def read_labels(path: str | os.PathLike, label_column: str = "gender") -> pa.Table:
    """A label file (`customer_id,gender` in the real data) as `customer_id` int64, `labels` int64. Duplicated ids,
    missing labels and labels outside {0, 1} raise `TransactionDataError` naming the line."""
    path = _check_file(path)
    table = _read_csv_strictly(path, {"customer_id": pa.int64(), label_column: pa.float64()})
    if table.num_rows == 0:
        raise TransactionDataError(f"{path}: the file has a header but no labels.")
    _require_values(path, table, ("customer_id", label_column))
    labels = table.column(label_column).to_numpy()
    not_binary = (labels != 0) & (labels != 1)
    if not_binary.any():
        raise _first_invalid_row(path, f"{label_column} {labels[not_binary][0]:g} is not 0 or 1", not_binary)
    customer_ids = _unique_customer_ids(path, table)
    return pa.table({"customer_id": pa.array(customer_ids, pa.int64()), "labels": pa.array(labels.astype(np.int64))})


def read_customer_ids(path: str | os.PathLike) -> np.ndarray:
    """The `customer_id` column of a CSV file (e.g. the Kaggle sample submission), in file order. A missing column,
    an empty file, a missing, non-integer or repeated id raise `TransactionDataError` naming the line."""
    path = _check_file(path)
    table = _read_csv_strictly(path, {"customer_id": pa.int64()})
    if table.num_rows == 0:
        raise TransactionDataError(f"{path}: the file has a header but no customer ids.")
    _require_values(path, table, ("customer_id",))
    return _unique_customer_ids(path, table)


def _unique_customer_ids(path: Path, table: pa.Table) -> np.ndarray:
    """The `customer_id` column; an id that appears twice raises with the line of its second occurrence."""
    customer_ids = table.column("customer_id").to_numpy()
    order = np.argsort(customer_ids, kind="stable")
    repeated = np.zeros(len(customer_ids), dtype=bool)
    repeated[order[1:]] = customer_ids[order[1:]] == customer_ids[order[:-1]]
    if repeated.any():
        raise _first_invalid_row(path, f"customer_id {customer_ids[repeated][0]} appears more than once", repeated)
    return customer_ids


def sort_by_customer_and_time(transactions: pa.Table) -> pa.Table:
    """Rows sorted by customer then `event_time`, ties in file order (a stable sort; skipped when already sorted)."""
    customer_ids = transactions.column("customer_id").to_numpy()
    event_time = transactions.column("event_time").to_numpy()
    same_customer = customer_ids[1:] == customer_ids[:-1]
    in_order = (customer_ids[1:] > customer_ids[:-1]) | (same_customer & (event_time[1:] >= event_time[:-1]))
    if in_order.all():
        return transactions
    return transactions.take(np.lexsort((event_time, customer_ids)))


def duplicate_rows(sorted_transactions: pa.Table) -> np.ndarray:
    """Mask of the rows equal in every column to an earlier row (the first occurrence is not flagged), in a table
    sorted by customer and time. Only rows sharing customer and time with a neighbour can be duplicates, so only
    those are compared in full."""
    customer_ids = sorted_transactions.column("customer_id").to_numpy()
    event_time = sorted_transactions.column("event_time").to_numpy()
    tied_with_next = (customer_ids[1:] == customer_ids[:-1]) & (event_time[1:] == event_time[:-1])
    candidate = np.zeros(len(customer_ids), dtype=bool)
    candidate[1:] |= tied_with_next
    candidate[:-1] |= tied_with_next
    duplicate = np.zeros(len(customer_ids), dtype=bool)
    rows = np.flatnonzero(candidate)
    if rows.size == 0:
        return duplicate
    term_codes = pc.dictionary_encode(sorted_transactions.column("term_id").take(rows)).combine_chunks()
    keys = [
        customer_ids[rows],
        event_time[rows],
        sorted_transactions.column("mcc_code").to_numpy()[rows],
        sorted_transactions.column("tr_type").to_numpy()[rows],
        sorted_transactions.column("amount").to_numpy()[rows],
        pc.fill_null(term_codes.indices, -1).to_numpy(),
    ]
    # Sorted by every key, then by row, so the earliest row of a group of equal rows comes first.
    order = np.lexsort([rows, *keys[::-1]])
    same_as_previous = np.ones(rows.size - 1, dtype=bool)
    for key in keys:
        same_as_previous &= key[order[1:]] == key[order[:-1]]
    duplicate[rows[order[1:]][same_as_previous]] = True
    return duplicate


def group_sorted_by_customer(sorted_transactions: pa.Table) -> pa.Table:
    """One row per customer with the event columns as lists, from a table sorted by customer and time; the lists
    are built from offsets, with no loop over customers."""
    customer_ids = sorted_transactions.column("customer_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, customer_ids[1:] != customer_ids[:-1]])
    offsets = pa.array(np.r_[starts, len(customer_ids)], pa.int32())
    columns = {"customer_id": pa.array(customer_ids[starts], pa.int64())}
    for name in EVENT_COLUMNS:
        columns[name] = pa.ListArray.from_arrays(offsets, sorted_transactions.column(name).combine_chunks())
    return pa.table(columns)


def _keep_customers(transactions: pa.Table, customer_ids: np.ndarray) -> pa.Table:
    return transactions.filter(pc.is_in(transactions.column("customer_id"), value_set=pa.array(customer_ids)))


def _warn_absent(customer_ids: np.ndarray, present: np.ndarray, what: str, transactions_path: Path) -> None:
    absent = np.setdiff1d(customer_ids, present)
    if absent.size:
        logger.warning(
            "%d %s have no transactions in %s and are left out (e.g. %s).",
            absent.size,
            what,
            transactions_path,
            absent[:5].tolist(),
        )


def build_customer_dataset(
    transactions_path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    customer_ids: Iterable[int] | None = None,
    keep_unlabelled: bool = False,
    drop_duplicates: bool = False,
    label_column: str = "gender",
) -> datasets.Dataset:
    """One row per customer: `customer_id`, list columns `event_time`, `mcc_code`, `tr_type`, `term_id`, `amount`
    sorted by time, and `labels` when `labels_path` is given.

    With labels, customers without a label are dropped (kept with a null label when `keep_unlabelled`), and labelled
    ids without transactions are reported and dropped. `customer_ids` keeps only those customers. Exact duplicate
    rows are kept (they can be genuine repeated payments) and counted in a warning; `drop_duplicates` removes them.
    """
    transactions_path = _check_file(transactions_path)
    transactions = read_transactions(transactions_path)
    if customer_ids is not None:
        wanted = np.unique(np.asarray(list(customer_ids), dtype=np.int64))
        transactions = _keep_customers(transactions, wanted)
        _warn_absent(
            wanted, np.unique(transactions.column("customer_id").to_numpy()), "requested customers", transactions_path
        )
    labels = None
    if labels_path is not None:
        labels = read_labels(labels_path, label_column=label_column)
        label_ids = labels.column("customer_id").to_numpy()
        if not keep_unlabelled:
            num_customers = pc.count_distinct(transactions.column("customer_id")).as_py()
            transactions = _keep_customers(transactions, label_ids)
            if transactions.num_rows == 0:
                raise TransactionDataError(
                    f"{transactions_path}: none of the {len(label_ids)} customers of {labels_path} has transactions "
                    f"(e.g. {label_ids[:5].tolist()}): are these the matching files?"
                )
            num_unlabelled = num_customers - pc.count_distinct(transactions.column("customer_id")).as_py()
            if num_unlabelled:
                logger.info("%d customers of %s have no label and are left out.", num_unlabelled, transactions_path)
    if transactions.num_rows == 0:
        raise TransactionDataError(f"{transactions_path}: no transactions left for the requested customers.")

    transactions = sort_by_customer_and_time(transactions)
    duplicate = duplicate_rows(transactions)
    if duplicate.any():
        logger.warning(
            "%s has %d exact duplicate rows (same customer, time, codes, amount and terminal); %s.",
            transactions_path,
            int(duplicate.sum()),
            "dropped" if drop_duplicates else "kept as separate events",
        )
        if drop_duplicates:
            transactions = transactions.filter(pa.array(~duplicate))
    customers = group_sorted_by_customer(transactions)

    if labels is not None:
        customer_ids_present = customers.column("customer_id").to_numpy()
        expected_ids = label_ids if customer_ids is None else np.intersect1d(label_ids, wanted)
        _warn_absent(expected_ids, customer_ids_present, f"labelled customers of {labels_path}", transactions_path)
        customers = attach_labels(customers, labels)
        if customers.column("labels").null_count:
            logger.info(
                "%d customers without a label in %s are kept (null label).",
                customers.column("labels").null_count,
                labels_path,
            )
    return datasets.Dataset(customers)


def attach_labels(customers: pa.Table, labels: pa.Table) -> pa.Table:
    """`customers` (one row per customer) with a `labels` column from a `read_labels` table, null where a customer
    has no label."""
    label_ids, customer_ids = labels.column("customer_id").to_numpy(), customers.column("customer_id").to_numpy()
    label_order = np.argsort(label_ids)
    sorted_label_ids = label_ids[label_order]
    position = np.clip(np.searchsorted(sorted_label_ids, customer_ids), 0, len(label_ids) - 1)
    has_label = sorted_label_ids[position] == customer_ids
    values = labels.column("labels").to_numpy()[label_order][position]
    return customers.append_column("labels", pa.array(values, pa.int64(), mask=~has_label))


def customer_table(dataset: datasets.Dataset) -> pa.Table:
    """The arrow table of a dataset's rows in their current order (after any `select`, `shuffle` or split)."""
    return dataset.with_format("arrow")[:]


def list_offsets_and_values(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, pa.Array]:
    """Offsets (int64, from 0) and the flat values of a list column, so per-event work is one vectorised pass."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], values
