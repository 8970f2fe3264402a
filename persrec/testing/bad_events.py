"""Seeded generators of hostile traffic for the ``interactions`` topic (reliability scenario 3).

``bad_event(kind, rng, now)`` makes one invalid message value of a named kind; ``KINDS`` maps
each kind to the dead-letter ``reason`` the event contract (README, ``stream/events.py``) gives
it, so expectations come from here, not from the parser under test. ``build_traffic`` mixes
valid events (e.g. ml-latest-small in time order) with tricky but valid variants (int ids,
ISO-8601 or out-of-order times, no event id, extra fields, exact duplicates, edge-case ids,
missing or wrong Kafka keys) and with bad events, and says what each message must produce.
Everything is a pure function of its arguments and the ``random.Random`` given.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

MAX_EVENT_BYTES = 16 * 1024  # the contract's limits, restated (not imported from the code under test)
MAX_ID_CHARS = 256
DAY = 86_400.0
RECENT_IDS = 64  # the worker recognises a repeated event id within this many of the user's events

Maker = Callable[[random.Random, float], bytes | None]


def _base(rng: random.Random) -> dict:
    """A valid event of a throwaway user, to be broken in one way."""
    event = {"user_id": f"bad-{rng.randrange(10**6)}", "item_id": str(rng.randrange(1, 10**5)),
             "ts": rng.randrange(10**9, 1_600_000_000)}
    if rng.random() < 0.5:
        event["event_id"] = f"bad-{rng.getrandbits(48):012x}"
    return event


def _dump(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _with(field: str, value_json: str) -> Maker:
    """A valid event whose ``field`` is the raw JSON text ``value_json`` (may be NaN etc.)."""

    def make(rng: random.Random, now: float) -> bytes:
        event = _base(rng)
        event[field] = "@@"
        return _dump(event).replace(b'"@@"', value_json.encode())

    return make


def _set(field: str, values: Callable[[random.Random, float], object]) -> Maker:
    def make(rng: random.Random, now: float) -> bytes:
        return _dump(_base(rng) | {field: values(rng, now)})

    return make


def _id_field(rng: random.Random) -> str:
    return rng.choice(["user_id", "item_id"])


def _set_id(values: Callable[[random.Random], object]) -> Maker:
    def make(rng: random.Random, now: float) -> bytes:
        return _dump(_base(rng) | {_id_field(rng): values(rng)})

    return make


def _drop(field: str) -> Maker:
    def make(rng: random.Random, now: float) -> bytes:
        event = _base(rng)
        del event[field]
        return _dump(event)

    return make


def _oversized_padding(rng: random.Random, now: float) -> bytes:
    return _dump(_base(rng) | {"pad": "x" * rng.randrange(MAX_EVENT_BYTES, 8 * MAX_EVENT_BYTES)})


def _oversized_garbage(rng: random.Random, now: float) -> bytes:
    return rng.randbytes(rng.randrange(MAX_EVENT_BYTES + 1, 4 * MAX_EVENT_BYTES))


def _truncated(rng: random.Random, now: float) -> bytes:
    raw = _dump(_base(rng))
    return raw[: rng.randrange(1, len(raw))]  # a strict prefix of an object is never JSON


def _garbage_text(rng: random.Random, now: float) -> bytes:
    body = "".join(rng.choices(string.printable, k=rng.randrange(0, 200)))
    return (rng.choice("<#@xq'") + body).encode()


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]


def _invalid_utf8(rng: random.Random, now: float) -> bytes:
    raw = _dump(_base(rng) | {_id_field(rng): "@@"})
    return raw.replace(b"@@", b"u" + rng.choice(INVALID_UTF8))


def _not_utf8_encoding(rng: random.Random, now: float) -> bytes:
    """A valid event in UTF-16/32 or with a byte-order mark: JSON on the wire is UTF-8."""
    text = json.dumps(_base(rng))
    encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
    return text.encode(encoding)


def _deep_nesting(rng: random.Random, now: float) -> bytes:
    n = rng.randrange(3000, 7000)
    nested = "[" * n + "]" * n
    if rng.random() < 0.5:
        return nested.encode()
    return _dump(_base(rng) | {"extra": "@@"}).replace(b'"@@"', nested.encode())


def _huge_literal(rng: random.Random, now: float) -> bytes:
    """An integer of more than 4300 digits: Python's JSON decoder refuses it (CVE-2020-10735)."""
    digits = "9" * rng.randrange(4400, 6000)
    return _with(rng.choice(["user_id", "item_id", "ts"]), digits)(rng, now)


def _syntax(rng: random.Random, now: float) -> bytes:
    event = _base(rng)
    return rng.choice([
        _dump(event) + b"x", _dump(event) * 2, repr(event).encode(),
        _dump(event).replace(b'"ts"', b"ts"), _dump(event)[:-1] + b",}", b"{" + b"}" * 2,
        _with("ts", rng.choice(["nan", "inf", "NAN", "+1", "01", "1.", ".5", "0x10"]))(rng, now),
    ])


def _not_object(rng: random.Random, now: float) -> bytes:
    return _dump(rng.choice([[_base(rng)], [], 42, -1.5, "a string", True, False, None, [1, 2]]))


def _null(field: str) -> Maker:
    return _set(field, lambda rng, now: None)


def _non_finite(rng: random.Random, now: float) -> bytes:
    field = rng.choice(["user_id", "item_id", "ts", "extra"])
    return _with(field, rng.choice(["NaN", "Infinity", "-Infinity"]))(rng, now)


def _unprintable(rng: random.Random) -> str:
    bad = rng.choice(["\x00", "\n", "\t", "\x7f", "\u200b", "\u2028", "\ud800", "\udfff", "\x1b[31m"])
    return f"u{bad}{rng.randrange(100)}"


def _bad_event_id(rng: random.Random, now: float) -> bytes:
    value = rng.choice([7, 1.5, True, ["e"], {"id": "e"}, "", "e" * (MAX_ID_CHARS + 1), _unprintable(rng)])
    return _dump(_base(rng) | {"event_id": value})


def _bad_op(rng: random.Random, now: float) -> bytes:
    op = rng.choice(["drop_table", "DELETE_USER", "delete", "", None, 1, ["delete_user"]])
    return _dump({"op": op, "user_id": f"bad-{rng.randrange(1000)}"})


def _delete_bad_user(rng: random.Random, now: float) -> bytes:
    return _dump({"op": "delete_user", "user_id": rng.choice([-1, "", "x" * 300, 2**64, "a\nb"])})


BAD_ISO = ["yesterday", "", "2020-13-01", "2020-02-30", "2020-01-01T25:00:00", "12:00", "nan", "+inf",
           "2020/01/01", "01-01-2020", " 2020-01-01", "2020-01-01T00:00:00+25:00", "٢٠٢٠-٠١-٠١", "2020-01-01TZ"]


def _iso(year: int, rng: random.Random) -> str:
    offset = timezone(timedelta(minutes=rng.randrange(-12 * 60, 14 * 60 + 1, 15)))
    return datetime(year, rng.randrange(1, 13), rng.randrange(1, 29), rng.randrange(24), tzinfo=offset).isoformat()


def _far_future(rng: random.Random, now: float) -> object:
    """Two days ahead or more: in seconds (below 1e11, where a number starts to be read as
    milliseconds: ``models.logs.epoch_unit``) or in milliseconds."""
    ahead = now + 2 * DAY + rng.choice([0, rng.uniform(0, 365 * DAY), rng.uniform(0, 9e10)])
    ahead *= rng.choice([1, 1, 1000])
    return rng.choice([ahead, int(ahead)])


def _iso_out_of_range(rng: random.Random, now: float) -> object:
    future = datetime.fromtimestamp(now, timezone.utc).year + 2
    return rng.choice([_iso(rng.randrange(future, 10_000), rng), _iso(rng.randrange(1, 1969), rng),
                       "1969-12-31T23:59:59Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00"])


# kind -> (expected dead-letter reason, maker)
GENERATORS: dict[str, tuple[str, Maker]] = {
    "null_value": ("empty", lambda rng, now: None),
    "zero_bytes": ("empty", lambda rng, now: b""),
    "oversized_padding": ("oversized", _oversized_padding),
    "oversized_garbage": ("oversized", _oversized_garbage),
    "truncated_json": ("not_json", _truncated),
    "garbage_text": ("not_json", _garbage_text),
    "json_syntax_error": ("not_json", _syntax),
    "invalid_utf8": ("not_json", _invalid_utf8),
    "not_utf8_encoding": ("not_json", _not_utf8_encoding),
    "deep_nesting": ("not_json", _deep_nesting),
    "huge_number_literal": ("not_json", _huge_literal),
    "not_object": ("not_object", _not_object),
    "missing_user_id": ("missing_field", _drop("user_id")),
    "missing_item_id": ("missing_field", _drop("item_id")),
    "missing_ts": ("missing_field", _drop("ts")),
    "null_user_id": ("missing_field", _null("user_id")),
    "null_item_id": ("missing_field", _null("item_id")),
    "float_id": ("bad_type", _set_id(lambda rng: rng.choice([1.5, 2.0, -0.0, 1e300]))),
    "bool_id": ("bad_type", _set_id(lambda rng: rng.choice([True, False]))),
    "container_id": ("bad_type", _set_id(lambda rng: rng.choice([[], ["1"], {}, {"id": 1}]))),
    "ts_wrong_type": ("bad_type", _set("ts", lambda rng, now: rng.choice([True, False, None, [1], {"s": 1}]))),
    "negative_id": ("bad_value", _set_id(lambda rng: -rng.choice([1, rng.randrange(1, 2**63), 2**63, 10**30]))),
    "huge_id": ("bad_value", _set_id(lambda rng: rng.choice([2**63, 2**64, rng.randrange(2**63, 10**100)]))),
    "empty_id": ("bad_value", _set_id(lambda rng: "")),
    "long_id": ("bad_value", _set_id(lambda rng: "u" * rng.randrange(MAX_ID_CHARS + 1, 4 * MAX_ID_CHARS))),
    "unprintable_id": ("bad_value", _set_id(_unprintable)),
    "non_finite_literal": ("bad_value", _non_finite),
    "non_finite_ts": ("bad_value", lambda rng, now: _with("ts", rng.choice(["1e400", "-1e999"]))(rng, now)),
    "bad_iso_ts": ("bad_value", _set("ts", lambda rng, now: rng.choice(BAD_ISO))),
    "bad_event_id": ("bad_value", _bad_event_id),
    "unknown_op": ("bad_value", _bad_op),
    "delete_bad_user": ("bad_value", _delete_bad_user),
    "ts_negative": ("ts_out_of_range", _set("ts", lambda rng, now: -rng.choice([1, 0.5, rng.uniform(1, 1e12), 2**62]))),
    "ts_far_future": ("ts_out_of_range", _set("ts", _far_future)),
    "ts_beyond_float": ("ts_out_of_range",
                        _set("ts", lambda rng, now: rng.choice([1, -1]) * 10 ** rng.randrange(309, 400))),
    "ts_huge_float": ("ts_out_of_range", _set("ts", lambda rng, now: rng.choice([1e300, 1.79e308, 1e20]))),
    "iso_ts_out_of_range": ("ts_out_of_range", _set("ts", _iso_out_of_range)),
}
KINDS: dict[str, str] = {kind: reason for kind, (reason, _) in GENERATORS.items()}


def bad_event(kind: str, rng: random.Random, now: float) -> bytes | None:
    return GENERATORS[kind][1](rng, now)


def random_key(rng: random.Random, user_keys: list[bytes], value: bytes | None = b"") -> bytes | None:
    """A Kafka key for a bad event: a real user's, none, empty, or arbitrary (non-UTF-8) bytes
    (clients refuse a message with neither key nor value)."""
    pick = rng.random()
    if pick < 0.4 and user_keys:
        return rng.choice(user_keys)
    if pick < 0.6:
        return None if value is not None else b""
    if pick < 0.7:
        return b""
    return rng.randbytes(rng.randrange(1, 40))


@dataclass(frozen=True)
class Message:
    """One message to publish and what it must produce."""

    key: bytes | None
    value: bytes | None
    kind: str
    reason: str | None = None  # bad: the expected dead-letter reason
    event: dict | None = None  # valid: {"user_id", "item_id", "event_id"} as strings (event_id may be None)
    duplicate: bool = False  # an exact repeat of an earlier valid message: answered with duplicate: true

    @property
    def bad(self) -> bool:
        return self.reason is not None


VALID_VARIANTS = ("int_ids", "iso_ts", "older_ts", "future_ts_within_a_day", "no_event_id", "null_event_id",
                  "extra_fields")
FRESH_USER_KINDS = ("max_int_ids", "longest_ids", "unicode_ids", "url_hostile_id", "null_key", "wrong_key", "empty_key")
REKEYED = ("null_key", "wrong_key", "empty_key")  # the worker re-publishes these keyed by the user id


def _iso_ts(ts: int, rng: random.Random) -> str:
    offset = timezone(timedelta(minutes=rng.randrange(-12 * 60, 14 * 60 + 1, 15)))
    text = datetime.fromtimestamp(ts, offset).isoformat()
    return text.replace("+00:00", "Z") if rng.random() < 0.3 else text


def _variant(e: dict, rng: random.Random, now: float) -> tuple[str, dict]:
    """A tricky but valid encoding of event ``e`` (same user, item and identity)."""
    kind = rng.choice(VALID_VARIANTS)
    out = dict(e)
    if kind == "int_ids":  # 42 and "42" are the same id
        out |= {f: int(e[f]) for f in ("user_id", "item_id") if e[f].isdigit() and str(int(e[f])) == e[f]}
    elif kind == "iso_ts":
        out["ts"] = _iso_ts(e["ts"], rng)
    elif kind == "older_ts":  # out of order: before the user's earlier events (1970 included)
        out["ts"] = rng.choice([0, 1, rng.randrange(0, max(e["ts"] - 10**6, 1))])
    elif kind == "future_ts_within_a_day":
        out["ts"] = now + rng.uniform(0, 0.5 * DAY)
    elif kind == "no_event_id":
        del out["event_id"]
    elif kind == "null_event_id":
        out["event_id"] = None
    else:
        out |= {"source": "app", "props": {"ratio": 0.5, "tags": ["ä", "🎬"], "n": None}, "op_hint": "x"}
    return kind, out


def _fresh_user(k: int, rng: random.Random) -> tuple[str, bytes | None, dict, str]:
    """A brand-new user with one event of an edge-case shape: (kind, key, JSON object, user id)."""
    kind = rng.choice(FRESH_USER_KINDS)
    user: object = f"fresh-{k}"
    item: object = rng.choice(["1", "50", "never-seen-item"])
    if kind == "max_int_ids":
        user, item = 2**63 - 1 - k, 2**63 - 1
    elif kind == "longest_ids":
        user, item = f"{k}-".ljust(MAX_ID_CHARS, "u"), "i" * MAX_ID_CHARS
    elif kind == "unicode_ids":
        user = f"ユーザー-{k}-é🎬"
    elif kind == "url_hostile_id":
        user = f"a/b?c=#%41 ..{k}"
    obj = {"user_id": user, "item_id": item, "ts": 1_500_000_000 + k, "event_id": f"fresh-{k}"}
    key = {"null_key": None, "wrong_key": b"not-" + str(user).encode(), "empty_key": b""}.get(kind, str(user).encode())
    return kind, key, obj, str(user)


def build_traffic(valid: list[dict], n_bad: int, seed: int, now: float, *, variant_rate: float = 0.1,
                  duplicate_rate: float = 0.02, fresh_users: int | None = None) -> list[Message]:
    """``valid`` events (``{"user_id", "item_id", "ts", "event_id"}``, string ids, in order) with
    tricky variants, exact duplicates, fresh edge-case users and ``n_bad`` bad events mixed in.

    Each user's valid events keep their relative order, so their sequence is ``valid`` in order;
    a fresh user has one event (re-keyed ones are re-published by the worker, so only users with
    a single event get a wrong or missing key). Duplicates follow their original within 20
    messages, well within the worker's memory of recent event ids."""
    rng = random.Random(seed)
    out: list[Message] = []
    for e in valid:
        kind, obj = _variant(e, rng, now) if rng.random() < variant_rate else ("plain", e)
        norm = {"user_id": e["user_id"], "item_id": e["item_id"], "event_id": obj.get("event_id")}
        out.append(Message(e["user_id"].encode(), _dump(obj), kind, event=norm))
    for i in sorted(rng.sample(range(len(out)), int(duplicate_rate * len(out))), reverse=True):
        m = out[i]
        if m.event["event_id"] is not None:  # without an event id a repeat is a new event
            dup = Message(m.key, m.value, "exact_duplicate", event=m.event, duplicate=True)
            out.insert(min(i + rng.randrange(1, 20), len(out)), dup)
    for k in range(len(valid) // 100 if fresh_users is None else fresh_users):
        kind, key, obj, user = _fresh_user(k, rng)
        out.insert(rng.randrange(len(out) + 1),
                   Message(key, _dump(obj), kind, event={"user_id": user, "item_id": str(obj["item_id"]),
                                                         "event_id": obj["event_id"]}))
    user_keys = sorted({e["user_id"].encode() for e in valid})
    kinds = list(KINDS)
    for j in range(n_bad):
        kind = kinds[j % len(kinds)]
        value = bad_event(kind, rng, now)
        message = Message(random_key(rng, user_keys, value), value, kind, reason=KINDS[kind])
        out.insert(rng.randrange(len(out) + 1), message)
    return out
