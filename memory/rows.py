"""Conversion between `MemoryRecord` and the column values of a `user_memory` row.

Both backends store exactly these values, so they round-trip tensors identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from persrec.memory.codec import decode_history, decode_tensor, encode_history, encode_tensor
from persrec.memory.record import MemoryRecord


def utc_now() -> datetime:
    return datetime.now(UTC)


def record_to_columns(rec: MemoryRecord, storage_dtype: str, now: datetime) -> dict[str, Any]:
    """Column values for `rec`, without row_version (the store decides it)."""
    data, dtype, shape = encode_tensor(rec.tensor, storage_dtype)
    history, history_len = encode_history(rec.history)
    history_ts, _ = encode_history(rec.history_ts)
    return {
        "user_id": rec.user_id,
        "model_version": rec.model_version,
        "dtype": dtype,
        "shape": shape,
        "data": data,
        "events_folded": int(rec.events_folded),
        "watermark": int(rec.watermark),
        "history": history,
        "history_len": history_len,
        "history_ts": history_ts,
        "updated_at": now,
    }


def columns_to_record(row: Mapping[str, Any]) -> MemoryRecord:
    return MemoryRecord(
        user_id=row["user_id"],
        model_version=row["model_version"],
        tensor=decode_tensor(row["data"], row["dtype"], row["shape"]),
        events_folded=row["events_folded"],
        watermark=row["watermark"],
        history=decode_history(row["history"], row["history_len"]),
        history_ts=decode_history(row["history_ts"], row["history_len"]),
        updated_at=as_utc(row["updated_at"]),
        row_version=row["row_version"],
    )


def as_utc(ts: datetime) -> datetime:
    """SQLite hands timestamps back naive (they were written as UTC); others aware."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
