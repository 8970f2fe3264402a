"""The event contract: what is accepted, and the reason code for what is not."""

import json

import pytest

from persrec.stream.events import MAX_EVENT_BYTES, Event, InvalidEvent, UserDeletion, parse_event

NOW = 1_700_000_000.0


def parse(obj) -> Event | UserDeletion:
    return parse_event(obj if isinstance(obj, bytes) else json.dumps(obj).encode(), now=NOW)


def test_valid_events_normalise_ids_and_times() -> None:
    e = parse({"user_id": 42, "item_id": "m1", "ts": 1_600_000_000, "event_id": "x"})
    assert e == Event("42", "m1", 1_600_000_000.0, "x")
    iso = parse({"user_id": "u", "item_id": 7, "ts": "2020-09-13T12:26:40Z"})
    assert iso.ts == 1_600_000_000.0 and iso.event_id is None
    assert parse({"user_id": "u", "item_id": 7, "ts": "2020-09-13T12:26:40"}).ts == 1_600_000_000.0
    assert parse({"op": "delete_user", "user_id": 9}) == UserDeletion("9")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "empty"),
        (b"x" * (MAX_EVENT_BYTES + 1), "oversized"),
        (b"{", "not_json"),
        (b"\xff", "not_json"),
        (b"[]", "not_object"),
        ({"item_id": 1, "ts": 1}, "missing_field"),
        ({"user_id": 1, "item_id": 1}, "missing_field"),
        ({"user_id": None, "item_id": 1, "ts": 1}, "missing_field"),
        ({"user_id": False, "item_id": 1, "ts": 1}, "bad_type"),
        ({"user_id": 1, "item_id": {"a": 1}, "ts": 1}, "bad_type"),
        ({"user_id": -1, "item_id": 1, "ts": 1}, "bad_value"),
        ({"user_id": 2**64, "item_id": 1, "ts": 1}, "bad_value"),
        ({"user_id": "a\nb", "item_id": 1, "ts": 1}, "bad_value"),
        (b'{"user_id": 1, "item_id": 1, "ts": NaN}', "bad_value"),
        (b'{"user_id": 1, "item_id": 1, "ts": -Infinity}', "bad_value"),
        ({"user_id": 1, "item_id": 1, "ts": -1}, "ts_out_of_range"),
        ({"user_id": 1, "item_id": 1, "ts": NOW + 2 * 86400}, "ts_out_of_range"),
        ({"user_id": 1, "item_id": 1, "ts": "soon"}, "bad_value"),
        ({"user_id": 1, "item_id": 1, "ts": [1]}, "bad_type"),
        ({"user_id": 1, "item_id": 1, "ts": 1, "event_id": ""}, "bad_value"),
        ({"op": "truncate", "user_id": 1}, "bad_value"),
    ],
)
def test_invalid_events_get_a_reason(raw, reason) -> None:
    with pytest.raises(InvalidEvent) as exc:
        parse_event(raw if raw is None or isinstance(raw, bytes) else json.dumps(raw).encode(), now=NOW)
    assert exc.value.reason == reason and exc.value.detail


@pytest.mark.parametrize("scale", [1, 1_000, 1_000_000, 1_000_000_000])
def test_epoch_times_in_milli_micro_and_nanoseconds_are_read_as_seconds(scale) -> None:
    # Kafka record times and JavaScript's Date.now() are milliseconds; the file loaders read the
    # same sizes the same way (models.logs.epoch_unit).
    ts = 1_650_000_123
    event = parse_event(json.dumps({"user_id": 1, "item_id": 2, "ts": ts * scale}).encode(), now=NOW)
    assert event.ts == ts
    with pytest.raises(InvalidEvent) as exc:  # two days ahead is out of range in any unit
        parse_event(json.dumps({"user_id": 1, "item_id": 2, "ts": int((NOW + 2 * 86400) * scale)}).encode(), now=NOW)
    assert exc.value.reason == "ts_out_of_range"
