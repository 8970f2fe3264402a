"""Interaction logs → dense item ids → per-user chronological sequences → leave-one-out split.

The pipeline, each step a plain function on plain arrays (numpy + stdlib + pyarrow, no torch):

1. `load_interactions` reads a log in one of the supported formats into `Interactions`
   (original user and item ids as strings, optional unix-second timestamps): SASRec-style
   `user item` sequence files ("ml1m-seq"), MovieLens-100K `u.data` ("movielens-100k"),
   MovieLens-1M `ratings.dat` ("grouplens-dat"), CSV with a header ("csv"), Parquet ("parquet")
   and JSON lines ("jsonl": one object per line, as Amazon Reviews and Yelp ship); `detect_format`
   picks one from the file name and first line. Epoch times in milliseconds, microseconds or
   nanoseconds (Amazon Reviews 2023 has milliseconds) are read as such and kept in seconds.
2. `IdMap` maps original item ids to dense ids 1..N in order of first appearance; 0 is padding.
3. `build_sequences` groups events by user into chronological `SequenceData`.
4. `leave_one_out` cuts the last two events of each user into validation and test rows
   (the SASRec/HSTU protocol).

All ratings are kept as implicit interactions; rating values are dropped.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
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

Format = Literal["auto", "ml1m-seq", "movielens-100k", "grouplens-dat", "csv", "parquet", "jsonl"]
FORMATS: tuple[str, ...] = get_args(Format)

ML1M_SEQUENCE_FILE = Path("ml-1m") / "ml-1m_sequences_original_ids.txt.gz"

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
        object.__setattr__(self, "users", _as_str_array(self.users))
        object.__setattr__(self, "items", _as_str_array(self.items))
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
                       time column, timestamps are None.
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
        raise ValueError(f"column names apply to csv and parquet only, not {fmt!r}")
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
    if fmt == "csv":
        return _load_csv(path, user_col, item_col, time_col)
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

    By name (a trailing ".gz" ignored): *.parquet / *.pq → "parquet", *.csv → "csv", *.jsonl /
    *.ndjson / *.json → "jsonl". Otherwise by the first line: "{" → "jsonl"; "::" →
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
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    with _open_binary(path) as f:
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


def _open_binary(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_token_table(path: Path, ncols: int, sep: bytes | None = None) -> list[np.ndarray]:
    """Split a text file into `ncols` [E] bytes arrays; fields split on ASCII whitespace or `sep`.

    Vectorised: the per-line field count is checked on the raw bytes, then the whole file is
    split once. A line with the wrong number of fields raises ValueError with its line number.
    """
    with _open_binary(path) as f:
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


def _as_str_array(values) -> np.ndarray:
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
            raise ValueError(f"{path}: cannot find a {role} column among {names}; pass {role}_col=")
        return None

    user = pick(user_col, _USER_NAMES, "user", True)
    item = pick(item_col, _ITEM_NAMES, "item", True)
    time = pick(time_col, _TIME_NAMES, "time", False)
    if time is None:
        log.info("%s: no time column; file order is taken as chronological", path)
    return user, item, time


def _load_csv(
    path: Path, user_col: str | None, item_col: str | None, time_col: str | None
) -> Interactions:
    with _open_binary(path) as f:
        header = next(csv.reader([f.readline().decode("utf-8-sig")]), [])
    user, item, time = _resolve_columns(header, path, user_col, item_col, time_col)
    columns = [c for c in (user, item, time) if c is not None]
    options = pa_csv.ConvertOptions(
        column_types={user: pa.string(), item: pa.string()},
        include_columns=columns,
        strings_can_be_null=False,
    )
    try:
        table = pa_csv.read_csv(path, convert_options=options)
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: {_locate_csv_error(path, len(header))}{error}") from None
    return _from_table(table, path, user, item, time, first_row=2, row_word="line")


def _locate_csv_error(path: Path, ncols: int) -> str:
    """Find the first record with the wrong number of fields (error path only)."""
    with _open_binary(path) as f:
        reader = csv.reader(line.decode("utf-8", "replace") for line in f)
        for record in reader:
            if len(record) != ncols:
                return f"line {reader.line_num}: expected {ncols} fields, got {len(record)}: "
    return ""


def _load_jsonl(
    path: Path, user_col: str | None, item_col: str | None, time_col: str | None
) -> Interactions:
    with _open_binary(path) as f:
        first = f.readline()
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line 1 is not a JSON object: {first[:120]!r}")
        names = list(record)
        user, item, time = _resolve_columns(names, path, user_col, item_col, time_col)
        f.seek(0)
        try:
            table = pa_json.read_json(f)
        except pa.ArrowInvalid as error:
            raise ValueError(f"{path}: {error}") from None
    missing = [c for c in (user, item, time) if c is not None and c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no {missing[0]!r} in the records")
    return _from_table(table, path, user, item, time, first_row=1, row_word="line")


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
        values = _as_str_array(column.cast(pa.string()).to_numpy(zero_copy_only=False))
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
            _as_str_array(column.to_numpy(zero_copy_only=False)), return_inverse=True
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


def _epoch_seconds(values: np.ndarray) -> np.ndarray:
    """Epoch times [E] int64 in the unit their magnitude says (``_EPOCH_UNITS``) → seconds."""
    largest = int(np.abs(values).max(initial=0))
    for threshold, per_second, unit in _EPOCH_UNITS:
        if largest >= threshold:
            log.info("epoch times in %s (largest %d): read as seconds", unit, largest)
            return values // per_second
    return values


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


# --------------------------------------------------------------------------------------------
# Dense item ids
# --------------------------------------------------------------------------------------------


class IdMap:
    """Original item ids (str) ↔ dense ids 1..N; 0 is reserved for padding.

    `items[k]` gets dense id k + 1. Lookups are vectorised with a sorted copy and
    `np.searchsorted`.
    """

    FORMAT = "persrec.idmap/1"

    def __init__(self, items: Iterable[str]):
        vocab = _as_str_array(items)
        if vocab.ndim != 1:
            raise ValueError("IdMap items must be 1-D")
        order = np.argsort(vocab, kind="stable")
        self._items = vocab
        self._sorted = vocab[order]
        self._sorted_ids = order.astype(np.int64) + 1
        duplicate = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if duplicate.size:
            raise ValueError(f"duplicate item id {self._sorted[duplicate[0]]!r}")

    @classmethod
    def from_items(cls, items: Iterable[str]) -> IdMap:
        """Dense ids in order of first appearance in `items` (deterministic)."""
        array = _as_str_array(items)
        _, first = np.unique(array, return_index=True)
        return cls(array[np.sort(first)])

    @property
    def num_items(self) -> int:
        """N; dense ids run 1..N, so an embedding table needs N + 1 rows."""
        return len(self._items)

    @property
    def items(self) -> np.ndarray:
        """[N] str original ids, index k holding dense id k + 1 (a copy)."""
        return self._items.copy()

    def __len__(self) -> int:
        return self.num_items

    def __contains__(self, item: object) -> bool:
        return bool(self.encode([str(item)], unknown=0)[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self._items, other._items)

    def __repr__(self) -> str:
        return f"IdMap(num_items={self.num_items}, fingerprint={self.fingerprint()[:12]})"

    def encode(self, items: Iterable[str], unknown: int | None = None) -> np.ndarray:
        """Original ids (any shape; non-str converted with `str`) → int64 dense ids, same shape.

        unknown: the id to return for ids not in the map; None (default) raises KeyError.
        """
        query = _as_str_array(items)
        flat = query.ravel()
        n = self.num_items
        if n == 0:
            found = np.zeros(flat.shape, dtype=bool)
            ids = np.zeros(flat.shape, dtype=np.int64)
        else:
            pos = np.minimum(np.searchsorted(self._sorted, flat), n - 1)
            found = self._sorted[pos] == flat
            ids = self._sorted_ids[pos]
        if not found.all():
            if unknown is None:
                missing = flat[~found]
                raise KeyError(f"{len(missing)} unknown item id(s), first {missing[0]!r}")
            ids = np.where(found, ids, np.int64(unknown))
        return ids.reshape(query.shape)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Dense ids (flattened) → original ids; ids outside 1..N (0 included) raise KeyError."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        bad = flat[(flat < 1) | (flat > self.num_items)]
        if bad.size:
            raise KeyError(f"dense id {int(bad[0])} is outside 1..{self.num_items}")
        return self._items[flat - 1].tolist()

    def translate(self, ids: Iterable[int], to: IdMap) -> tuple[np.ndarray, np.ndarray]:
        """Dense ids of this map -> ``to``'s dense ids (0 where ``to`` lacks the item), and the
        mask of those it has: a memory's stored items, read by another model."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        if to is self or self == to:
            return flat.copy(), np.ones(flat.shape, bool)
        new = to.encode(self.decode(flat), unknown=0) if flat.size else np.zeros(0, np.int64)
        return new, new > 0

    def to_json(self) -> str:
        """Canonical JSON: same map, same bytes."""
        content = {"format": self.FORMAT, "items": self._items.tolist()}
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IdMap:
        content = json.loads(text)
        if not isinstance(content, dict) or content.get("format") != cls.FORMAT:
            raise ValueError(f"not an IdMap document (expected format {cls.FORMAT!r})")
        return cls(content["items"])

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> IdMap:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON; identifies the id space a model was trained on."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Sequences and the leave-one-out split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceData:
    """Per-user chronological sequences; index u refers to the same user in every field.

    user_ids:   [U] original user ids, in order of first appearance in the log.
    items:      U arrays of int64 dense item ids, oldest first.
    timestamps: U arrays of int64 unix seconds aligned with `items`, or None.
    """

    user_ids: list[str]
    items: list[np.ndarray]
    timestamps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> np.ndarray:
        """[U] int64 number of events per user."""
        return np.fromiter((len(s) for s in self.items), dtype=np.int64, count=len(self.items))


def k_core(inter: Interactions, k: int) -> Interactions:
    """The interactions whose user and whose item each have at least ``k`` of them, cut again
    until both hold (the k-core: SASRec's and most papers' preprocessing of Amazon-style logs,
    k = 5). File order is kept; ``k <= 1`` keeps everything."""
    if k <= 1:
        return inter
    users = np.unique(inter.users, return_inverse=True)[1]
    items = np.unique(inter.items, return_inverse=True)[1]
    keep = np.ones(len(inter), bool)
    while True:
        enough = (np.bincount(users[keep], minlength=users.max(initial=0) + 1)[users] >= k) & (
            np.bincount(items[keep], minlength=items.max(initial=0) + 1)[items] >= k)
        if not (keep & ~enough).any():
            break
        keep &= enough
    if not keep.any():
        raise ValueError(f"no interaction is left in the {k}-core (every user or item has fewer than {k})")
    ts = None if inter.timestamps is None else inter.timestamps[keep]
    return Interactions(inter.users[keep], inter.items[keep], ts)


def build_sequences(
    interactions: Interactions, id_map: IdMap | None = None
) -> tuple[SequenceData, IdMap]:
    """Group events by user, oldest first.

    Events are stably sorted by timestamp when there are timestamps, so ties (and logs without
    times) keep file order. Users come in order of first appearance. Without `id_map`, one is
    built from the items in order of first appearance; with it, an unknown item raises KeyError.
    The per-user arrays are views into one array.
    """
    if id_map is None:
        id_map = IdMap.from_items(interactions.items)
    dense = id_map.encode(interactions.items)
    if len(interactions) == 0:
        return SequenceData([], [], None if interactions.timestamps is None else []), id_map
    users, first, inverse = np.unique(interactions.users, return_index=True, return_inverse=True)
    rank = np.empty(len(users), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(users))
    group = rank[inverse.ravel()]  # [E] user position in order of first appearance
    order = np.arange(len(interactions))
    if interactions.timestamps is not None:
        order = np.argsort(interactions.timestamps, kind="stable")
    order = order[np.argsort(group[order], kind="stable")]
    bounds = np.cumsum(np.bincount(group))[:-1]
    user_ids = interactions.users[np.sort(first)].tolist()
    items = np.split(dense[order], bounds)
    timestamps = None
    if interactions.timestamps is not None:
        timestamps = np.split(interactions.timestamps[order], bounds)
    return SequenceData(user_ids, items, timestamps), id_map


@dataclass(frozen=True)
class EvalRows:
    """One (history → next item) row per evaluated user.

    user_index: [R] int64 index into the SequenceData the rows were cut from.
    history:    R int64 arrays of dense item ids, oldest first.
    history_ts: R int64 arrays of unix seconds, or None.
    target:     [R] int64 dense id of the item to predict.
    target_ts:  [R] int64 unix seconds of the target event, or None.
    """

    user_index: np.ndarray
    history: list[np.ndarray]
    history_ts: list[np.ndarray] | None
    target: np.ndarray
    target_ts: np.ndarray | None

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class Split:
    """The leave-one-out views; `train` keeps every user at its index in the source data."""

    train: SequenceData
    valid: EvalRows
    test: EvalRows


MIN_EVAL_LENGTH = 3


def leave_one_out(seqs: SequenceData) -> Split:
    """The SASRec/HSTU leave-one-out protocol.

    For a user with >= 3 events s[0..n-1]:
      train: s[:-2] (a model trains on next-item targets inside it),
      valid: history s[:-2] → target s[-2],
      test:  history s[:-1] → target s[-1].
    A user with fewer than 3 events stays whole in train and has no valid/test row, as in
    SASRec's data partition. Arrays are views of `seqs`, not copies.
    """
    has_ts = seqs.timestamps is not None
    long_enough = (seqs.lengths() >= MIN_EVAL_LENGTH).tolist()
    eligible = np.flatnonzero(long_enough)

    def train_part(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [a[:-2] if ok else a for a, ok in zip(arrays, long_enough, strict=True)]

    def rows(cut: int) -> EvalRows:
        """History s[:-cut] → target s[-cut]."""
        items = [seqs.items[u] for u in eligible]
        stamps = [seqs.timestamps[u] for u in eligible] if has_ts else None
        return EvalRows(
            user_index=eligible.astype(np.int64),
            history=[s[:-cut] for s in items],
            history_ts=[t[:-cut] for t in stamps] if has_ts else None,
            target=np.array([s[-cut] for s in items], dtype=np.int64),
            target_ts=np.array([t[-cut] for t in stamps], dtype=np.int64) if has_ts else None,
        )

    train = SequenceData(
        list(seqs.user_ids),
        train_part(seqs.items),
        train_part(seqs.timestamps) if has_ts else None,
    )
    return Split(train, valid=rows(2), test=rows(1))


def all_but_test(seqs: SequenceData) -> SequenceData:
    """Training data of the published HSTU protocol: each user's events but the test target
    (``s[:-1]`` for users with a test row, the whole sequence for the others)."""
    has_ts = seqs.timestamps is not None
    keep = lambda arrays: [a[:-1] if len(a) >= MIN_EVAL_LENGTH else a for a in arrays]  # noqa: E731
    return SequenceData(list(seqs.user_ids), keep(seqs.items), keep(seqs.timestamps) if has_ts else None)


# --------------------------------------------------------------------------------------------
# Where the data lives, and a synthetic stand-in
# --------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """$PERSREC_DATA_DIR, else `../shared/data` relative to the repository root."""
    override = os.environ.get("PERSREC_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def default_dataset_path() -> Path | None:
    """The ML-1M sequence file under `data_dir()`, or None when it is not there."""
    path = data_dir() / ML1M_SEQUENCE_FILE
    return path if path.is_file() else None


class _Wander:
    """The synthetic sets' item chain. Items fall into contiguous clusters (about sqrt(I)/2). From
    item i a user moves, per step: p=0.6 to succ(i), a fixed random successor (the learnable
    sequential pattern); p=0.3 to a popularity-skewed (Zipf) item of the same cluster; p=0.1 to
    a popularity-skewed item anywhere."""

    def __init__(self, num_items: int, rng: np.random.Generator) -> None:
        self.num_items, self.rng = num_items, rng
        num_clusters = max(1, math.isqrt(num_items) // 2)
        self.cluster_of = np.arange(num_items) * num_clusters // num_items
        self.cluster_start = np.searchsorted(self.cluster_of, np.arange(num_clusters))
        self.cluster_size = np.bincount(self.cluster_of, minlength=num_clusters)
        self.successor = rng.permutation(num_items)
        zipf = 1.0 / np.arange(1, num_items + 1)
        self.popularity = np.empty(num_items)
        self.popularity[rng.permutation(num_items)] = zipf / zipf.sum()
        self.local_cdf = np.cumsum(zipf[: self.cluster_size.max()])

    def first(self, n: int) -> np.ndarray:
        return self.rng.choice(self.num_items, size=n, p=self.popularity)

    def in_cluster(self, cluster: np.ndarray) -> np.ndarray:
        """A popularity-skewed item of each ``cluster`` (its first items the most popular)."""
        local = np.searchsorted(self.local_cdf, self.rng.random(len(cluster)) * self.local_cdf[-1])
        return self.cluster_start[cluster] + local % self.cluster_size[cluster]

    def step(self, current: np.ndarray) -> np.ndarray:
        move = self.rng.random(len(current))
        local = self.in_cluster(self.cluster_of[current])
        anywhere = self.first(len(current))
        return np.where(move < 0.6, self.successor[current], np.where(move < 0.9, local, anywhere))


def _interactions(walk: np.ndarray, keep: np.ndarray, rng: np.random.Generator,
                  away: np.ndarray | None = None) -> Interactions:
    """``walk`` ``[U, T]`` items, ``keep`` ``[U, T]`` which steps happened; gaps between events
    are 1 min + Exp(1 h), plus ``away`` ``[U, T]`` seconds where given; ids are "u<k>" and "i<k>";
    events come user by user, oldest first."""
    gaps = 60 + rng.exponential(3600.0, size=walk.shape).astype(np.int64) + (0 if away is None else away)
    start = 1_600_000_000 + rng.integers(0, 90 * 86400, size=(walk.shape[0], 1))
    times = start + np.cumsum(gaps, axis=1)
    users = np.char.add("u", np.repeat(np.arange(walk.shape[0]), keep.sum(1)).astype(np.str_))
    items = np.char.add("i", walk[keep].astype(np.str_))
    return Interactions(users, items, times[keep])


def synthetic_interactions(
    num_users: int = 500, num_items: int = 300, mean_len: float = 40.0, seed: int = 0
) -> Interactions:
    """SYNTHETIC data (not real users): a Markov chain a sequential model can learn
    (``_Wander``). A popularity ranker captures only the skew, so a sequential model should beat
    it. Lengths are 3 + Poisson(mean_len - 3)."""
    if num_users < 1 or num_items < 2 or mean_len < 3:
        raise ValueError("need num_users >= 1, num_items >= 2, mean_len >= 3")
    rng = np.random.default_rng(seed)
    chain = _Wander(num_items, rng)
    lengths = MIN_EVAL_LENGTH + rng.poisson(mean_len - MIN_EVAL_LENGTH, size=num_users)
    walk = np.empty((num_users, lengths.max()), dtype=np.int64)  # [U, T] item per step
    walk[:, 0] = chain.first(num_users)
    for t in range(1, walk.shape[1]):
        walk[:, t] = chain.step(walk[:, t - 1])
    return _interactions(walk, np.arange(walk.shape[1]) < lengths[:, None], rng)


def dormant_interest_interactions(
    num_users: int = 400, num_items: int = 2000, phases: int = 4, wander: tuple[int, int] = (60, 100),
    taste_len: int = 5, away_s: int = 7 * 86400, seed: int = 0,
) -> Interactions:
    """SYNTHETIC long-range data (not real users): a taste that shows only now and then.

    Each user has a taste, one item cluster drawn at random. They wander as in
    ``synthetic_interactions`` for ``wander`` events (drawn uniformly, both ends included), then
    come back after ``away_s`` (a week) and take ``taste_len`` items of their taste cluster,
    ``phases`` times; then they wander once more, and their last event opens a new taste phase.
    Taste items are new to the user (drawn without replacement, the cluster's popular items
    likelier), so a model that knows the taste can rank the target among the unseen items.
    *That* a taste phase begins, a model that reads the request's time sees (the week away);
    *which* taste, only events at least ``wander[0]`` back tell: a model that reads fewer cannot
    know it, a memory of the whole history can. The test target is the last event; the
    validation target (second to last) is a wandering step.
    """
    lo, hi = wander
    if num_users < 1 or num_items < 2 or phases < 1 or taste_len < 1 or not 1 <= lo <= hi:
        raise ValueError("need num_users >= 1, num_items >= 2, phases >= 1, taste_len >= 1, 1 <= wander[0] <= wander[1]")
    rng = np.random.default_rng(seed)
    chain = _Wander(num_items, rng)
    taste = rng.integers(0, len(chain.cluster_start), size=num_users)
    if phases * taste_len + 1 > chain.cluster_size.min():
        raise ValueError(f"{phases} phases of {taste_len} need clusters of more than {phases * taste_len} items")
    runs = rng.integers(lo, hi + 1, size=(num_users, phases + 1))  # wandering lengths
    starts = np.cumsum(runs + taste_len, axis=1) - taste_len  # [U, P + 1]: each taste phase's first step
    lengths = starts[:, -1] + 1  # the last taste phase is its first event only
    steps = np.arange(lengths.max())
    walk = np.empty((num_users, len(steps)), dtype=np.int64)
    walk[:, 0] = chain.first(num_users)
    for t in range(1, len(steps)):
        walk[:, t] = chain.step(walk[:, t - 1])
    for u in range(num_users):  # each user's taste items, in the order taken: new ones, popular first
        first, size = chain.cluster_start[taste[u]], chain.cluster_size[taste[u]]
        weights = 1.0 / np.arange(1, size + 1)
        order = first + rng.choice(size, size=phases * taste_len + 1, replace=False, p=weights / weights.sum())
        at = (starts[u][:, None] + np.arange(taste_len)[None, :]).ravel()[: len(order)]
        walk[u, at] = order
    away = np.zeros_like(walk)
    np.put_along_axis(away, starts, away_s, axis=1)
    return _interactions(walk, steps[None, :] < lengths[:, None], rng, away)


def steady_taste_interactions(
    num_users: int = 600, num_items: int = 2000, length: tuple[int, int] = (300, 600), rate: float = 0.1,
    noise: str = "wander", seed: int = 0,
) -> Interactions:
    """SYNTHETIC long-range data (not real users): a steady taste, diluted in noise.

    Each user has a taste, one item cluster drawn at random. At each step they take an item of
    it with probability ``rate`` (its popular items likelier); otherwise, with ``noise="wander"``,
    they wander on from their last item as in ``synthetic_interactions``, and with
    ``noise="uniform"`` they take any item, all equally likely (nothing to learn but the taste).
    Their last event, the test target, is a taste item new to them. One taste item tells little
    (the noise visits every cluster), so the more of a history a model reads, the surer it knows
    the taste: at rate 0.1, about 1.5 of a recent part of 15 items, 4 of 40, 30-60 of the whole.
    Lengths are drawn uniformly from ``length`` (both ends included).
    """
    lo, hi = length
    if num_users < 1 or num_items < 2 or not 0.0 < rate < 1.0 or not MIN_EVAL_LENGTH <= lo <= hi:
        raise ValueError(f"need num_users >= 1, num_items >= 2, 0 < rate < 1, {MIN_EVAL_LENGTH} <= length[0] <= length[1]")
    if noise not in ("wander", "uniform"):
        raise ValueError(f"noise is 'wander' or 'uniform', not {noise!r}")
    rng = np.random.default_rng(seed)
    chain = _Wander(num_items, rng)
    taste = rng.integers(0, len(chain.cluster_start), size=num_users)
    lengths = rng.integers(lo, hi + 1, size=num_users)
    walk = np.empty((num_users, lengths.max()), dtype=np.int64)
    walk[:, 0] = chain.first(num_users)
    for t in range(1, walk.shape[1]):
        takes_taste, liked = rng.random(num_users) < rate, chain.in_cluster(taste)
        other = chain.step(walk[:, t - 1]) if noise == "wander" else rng.integers(0, num_items, size=num_users)
        walk[:, t] = np.where(takes_taste, liked, other)
    for u in range(num_users):  # the test target: a taste item the user has not taken, popular ones likelier
        first, size = chain.cluster_start[taste[u]], chain.cluster_size[taste[u]]
        weights = np.where(np.isin(first + np.arange(size), walk[u, : lengths[u] - 1]), 0.0, 1.0 / np.arange(1, size + 1))
        if weights.sum() == 0:
            raise ValueError(f"user {u} took every item of their taste cluster: use longer clusters or shorter lengths")
        walk[u, lengths[u] - 1] = first + rng.choice(size, p=weights / weights.sum())
    return _interactions(walk, np.arange(walk.shape[1]) < lengths[:, None], rng)
