"""The hostile-traffic generator (persrec.testing.bad_events) against the event contract, and the
parser's robustness: it raises ``InvalidEvent`` and nothing else, whatever the bytes."""

from __future__ import annotations

import collections
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persrec.stream.events import Event, InvalidEvent, parse_event, parse_item
from persrec.testing.bad_events import (
    FRESH_USER_KINDS, KINDS, REKEYED, VALID_VARIANTS, bad_event, build_traffic,
)

NOW = 1_800_000_000.0
REASONS = {"empty", "oversized", "not_json", "not_object", "missing_field", "bad_type", "bad_value", "ts_out_of_range"}


def reason_of(raw: bytes | None) -> str | None:
    try:
        parse_event(raw, now=NOW)
    except InvalidEvent as exc:
        return exc.reason
    return None


def test_kinds_cover_every_reason_code() -> None:
    assert set(KINDS.values()) == REASONS
    assert len(KINDS) >= 30


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_generated_bad_event_gets_the_expected_reason(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(60):
        raw = bad_event(kind, rng, NOW)
        assert reason_of(raw) == KINDS[kind], raw if raw is None or len(raw) < 300 else raw[:300]


def ml_like(n: int, users: int = 40) -> list[dict]:
    rng = random.Random(3)
    return [{"user_id": str(rng.randrange(1, users)), "item_id": str(rng.randrange(1, 500)), "ts": 1_000_000_000 + k,
             "event_id": f"r{k}"} for k in range(n)]


def test_build_traffic_says_what_each_message_must_produce() -> None:
    valid = ml_like(3000)
    traffic = build_traffic(valid, n_bad=2000, seed=1, now=NOW)
    bad = [m for m in traffic if m.bad]
    assert len(bad) == 2000
    per_kind = collections.Counter(m.kind for m in bad)
    assert set(per_kind) == set(KINDS) and min(per_kind.values()) >= 2000 // len(KINDS)
    for m in bad:
        assert reason_of(m.value) == m.reason, m.kind

    good = [m for m in traffic if not m.bad]
    assert {m.kind for m in good} == {"plain", "exact_duplicate"} | set(VALID_VARIANTS) | set(FRESH_USER_KINDS)
    for m in good:
        ev = parse_event(m.value, now=NOW)
        assert isinstance(ev, Event)
        assert (ev.user_id, ev.item_id, ev.event_id) == (m.event["user_id"], m.event["item_id"], m.event["event_id"])
        if m.kind not in REKEYED:
            assert m.key == ev.user_id.encode()
        else:
            assert m.key != ev.user_id.encode()

    # each user's first-time events are the valid events in order; fresh users have one event
    replayed = [m.event for m in good if not m.duplicate and m.kind not in FRESH_USER_KINDS]
    assert [(e["user_id"], e["item_id"]) for e in replayed] == [(e["user_id"], e["item_id"]) for e in valid]
    fresh = collections.Counter(m.event["user_id"] for m in good if m.kind in FRESH_USER_KINDS)
    assert fresh and max(fresh.values()) == 1 and not set(fresh) & {e["user_id"] for e in valid}

    # a duplicate repeats the bytes of an earlier message of the same event, shortly after it
    positions = {}
    for i, m in enumerate(traffic):
        if m.duplicate:
            j = positions[m.event["event_id"]]
            assert (traffic[j].key, traffic[j].value) == (m.key, m.value) and 0 < i - j < 20 + 2000
        elif not m.bad and m.event["event_id"] is not None:
            positions[m.event["event_id"]] = i
    assert sum(m.duplicate for m in traffic) >= 0.015 * len(valid)


def test_build_traffic_is_a_function_of_its_seed() -> None:
    valid = ml_like(500)
    a, b = (build_traffic(valid, 300, seed=7, now=NOW) for _ in range(2))
    assert a == b
    assert a != build_traffic(valid, 300, seed=8, now=NOW)


@pytest.mark.parametrize("raw, reason", [
    (b'{"user_id": "1", "item_id": "1", "ts": 1' + b"0" * 400 + b"}", "ts_out_of_range"),  # was OverflowError
    (b"[" * 5000 + b"]" * 5000, "not_json"),  # was RecursionError
    (b'{"user_id": "1", "item_id": "1", "ts": 1, "x": ' + b"{\"a\":" * 2500 + b"1" + b"}" * 2501, "not_json"),
    (b"", "empty"),
    ('{"user_id": "1", "item_id": "1", "ts": 1}'.encode("utf-16"), "not_json"),  # JSON on the wire is UTF-8
    (b'{"user_id": "1", "item_id": "1", "ts": 1, "event_id": "\\ud800"}', "bad_value"),
    (b'{"user_id": "1", "item_id": "1", "ts": 1, "event_id": "a\\nb"}', "bad_value"),
])
def test_parser_regressions(raw: bytes, reason: str) -> None:
    assert reason_of(raw) == reason


@pytest.mark.parametrize("text, reason", [
    ("Heat (1995) | Action|Crime", None), ("caf\u00e9 \U0001F600 | \u65e5\u672c", None),  # any printable text
    ("a\x00b", "bad_value"), ("a\ud800b", "bad_value"), ("\udfff", "bad_value"),  # a NUL, a lone surrogate
    ("   ", "bad_value"), ("x" * 4097, "bad_value"),
])
def test_item_text_rules(text: str, reason: str | None) -> None:
    raw = json.dumps({"item_id": "i1", "text": text, "ts": 1}).encode()  # json escapes lone surrogates
    if reason is None:
        assert parse_item(raw, now=NOW).text == text
    else:
        with pytest.raises(InvalidEvent) as exc:
            parse_item(raw, now=NOW)
        assert exc.value.reason == reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400) | st.floats()
    | st.text() | st.datetimes(timezones=st.timezones() | st.none()).map(lambda d: d.isoformat()),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)
events = st.fixed_dictionaries({}, optional={f: json_values for f in ("user_id", "item_id", "ts", "event_id")}
                               | {"op": st.sampled_from(["delete_user", "x"]) | json_values})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_parser_raises_only_invalid_event_on_any_json(obj: dict) -> None:
    raw = json.dumps(obj).encode()
    try:
        parse_event(raw, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS and exc.detail


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_parser_raises_only_invalid_event_on_any_bytes(raw: bytes) -> None:
    try:
        parse_event(raw, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
