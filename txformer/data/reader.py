"""Reading the bank-transaction CSV files into one row per customer (vectorised pyarrow and numpy, no row loops)."""

import bz2
import csv
import gzip
import io
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

# The same parsing rules as the processor that scores raw rows without this package.
from ..processing_txformer import (
    DATETIME_PATTERN,
    FLOAT_PATTERN,
    INTEGER_PATTERN,
    MAX_DAY_DIGITS,
    MAX_NUMERIC_MAGNITUDE,
    MISSING_VALUE_STRINGS,
    SECONDS_PER_DAY,
)


logger = logging.getLogger(__name__)

TRANSACTION_COLUMNS = ("customer_id", "tr_datetime", "mcc_code", "tr_type", "amount", "term_id")
# Ids are read as text and converted by `_integer_ids`, which sees how each one is written.
TRANSACTION_COLUMN_TYPES = {
    "customer_id": pa.string(),
    "tr_datetime": pa.string(),
    "mcc_code": pa.int64(),
    "tr_type": pa.int64(),
    "amount": pa.float64(),
    "term_id": pa.string(),
}
DATETIME_FIELDS = ("day", "hour", "minute", "second")
EVENT_COLUMNS = ("event_time", "mcc_code", "tr_type", "term_id", "amount")
INT64_MAX_TEXT = str(np.iinfo(np.int64).max)
# Separators of other CSV dialects, named in the error for a header that is one column.
OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}
# The first bytes of a Parquet file.
PARQUET_MAGIC = b"PAR1"
# pyarrow's message for text that is not UTF-8.
INVALID_UTF8_MESSAGE = "invalid UTF8"
# pyarrow's message for a value it cannot convert: the column (its index in the file) and the value.
CONVERSION_ERROR_PATTERN = re.compile(
    r"In CSV column #(\d+): CSV conversion error to \w+: invalid value '(.*)'$", re.S
)


class TransactionDataError(ValueError):
    """A transaction or label file that cannot be read without guessing; the message names the file and line."""


def _open_binary(path: Path):
    """Opens a plain, `.gz` or `.bz2` file for reading bytes (the compressions pyarrow detects from the extension)."""
    return {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)(path, "rb")


def _open_text(path: Path):
    """Opens a plain, `.gz` or `.bz2` file as text to count its lines (bytes that are not UTF-8 are replaced)."""
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="replace", newline="")


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    return path


def is_decoding_error(error: BaseException) -> bool:
    """Whether `error` says that a file's bytes do not decode (a compressed file cut short or not compressed as its
    name says, bytes that are not UTF-8), rather than that the file cannot be opened or written."""
    if isinstance(error, (EOFError, UnicodeDecodeError, zlib.error)):
        return True
    return isinstance(error, OSError) and error.errno is None and error.filename is None


def undecodable_file_error(path: Path, error: BaseException | None = None) -> TransactionDataError:
    """The error for a file whose bytes do not decode as CSV text, saying what the file is likely to be; `error` is
    the decoding error (`is_decoding_error`), None for binary data."""
    with open(path, "rb") as file:
        start = file.read(len(PARQUET_MAGIC))
    if start == PARQUET_MAGIC:
        return TransactionDataError(f"{path}: a Parquet file; this command reads CSV files (plain, .gz or .bz2).")
    if error is None or isinstance(error, UnicodeDecodeError):
        return TransactionDataError(f"{path} line 1: not UTF-8 text: is it a CSV file?")
    return TransactionDataError(
        f"{path}: cannot be decompressed ({error}): a file cut short, or not compressed as its name says?"
    )


def _first_line_not_utf8(path: Path) -> TransactionDataError:
    """The error naming the first line of a text file that is not UTF-8 (another encoding, such as cp1251)."""
    with _open_binary(path) as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return TransactionDataError(
                    f"{path} line {number}: not UTF-8 text ({line[error.start : error.end]!r} in {line[:80]!r}); "
                    "save the file as UTF-8."
                )
    return TransactionDataError(f"{path}: not UTF-8 text; save the file as UTF-8.")


def _read_header(path: Path, required: Iterable[str]) -> dict[str, str]:
    """The column names of the first line, stripped of surrounding spaces, each mapped to its spelling in the file;
    an error names the missing or renamed ones."""
    try:
        with _open_binary(path) as file:
            first_bytes = file.readline()
        first_line = first_bytes.decode("utf-8-sig")
    except Exception as error:
        if is_decoding_error(error):
            raise undecodable_file_error(path, error) from None
        raise
    if first_bytes.startswith(PARQUET_MAGIC) or b"\0" in first_bytes:
        raise undecodable_file_error(path)
    if not first_line.strip():
        raise TransactionDataError(f"{path}: the file is empty (no header line).")
    written = next(csv.reader([first_line]))
    header = [name.strip() for name in written]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise TransactionDataError(f"{path} line 1: duplicated column names {duplicated}.")
    missing = [name for name in required if name not in header]
    if missing:
        separators = [name for separator, name in OTHER_SEPARATORS.items() if separator in first_line]
        hint = (
            f" (separated by {separators[0]}? files must be comma-separated)"
            if separators and len(header) == 1
            else ""
        )
        raise TransactionDataError(
            f"{path} line 1: missing column(s) {missing}; expected {list(required)}, found {header}{hint}."
        )
    return dict(zip(header, written, strict=True))


def _line_numbers(path: Path, row_indices: list[int]) -> list[int]:
    """The 1-based line where each data row starts (0-based row indices, header excluded). Rows are counted as pyarrow
    counts them: blank lines are skipped and a quoted newline continues its row. Only called on error paths, so a
    plain scan is fine."""
    wanted = sorted(set(row_indices))
    found: dict[int, int] = {}
    with _open_text(path) as file:
        reader = csv.reader(file)
        data_row, next_line = -1, 1
        try:
            for record in reader:
                start, next_line = next_line, reader.line_num + 1
                if start > 1 and record:
                    data_row += 1
                    if data_row == wanted[len(found)]:
                        found[data_row] = start
                        if len(found) == len(wanted):
                            break
        except csv.Error as error:
            raise TransactionDataError(f"{path} line {reader.line_num}: {error}.") from error
    if len(found) < len(wanted):
        raise IndexError(f"{path} has no data row {wanted[len(found)]}.")
    return [found[row] for row in row_indices]


def _first_invalid_row(path: Path, reason: str, invalid: pa.Array | np.ndarray) -> TransactionDataError:
    """An error naming the line of the first row flagged in the boolean `invalid` (and how many there are)."""
    invalid = np.asarray(invalid, dtype=bool)
    rows = np.flatnonzero(invalid)
    more = f" ({rows.size} rows in all)" if rows.size > 1 else ""
    (line,) = _line_numbers(path, [int(rows[0])])
    return TransactionDataError(f"{path} line {line}: {reason}{more}.")


def _read_csv_strictly(path: Path, column_types: dict[str, pa.DataType]) -> pa.Table:
    """Reads the named columns with explicit types (header names may have spaces around them). A line with the wrong
    number of fields or a value that does not convert raises `TransactionDataError` with its line; other columns are
    ignored."""
    spelled = _read_header(path, column_types)
    header = list(spelled)
    bad_rows: list = []

    def reject_row(row) -> str:
        bad_rows.append(row)
        return "error"

    def read(use_threads: bool, types: dict[str, pa.DataType]) -> pa.Table:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(use_threads=use_threads, block_size=1 << 24),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=reject_row, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                column_types={spelled[name]: data_type for name, data_type in types.items()},
                include_columns=[spelled[name] for name in types],
                null_values=list(MISSING_VALUE_STRINGS),
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        return table.rename_columns(list(types))

    try:
        return read(True, column_types)
    except OSError as error:
        if is_decoding_error(error):
            raise undecodable_file_error(path, error) from None
        raise
    except pa.ArrowInvalid as error:
        if INVALID_UTF8_MESSAGE in str(error):
            raise _first_line_not_utf8(path) from None
        if bad_rows:
            # Threaded parsing does not know row numbers: parse once more on one thread to name the line.
            bad_rows.clear()
            try:
                read(False, column_types)
            except pa.ArrowInvalid:
                pass
            row = bad_rows[0]
            # pyarrow numbers rows from the header (1), skipping blank lines.
            line = "?" if row.number is None else _line_numbers(path, [row.number - 2])[0]
            raise TransactionDataError(
                f"{path} line {line}: expected {row.expected_columns} fields ({','.join(header)}), found "
                f"{row.actual_columns}: {row.text!r}."
            ) from error
        raise _conversion_error(path, header, column_types, error, read) from error


def _conversion_error(
    path: Path,
    header: list[str],
    column_types: dict[str, pa.DataType],
    error: pa.ArrowInvalid,
    read: Callable[[bool, dict[str, pa.DataType]], pa.Table],
) -> TransactionDataError:
    """The error for a value pyarrow could not convert, naming its line, column and the value pyarrow quoted."""
    found = CONVERSION_ERROR_PATTERN.search(str(error))
    name = header[int(found.group(1))] if found else None
    if name not in column_types:
        return TransactionDataError(f"{path}: {error}")
    value = found.group(2)
    values = read(True, dict.fromkeys(column_types, pa.string())).column(name)
    invalid = pc.fill_null(pc.equal(values, value), False)
    if not pc.any(invalid).as_py():
        return TransactionDataError(f"{path}: {error}")
    reason = _why_not_an_integer(value) if pa.types.is_integer(column_types[name]) else "is not a number"
    return _first_invalid_row(path, f"{name} {value!r} {reason}", invalid)


def _why_not_an_integer(text: str) -> str:
    """What is wrong with a value that should be a 64-bit integer."""
    if re.fullmatch(INTEGER_PATTERN, text.strip()):
        return "does not fit in a 64-bit integer"
    if re.fullmatch(FLOAT_PATTERN, text):
        return "is not an integer (digits with an optional leading '-')"
    return "is not a number"


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
    too_late = pc.utf8_length(pc.utf8_ltrim(pc.struct_field(parts, "day"), characters="0")).to_numpy() > MAX_DAY_DIGITS
    if too_late.any():
        example = tr_datetime[int(np.flatnonzero(too_late)[0])].as_py()
        raise _first_invalid_row(
            path, f"tr_datetime {example!r} has a day index beyond {10**MAX_DAY_DIGITS - 1:,}", too_late
        )
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
    customer_ids = _integer_ids(path, table.column("customer_id"))
    amount = table.column("amount").to_numpy()
    if not np.isfinite(amount).all():
        raise _first_invalid_row(path, "amount is not finite", ~np.isfinite(amount))
    too_large = np.abs(amount) > MAX_NUMERIC_MAGNITUDE
    if too_large.any():
        raise _first_invalid_row(
            path,
            f"amount {amount[too_large][0]:g} is beyond ±{MAX_NUMERIC_MAGNITUDE:g}, the float32 range of the model",
            too_large,
        )
    event_time = parse_event_time(path, table.column("tr_datetime"))
    term_id = pc.utf8_trim_whitespace(table.column("term_id"))
    term_id = pc.if_else(pc.equal(term_id, ""), pa.scalar(None, pa.string()), term_id)
    # A quoted value may hold a line break; one that holds whole rows is a quote left open.
    swallowed_rows = pc.fill_null(pc.match_substring_regex(term_id, r"\n.*,"), False).to_numpy(zero_copy_only=False)
    if swallowed_rows.any():
        raise _first_invalid_row(
            path,
            "a quote opened in term_id runs over the following lines (a closing quote is missing)",
            swallowed_rows,
        )
    return pa.table(
        {
            "customer_id": customer_ids,
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
    table = _read_csv_strictly(path, {"customer_id": pa.string(), label_column: pa.float64()})
    if table.num_rows == 0:
        raise TransactionDataError(f"{path}: the file has a header but no labels.")
    _require_values(path, table, ("customer_id", label_column))
    labels = table.column(label_column).to_numpy()
    not_binary = (labels != 0) & (labels != 1)
    if not_binary.any():
        raise _first_invalid_row(path, f"{label_column} {labels[not_binary][0]:g} is not 0 or 1", not_binary)
    customer_ids = _unique_customer_ids(path, table)
    return pa.table({"customer_id": customer_ids, "labels": pa.array(labels.astype(np.int64))})


def read_customer_ids(path: str | os.PathLike) -> np.ndarray:
    """The `customer_id` column of a CSV file (e.g. the Kaggle sample submission), in file order. A missing column,
    an empty file, a missing, non-integer or repeated id raise `TransactionDataError` naming the line."""
    path = _check_file(path)
    table = _read_csv_strictly(path, {"customer_id": pa.string()})
    if table.num_rows == 0:
        raise TransactionDataError(f"{path}: the file has a header but no customer ids.")
    _require_values(path, table, ("customer_id",))
    return _unique_customer_ids(path, table).to_numpy()


def _unique_customer_ids(path: Path, table: pa.Table) -> pa.Array:
    """The `customer_id` column as int64; an id that appears twice raises with the line of its second occurrence."""
    customer_ids = _integer_ids(path, table.column("customer_id"))
    values = customer_ids.to_numpy()
    order = np.argsort(values, kind="stable")
    repeated = np.zeros(len(values), dtype=bool)
    repeated[order[1:]] = values[order[1:]] == values[order[:-1]]
    if repeated.any():
        raise _first_invalid_row(path, f"customer_id {values[repeated][0]} appears more than once", repeated)
    return customer_ids


def _integer_ids(path: Path, texts: pa.ChunkedArray) -> pa.Array:
    """`customer_id` text to int64. An id that is not an integer or does not fit in 64 bits raises with its line, and
    so do two spellings of one integer (`073598595` and `73598595`), which would otherwise merge two customers."""
    encoded = pc.dictionary_encode(pc.utf8_trim_whitespace(texts.combine_chunks()))
    spellings, row_codes = encoded.dictionary, encoded.indices.to_numpy()
    is_integer = pc.match_substring_regex(spellings, INTEGER_PATTERN).to_numpy(zero_copy_only=False)
    digits = pc.utf8_ltrim(spellings, characters="-0")
    num_digits = pc.utf8_length(digits).to_numpy()
    fits = (num_digits < len(INT64_MAX_TEXT)) | (
        (num_digits == len(INT64_MAX_TEXT)) & pc.less_equal(digits, INT64_MAX_TEXT).to_numpy(zero_copy_only=False)
    )
    invalid = ~(is_integer & fits)
    if invalid.any():
        spelling = spellings[row_codes[np.flatnonzero(invalid[row_codes])[0]]].as_py()
        reason = _why_not_an_integer(spelling)
        raise _first_invalid_row(path, f"customer_id {spelling!r} {reason}", invalid[row_codes])
    values = pc.cast(spellings, pa.int64())
    numbers = values.to_numpy()
    order = np.argsort(numbers, kind="stable")
    collides = numbers[order[1:]] == numbers[order[:-1]]
    if collides.any():
        codes = [int(order[:-1][collides][0]), int(order[1:][collides][0])]
        lines = _line_numbers(path, [int(np.argmax(row_codes == code)) for code in codes])
        first, second = (spellings[code].as_py() for code in codes)
        raise TransactionDataError(
            f"{path} line {lines[0]}: customer_id {first!r} and line {lines[1]}: {second!r} are the same integer "
            f"{numbers[codes[0]]}; ids are read as integers, so they would merge two customers. Write each id one way."
        )
    unusual = pc.invert(pc.equal(pc.cast(values, pa.string()), spellings)).to_numpy(zero_copy_only=False)
    if unusual.any():
        code = int(np.flatnonzero(unusual)[0])
        logger.warning(
            "%s: %d customer ids are written with leading zeros (e.g. %r); ids are integers, so outputs write that "
            "one as %d.",
            path,
            int(unusual.sum()),
            spellings[code].as_py(),
            numbers[code],
        )
    return pc.take(values, encoded.indices)


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
