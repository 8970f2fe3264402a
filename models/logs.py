"""Interaction logs in the formats people have → `Interactions` (original user and item ids as
strings, optional unix-second timestamps), each a plain function on plain arrays (numpy +
stdlib + pyarrow, no torch).

`load_interactions` reads SASRec-style `user item` sequence files ("ml1m-seq"), MovieLens-100K
`u.data` ("movielens-100k"), MovieLens-1M `ratings.dat` ("grouplens-dat"), CSV ("csv"; with a
header, or columns by position) and its tab-separated twin ("tsv"), Parquet ("parquet") and JSON
lines ("jsonl": one object per line, as Amazon Reviews and Yelp ship); `detect_format` picks one
from the file name and first line. Epoch times in milliseconds, microseconds or nanoseconds
(Amazon Reviews 2023 has milliseconds) are read as such and kept in seconds. All ratings are
kept as implicit interactions; rating values are dropped.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

Format = Literal["auto", "ml1m-seq", "movielens-100k", "grouplens-dat", "csv", "tsv", "parquet", "jsonl"]
FORMATS: tuple[str, ...] = get_args(Format)

# Column names recognised in CSV/Parquet headers and JSON keys, compared lower-case without "_"
# and "-", first match wins (Amazon Reviews 2023: user_id, parent_asin, timestamp in ms; 2018:
# reviewerID, asin, unixReviewTime; Yelp: user_id, business_id, date).
_USER_NAMES = ("userid", "user", "uid", "visitorid", "customerid", "reviewerid")
_ITEM_NAMES = ("movieid", "itemid", "item", "movie", "iid", "productid", "parentasin", "asin", "businessid",
               "trackid", "bookid", "isbn")
_TIME_NAMES = ("timestamp", "ts", "time", "datetime", "eventtime", "unixreviewtime", "date")
# An epoch time column's unit, from its largest magnitude: seconds reach 1e11 only in the year
# 5138, milliseconds pass 1e11 in 1973 (and so on down): (threshold, units per second).
_EPOCH_UNITS = ((1e17, 1_000_000_000, "ns"), (1e14, 1_000_000, "us"), (1e11, 1_000, "ms"))


# --------------------------------------------------------------------------------------------
# Interactions and loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interactions:
    """A log of (user, item, time) events, in file order.

    users:      [E] str (numpy unicode) original user ids.
    items:      [E] str (numpy unicode) original item ids.
    timestamps: [E] int64 unix seconds, or None when the source has no times (file order is
                then the chronological order).
    Inputs of other dtypes (ints, object arrays) are converted with `str` on construction.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", as_str_array(self.users))
        object.__setattr__(self, "items", as_str_array(self.items))
        if self.timestamps is not None:
            object.__setattr__(self, "timestamps", np.asarray(self.timestamps, dtype=np.int64))
        lengths = {len(self.users), len(self.items)}
        if self.timestamps is not None:
            lengths.add(len(self.timestamps))
        if len(lengths) != 1 or self.users.ndim != 1 or self.items.ndim != 1:
            raise ValueError(
                f"users, items and timestamps must be 1-D of equal length, got {lengths}"
            )

    def __len__(self) -> int:
        return len(self.users)


def load_interactions(
    path: str | os.PathLike,
    fmt: Format = "auto",
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
) -> Interactions:
    """Read an interaction log. Files may be gzip-compressed.

    fmt:
      "ml1m-seq":      `UserID MovieID` per line (space or tab separated, no header), lines in
                       chronological order per user: the SASRec data format (e.g. its
                       `ml-1m.txt`). Timestamps are None and file order is kept exactly.
      "movielens-100k": MovieLens-100K `u.data` (and `u1.base`, `ua.test`, ...):
                       `user item rating timestamp` per line, tab (or any whitespace)
                       separated, no header, unix-second timestamps. Ratings are dropped.
      "grouplens-dat": official `ratings.dat`, `UserID::MovieID::Rating::Timestamp` (latin-1).
      "csv":           a header row; user/item/time columns detected by name (userId, user_id,
                       movieId, item_id, timestamp, ts, ...) unless given. Times may be unix
                       seconds or ISO-8601 strings (naive times are read as UTC). Without a
                       time column, timestamps are None. Without a header row, the columns
                       are given by 0-based position (``user_col="1"``).
      "tsv":           the same, tab-separated (e.g. Gowalla's check-ins, Last.fm 1K).
      "parquet":       same column logic as csv.
      "jsonl":         one JSON object per line (JSON lines / NDJSON, e.g. Amazon Reviews,
                       Yelp); same column logic as csv; other keys are ignored.
      "auto":          decided from the file name and a sniff of the first line
                       (see `detect_format`).
    Raises ValueError for unknown formats, missing columns and bad lines (with line number).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("ml1m-seq", "movielens-100k", "grouplens-dat") and (
        user_col or item_col or time_col
    ):
        raise ValueError(f"column names apply to csv, tsv, parquet and jsonl only, not {fmt!r}")
    if fmt == "ml1m-seq":
        users, items = _read_token_table(path, ncols=2)
        return Interactions(_decode(users, "utf-8"), _decode(items, "utf-8"))
    if fmt == "movielens-100k":
        users, items, _, times = _read_token_table(path, ncols=4)
        return Interactions(
            _decode(users, "utf-8"),
            _decode(items, "utf-8"),
            _parse_ints(times, path, "timestamp"),
        )
    if fmt == "grouplens-dat":
        users, items, _, times = _read_token_table(path, ncols=4, sep=b"::")
        return Interactions(
            _decode(users, "latin-1"),
            _decode(items, "latin-1"),
            _parse_ints(times, path, "timestamp"),
        )
    if fmt in ("csv", "tsv"):
        return _load_csv(path, user_col, item_col, time_col, delimiter="," if fmt == "csv" else "\t")
    if fmt == "jsonl":
        return _load_jsonl(path, user_col, item_col, time_col)
    return _load_parquet(path, user_col, item_col, time_col)


COLUMN_ROLES = ("user", "item", "time")


def parse_columns(spec: str | None) -> dict[str, str]:
    """``"user=reviewerID,item=asin,time=unixReviewTime"`` → ``load_interactions``' keyword
    arguments (``user_col=...``); any role may be left out, ``None`` or ``""`` gives ``{}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        role, sep, name = (x.strip() for x in part.partition("="))
        if not sep or role not in COLUMN_ROLES or not name:
            raise ValueError(f"bad column mapping {part!r}: expected ROLE=NAME with ROLE one of {COLUMN_ROLES}, "
                             f"e.g. user=reviewerID,item=asin,time=unixReviewTime")
        if f"{role}_col" in out:
            raise ValueError(f"column mapping names {role!r} twice")
        out[f"{role}_col"] = name
    return out


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of `path` from its name, then from its first line.

    By name (a trailing ".gz" ignored): *.parquet / *.pq → "parquet", *.csv → "csv", *.tsv →
    "tsv", *.jsonl / *.ndjson / *.json → "jsonl". Otherwise by the first line: "{" → "jsonl"; "::" →
    "grouplens-dat"; "," → "csv"; four tab-separated
    integer fields → "movielens-100k"; two whitespace-separated fields (spaces or tabs) →
    "ml1m-seq". Anything else raises ValueError listing the formats to pass as fmt=.
    """
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    with open_binary(path) as f:
        first = f.readline(4096).decode("latin-1").strip()
    if first.startswith("{"):
        return "jsonl"
    if "::" in first:
        return "grouplens-dat"
    if "," in first:
        return "csv"
    tab_fields = first.split("\t")
    if len(tab_fields) == 4 and all(_is_int(field.strip()) for field in tab_fields):
        return "movielens-100k"
    if len(first.split()) == 2:
        return "ml1m-seq"
    raise ValueError(
        f"{path}: cannot detect the format from first line {first!r}; "
        f"pass fmt= one of {FORMATS[1:]}"
    )


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def open_binary(path: Path):
    """A file, or its gzip-decompressed content when it is gzipped (told by its first bytes)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_token_table(path: Path, ncols: int, sep: bytes | None = None) -> list[np.ndarray]:
    """Split a text file into `ncols` [E] bytes arrays; fields split on ASCII whitespace or `sep`.

    Vectorised: the per-line field count is checked on the raw bytes, then the whole file is
    split once. A line with the wrong number of fields raises ValueError with its line number.
    """
    with open_binary(path) as f:
        original = f.read()
    raw = original.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n"
    if sep is not None:
        raw = raw.replace(sep, b" ")  # so fields may not contain blanks; they make a bad line
    byte = np.frombuffer(raw, dtype=np.uint8)
    newline = byte == 10
    blank = newline | (byte == 32) | (byte == 9) | (byte == 13) | (byte == 11) | (byte == 12)
    token_start = ~blank
    token_start[1:] &= blank[:-1]
    line_end = np.flatnonzero(newline)
    counts = np.bincount(
        np.searchsorted(line_end, np.flatnonzero(token_start)), minlength=len(line_end)
    )
    bad = np.flatnonzero(counts != ncols)
    if bad.size:
        line_no = int(bad[0])
        text = original.split(b"\n")[line_no].rstrip(b"\r").decode("latin-1")
        raise ValueError(
            f"{path}: line {line_no + 1}: expected {ncols} fields, got {counts[line_no]}: {text!r}"
        )
    tokens = raw.split()
    return [np.array(tokens[j::ncols]) for j in range(ncols)]


def _decode(column: np.ndarray, encoding: str) -> np.ndarray:
    """[E] bytes → [E] str; the fast ASCII path first."""
    try:
        return column.astype(np.str_)
    except UnicodeDecodeError:
        return np.char.decode(column, encoding)


def _parse_ints(column: np.ndarray, path: Path, what: str) -> np.ndarray:
    """[E] bytes/str → [E] int64, naming the first bad line on failure."""
    try:
        return column.astype(np.int64)
    except ValueError:
        for i, value in enumerate(_decode(column, "latin-1").tolist()):
            try:
                int(value)
            except ValueError:
                raise ValueError(
                    f"{path}: line {i + 1}: {what} {value!r} is not an integer"
                ) from None
        raise


def as_str_array(values) -> np.ndarray:
    """Any 1-D-ish collection of ids (iterables included) → numpy unicode array."""
    if not isinstance(values, (np.ndarray, list, tuple, str)):
        values = list(values)
    array = np.asarray(values)
    if array.dtype.kind == "U":
        return array
    if array.dtype.kind == "S":
        return _decode(array, "utf-8")
    return array.astype(np.str_)


def _resolve_columns(
    names: list[str], path: Path, user_col: str | None, item_col: str | None, time_col: str | None
) -> tuple[str, str, str | None]:
    def pick(
        given: str | None, candidates: tuple[str, ...], role: str, required: bool
    ) -> str | None:
        if given is not None:
            if given not in names:
                raise ValueError(f"{path}: no {role} column {given!r}; columns are {names}")
            return given
        normalised = {n.lower().replace("_", "").replace("-", ""): n for n in reversed(names)}
        for candidate in candidates:
            if candidate in normalised:
                return normalised[candidate]
        if required:
            raise ValueError(f"{path}: cannot find a {role} column among {names}; pass {role}_col= "
                             f"(--columns {role}=NAME; a CSV without a header takes 0-based positions, "
                             f"e.g. --columns item=0,user=1,time=3)")
        return None

    user = pick(user_col, _USER_NAMES, "user", True)
    item = pick(item_col, _ITEM_NAMES, "item", True)
    time = pick(time_col, _TIME_NAMES, "time", False)
    if time is None:
        log.info("%s: no time column; file order is taken as chronological", path)
    return user, item, time


def _load_csv(
    path: Path, user_col: str | None, item_col: str | None, time_col: str | None, delimiter: str = ","
) -> Interactions:
    """A header row names the columns; without one (Amazon's ratings-only files:
    ``item,user,rating,timestamp``), the caller gives 0-based positions (``user_col="1"``)."""
    with open_binary(path) as f:
        header = next(csv.reader([f.readline().decode("utf-8-sig")], delimiter=delimiter), [])
    given = [c for c in (user_col, item_col, time_col) if c is not None]
    # positions, unless the first line names every one of them (a header of "0", "1", ...)
    headerless = bool(given) and all(c.isdigit() for c in given) and not all(c in header for c in given)
    if headerless:
        header = [str(i) for i in range(len(header))]
    user, item, time = _resolve_columns(header, path, user_col, item_col, time_col)
    columns = [c for c in (user, item, time) if c is not None]
    options = pa_csv.ConvertOptions(
        column_types={user: pa.string(), item: pa.string()},
        include_columns=columns,
        strings_can_be_null=False,
    )
    read = pa_csv.ReadOptions(column_names=header) if headerless else None
    try:
        table = pa_csv.read_csv(path, read_options=read, parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                                convert_options=options)
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: {_locate_csv_error(path, len(header), delimiter)}{error}") from None
    return _from_table(table, path, user, item, time, first_row=1 if headerless else 2, row_word="line")


def _locate_csv_error(path: Path, ncols: int, delimiter: str = ",") -> str:
    """Find the first record with the wrong number of fields (error path only)."""
    with open_binary(path) as f:
        reader = csv.reader((line.decode("utf-8", "replace") for line in f), delimiter=delimiter)
        for record in reader:
            if len(record) != ncols:
                return f"line {reader.line_num}: expected {ncols} fields, got {len(record)}: "
    return ""


def _load_jsonl(
    path: Path, user_col: str | None, item_col: str | None, time_col: str | None
) -> Interactions:
    """Only the user, item and time keys are parsed, with the types of the first line's values;
    the others (review texts, images...) are skipped, so a review file takes the memory of its
    three columns, not of its text."""
    with open_binary(path) as f:
        first = f.readline()
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line 1 is not a JSON object: {first[:120]!r}")
        user, item, time = _resolve_columns(list(record), path, user_col, item_col, time_col)
        schema = pa.schema([(c, _json_type(record[c], path, c)) for c in (user, item, time) if c is not None])
        f.seek(0)
        options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        try:
            table = pa_json.read_json(f, parse_options=options)
        except pa.ArrowInvalid as error:
            raise ValueError(f"{path}: {error}") from None
    return _from_table(table, path, user, item, time, first_row=1, row_word="line")


def _json_type(value: object, path: Path, key: str) -> pa.DataType:
    """The Arrow type of a JSON id or time column, from its first line's value."""
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, int) and not isinstance(value, bool):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    raise ValueError(f"{path}: line 1: {key!r} is {json.dumps(value)[:40]}, not a string or a number")


def _load_parquet(
    path: Path, user_col: str | None, item_col: str | None, time_col: str | None
) -> Interactions:
    names = pq.read_schema(path).names
    user, item, time = _resolve_columns(names, path, user_col, item_col, time_col)
    table = pq.read_table(path, columns=[c for c in (user, item, time) if c is not None])
    return _from_table(table, path, user, item, time, first_row=0, row_word="row")


def _from_table(
    table: pa.Table,
    path: Path,
    user: str,
    item: str,
    time: str | None,
    first_row: int,
    row_word: str,
) -> Interactions:
    """first_row: the line/row number of the table's first record, for error messages."""
    ids = []
    for name in (user, item):
        column = table.column(name)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{path}: {row_word} {row + first_row}: missing {name!r}")
        values = as_str_array(column.cast(pa.string()).to_numpy(zero_copy_only=False))
        empty = np.flatnonzero(values == "")
        if empty.size:
            raise ValueError(f"{path}: {row_word} {int(empty[0]) + first_row}: empty {name!r}")
        ids.append(values)
    timestamps = None
    if time is not None:
        timestamps = _to_unix_seconds(
            table.column(time), f"{path}: {row_word} {{}}: {time!r}", first_row
        )
    return Interactions(ids[0], ids[1], timestamps)


_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _to_unix_seconds(column: pa.ChunkedArray, where: str, first_row: int) -> np.ndarray:
    """Arrow ints, floats, dates, timestamps or ISO-8601/numeric strings → [E] int64 seconds."""
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(where.format(row + first_row) + " is missing")
    kind = column.type
    if pa.types.is_integer(kind):
        return _epoch_seconds(column.to_numpy().astype(np.int64))
    if pa.types.is_floating(kind):
        return _epoch_seconds(np.floor(column.to_numpy()).astype(np.int64))
    if pa.types.is_date(kind):
        column, kind = column.cast(pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(kind):
        return column.cast(pa.int64()).to_numpy() // _UNIT_PER_SECOND[kind.unit]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values, inverse = np.unique(
            as_str_array(column.to_numpy(zero_copy_only=False)), return_inverse=True
        )
        seconds = np.empty(len(values), dtype=np.int64)
        for j, text in enumerate(values.tolist()):
            try:
                seconds[j] = _parse_time(text)
            except ValueError:
                row = int(np.flatnonzero(inverse == j)[0])
                raise ValueError(
                    where.format(row + first_row) + f": cannot parse time {text!r}"
                ) from None
        return seconds[inverse]
    raise ValueError(where.format(first_row) + f": unsupported time type {kind}")


def epoch_unit(largest: float) -> tuple[int, str]:
    """(units per second, unit) of epoch times whose largest magnitude is ``largest``
    (``_EPOCH_UNITS``): ``(1, "s")`` below 1e11, ``(1000, "ms")`` below 1e14, and so on."""
    for threshold, per_second, unit in _EPOCH_UNITS:
        if largest >= threshold:
            return per_second, unit
    return 1, "s"


def _epoch_seconds(values: np.ndarray) -> np.ndarray:
    """Epoch times [E] int64 in the unit their magnitude says (``epoch_unit``) → seconds."""
    largest = int(np.abs(values).max(initial=0))
    per_second, unit = epoch_unit(largest)
    if per_second > 1:
        log.info("epoch times in %s (largest %d): read as seconds", unit, largest)
    return values // per_second


def _parse_time(text: str) -> int:
    """Unix seconds (int or float text) or ISO-8601; naive ISO times are taken as UTC."""
    text = text.strip()
    try:
        return int(np.floor(float(text)))
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(np.floor(moment.timestamp()))
