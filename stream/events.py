"""The event contract, and the one place that decides what a bad event is.

An event on the ``interactions`` topic is a UTF-8 JSON object keyed by user id:
``{"user_id": str|int, "item_id": str|int, "ts": unix time or ISO-8601, "event_id": str?}``. A
numeric ``ts`` is in seconds, or in milliseconds, microseconds or nanoseconds where its size says
so (``models.logs.epoch_unit``: from 1e11, 1e14, 1e17; seconds that large are the year 5138),
the rule the file loaders use.
``parse_event`` returns an ``Event`` or raises ``InvalidEvent`` whose ``reason`` is a short
stable code (it becomes the dead-letter ``reason`` header) and ``detail`` a human sentence.

An item on the ``items`` topic is a UTF-8 JSON object keyed by item id:
``{"item_id": str|int, "text": str, "ts": unix time or ISO-8601}``; ``parse_item`` checks it
the same way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from persrec.models.logs import epoch_unit

MAX_EVENT_BYTES = 16 * 1024
MAX_ID_CHARS = 256
MAX_INT_ID = 2**63 - 1
MAX_FUTURE_S = 24 * 3600  # clocks drift; a day ahead is a bug, not drift
MIN_TS = 0.0  # 1970-01-01: anything earlier is a unit or sign error
MAX_TEXT_CHARS = 4096  # an item's text: a title and a description, not a document
_NUL_OR_SURROGATE = re.compile("[\x00\ud800-\udfff]")  # one scan in C: 21 us an item of 1,000 characters, 83 with a Python loop


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    ts: float  # unix seconds
    event_id: str | None


def _reject_constant(name: str):
    raise InvalidEvent("bad_value", f"non-finite number {name} is not allowed")


def _id(obj: dict, field: str) -> str:
    if field not in obj or obj[field] is None:
        raise InvalidEvent("missing_field", f"{field} is required")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidEvent("bad_type", f"{field} must be a string or an integer, got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_INT_ID:
            raise InvalidEvent("bad_value", f"{field} {value} is outside 0..2^63-1")
        return str(value)
    if not value or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidEvent("bad_value", f"{field} must be 1..{MAX_ID_CHARS} printable characters")
    return value


def _ts(value: object, now: float) -> float:
    if isinstance(value, bool) or value is None:
        raise InvalidEvent("bad_type", "ts must be unix seconds or an ISO-8601 string")
    if isinstance(value, (int, float)):
        try:
            ts = float(value)
        except OverflowError:  # an integer beyond float range
            raise InvalidEvent("ts_out_of_range", "ts is before 1970 or more than a day ahead") from None
        if math.isfinite(ts):
            ts /= epoch_unit(abs(ts))[0]
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEvent("bad_value", f"ts {value[:64]!r} is not ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        ts = parsed.timestamp()
    else:
        raise InvalidEvent("bad_type", f"ts must be a number or a string, got {type(value).__name__}")
    if not math.isfinite(ts):
        raise InvalidEvent("bad_value", "ts must be finite")
    if ts < MIN_TS or ts > now + MAX_FUTURE_S:
        raise InvalidEvent("ts_out_of_range", f"ts {ts} is before 1970 or more than a day ahead")
    return ts


def parse_time(value: object, *, now: float = math.inf) -> float:
    """Unix seconds from unix seconds or an ISO-8601 string (naive = UTC), checked as event times
    are (``InvalidEvent`` otherwise); ``now`` bounds times from the future."""
    return _ts(value, now)


@dataclass(frozen=True)
class UserDeletion:
    """``{"op": "delete_user", "user_id": ...}``: erase the user's window and memory."""

    user_id: str


def _json_object(raw: bytes | None) -> dict:
    if not raw:  # a null (tombstone) or zero-length value
        raise InvalidEvent("empty", "message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        # JSON on the wire is UTF-8 (RFC 8259 section 8.1): no UTF-16/32 guessing, no BOM.
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except InvalidEvent:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent("not_json", str(exc)[:200]) from None
    except RecursionError:
        raise InvalidEvent("not_json", "JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_event(raw: bytes | None, *, now: float) -> Event | UserDeletion:
    """Validate one message value. ``now`` (unix seconds) bounds timestamps from the future."""
    obj = _json_object(raw)
    if "op" in obj:
        if obj["op"] != "delete_user":
            raise InvalidEvent("bad_value", f"unknown op {str(obj['op'])[:64]!r}")
        return UserDeletion(_id(obj, "user_id"))
    event_id = obj.get("event_id")
    if event_id is not None:
        if (not isinstance(event_id, str) or not event_id or len(event_id) > MAX_ID_CHARS
                or not event_id.isprintable()):  # control characters or lone surrogates: garbage
            raise InvalidEvent("bad_value", f"event_id must be 1..{MAX_ID_CHARS} printable characters when given")
    if "ts" not in obj:
        raise InvalidEvent("missing_field", "ts is required")
    return Event(_id(obj, "user_id"), _id(obj, "item_id"), _ts(obj["ts"], now), event_id)


@dataclass(frozen=True)
class Item:
    item_id: str
    text: str
    ts: float  # unix seconds: when the item was published


def parse_item(raw: bytes | None, *, now: float) -> Item:
    """Validate one ``items`` message value (``parse_event``'s rules for ids and times)."""
    obj = _json_object(raw)
    text = obj.get("text")
    if text is None:
        raise InvalidEvent("missing_field", "text is required")
    if not isinstance(text, str):
        raise InvalidEvent("bad_type", f"text must be a string, got {type(text).__name__}")
    if not text.strip() or len(text) > MAX_TEXT_CHARS:
        raise InvalidEvent("bad_value", f"text must be 1..{MAX_TEXT_CHARS} characters, not blank")
    if _NUL_OR_SURROGATE.search(text):
        raise InvalidEvent("bad_value", "text holds a NUL or a lone surrogate")
    if "ts" not in obj:
        raise InvalidEvent("missing_field", "ts is required")
    return Item(_id(obj, "item_id"), text, _ts(obj["ts"], now))
