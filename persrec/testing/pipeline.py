"""Checks on a running pipeline from the outside, shared by the end-to-end, reliability and
benchmark suites: publish and read topics with kafka-python, recompute what the model should
have answered offline, and compare each user's state with their event log."""

from __future__ import annotations

import collections
import time
import urllib.parse

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from persrec.stack import get_json
from persrec.stream.window import read_start


def consume(bootstrap: str, topic: str, expected: int, timeout: float, settle: float = 3.0) -> list:
    """Every message of ``topic`` once ``expected`` have arrived (plus ``settle`` s for extras)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=500)
    out, deadline, extra_until = [], time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            out.extend(consumer)
            if len(out) >= expected and extra_until is None:
                extra_until = time.monotonic() + settle
            if extra_until is not None and time.monotonic() > extra_until:
                break
    finally:
        consumer.close()
    return out


def whole_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list:
    """Every message ``topic`` holds now (up to its end offsets when called)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500,
                             max_partition_fetch_bytes=8 << 20)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends, out, deadline = consumer.end_offsets(tps), [], time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            out.extend(consumer)
        return out
    finally:
        consumer.close()


def publish(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    """Send and wait until the broker acknowledged every message (raises on the first refused)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [producer.send(topic, key=key, value=value) for key, value in messages]
    producer.flush()
    producer.close()
    for future in futures:
        future.get(timeout=0)


def events_by_user(events: list[dict]) -> dict[str, list[dict]]:
    """Each user's events in the order given (the order they reach the worker)."""
    by_user: dict[str, list[dict]] = collections.defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    return by_user


def offline_memory(model, id_map, events: list[dict]) -> torch.Tensor:
    """The memory ``[1, L, 2, M, H, Dh]`` a user's ``events`` (all aged out) make, offline, as
    the stream folds them: RECOMPRESS compresses the last ``max_len - recent_len`` known items;
    INCREMENTAL folds whole segments of ``segment_len`` events in order (unknown items skipped
    inside a segment)."""
    cfg = model.cfg

    def known(evs):
        evs = [e for e in evs if e["item_id"] in id_map]
        return [int(id_map.encode([e["item_id"]])[0]) for e in evs], [int(e["ts"]) for e in evs]

    as_row = lambda x: torch.tensor([x or [0]], dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        if cfg.policy.value == "recompress":
            items, ts = (x[-(cfg.max_len - cfg.recent_len):] for x in known(events))
            return model.compress(as_row(items), torch.tensor([len(items)]), as_row(ts))
        memory, has = model.empty_memory(1), torch.tensor([False])
        for start in range(0, len(events) - cfg.segment_len + 1, cfg.segment_len):
            items, ts = known(events[start:start + cfg.segment_len])
            memory, has = model.fold(memory, has, as_row(items), torch.tensor([len(items)]), as_row(ts)), torch.tensor([True])
        return memory


def offline_top10(checkpoint, id_map, user_events: list[dict], watermark: int, seq: int):
    """The model's answer, computed offline, for a user whose memory holds their first
    ``watermark`` events (``offline_memory``) and whose window holds events
    ``watermark..seq``, asked at the time of event ``seq`` (what a request-time model reads)."""
    model = checkpoint.build_model("cpu")
    cfg = model.cfg
    recent = [e for e in user_events[watermark:seq] if e["item_id"] in id_map]
    recent = recent[read_start(len(recent), cfg.max_len):]  # the worker's cap (Runtime.model_inputs)
    items = [int(id_map.encode([e["item_id"]])[0]) for e in recent]
    as_row = lambda x: torch.tensor([x or [0]], dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        memory = offline_memory(model, id_map, user_events[:watermark])
        vec = model.recommend(memory, as_row(items), torch.tensor([len(items)]),
                              as_row([int(e["ts"]) for e in recent]),
                              request_ts=torch.tensor([int(user_events[seq - 1]["ts"])]))
        scores = model.score(vec)[0]
        scores[torch.tensor(items)] = float("-inf")
        top = torch.topk(scores, 10)
    return id_map.decode(top.indices.tolist()), top.values.numpy()


def same_top(served: list[dict], ids: list[str], scores, tol: float = 1e-4) -> bool:
    """The served top-k (``[{"item_id", "score"}]``) is the offline one (``ids``, ``scores``):
    the same score at every rank within ``tol``, and the same item at every rank whose score no
    other rank ties within ``tol`` (or the last, whose tie may be rank k + 1). Tied items may come
    out in either order: a batched pass adds in another order than the offline one."""
    got_ids = [r["item_id"] for r in served]
    got = np.array([r["score"] for r in served], float)
    scores = np.asarray(scores, float)
    if len(got_ids) != len(ids) or (len(ids) and np.abs(got - scores).max() > tol):
        return False
    for i, (a, b) in enumerate(zip(got_ids, ids)):
        tied = i == len(ids) - 1 or any(abs(scores[j] - scores[i]) <= tol for j in range(len(ids)) if j != i)
        if a != b and not tied:
            return False
    return True


def check_user_states(apis: list[str], by_user: dict[str, list[dict]]) -> int:
    """Each user's folded events + window = all their events, each once, and the window holds
    their latest events, as the status APIs of ``apis`` report them. Returns events folded."""
    total_folded = 0
    for user_id, events in by_user.items():
        bodies = [get_json(f"{api}/users/{urllib.parse.quote(user_id, safe='')}")[1] for api in apis]
        state = next(b for b in bodies if b.get("window", {}).get("events"))
        folded = state["memory"]["events_folded"] if state["memory"] else 0
        assert folded + state["window"]["items_after_watermark"] == len(events), user_id
        assert state["window"]["items"] == [e["item_id"] for e in events[folded:]], user_id
        total_folded += folded
    return total_folded


def other_weights(checkpoint, seed: int = 1):
    """Model B: ``checkpoint``'s config and id map, other weights (a model change to test)."""
    from persrec.models.checkpoint import make_checkpoint
    from persrec.models.loss import build_model

    torch.manual_seed(seed)
    model = build_model(checkpoint.config)
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_(0, 0.5)
    return make_checkpoint(model, checkpoint.id_map_json)


def check_answer(checkpoints: dict, id_map, by_user: dict, body: dict,
                 loaded_b_at: float) -> None:
    """The message equals the answer of the model it names, recomputed offline: memory of the
    user's first ``memory_version`` events, window of the ``window`` latest events up to ``seq``
    (the worker reads at most max_len of them, from ``read_start``; every item is known: one id
    map for all)."""
    watermark, seq, n = body["memory_version"], body["seq"], body["window"]
    after = seq - watermark
    assert n == after - read_start(after, checkpoints[body["model_version"]].config.max_len), body["event_id"]
    events = by_user[body["user_id"]][:watermark] + by_user[body["user_id"]][seq - n:seq]
    ids, scores = offline_top10(checkpoints[body["model_version"]], id_map, events, watermark, watermark + n)
    if not same_top(body["items"], ids, scores):
        by = [v for v, ck in checkpoints.items()
              if same_top(body["items"], *offline_top10(ck, id_map, events, watermark, watermark + n))]
        raise AssertionError(f"answer of {body['event_id']} ({body['emit_ts'] - loaded_b_at:.1f} s after B "
                             f"was loaded) names {body['model_version']}, computed by {by or 'neither model'}")


def check_memory_rows(store, checkpoints: dict, id_map, by_user: dict) -> int:
    """Every RECOMPRESS memory row of the models in ``checkpoints`` (version -> checkpoint) is its
    model's compression of the user's aged-out events (the last ``history_len`` before the
    watermark; one id map for all). Returns the rows checked."""
    checked = 0
    for version, ck in checkpoints.items():
        model, keep = ck.build_model("cpu"), ck.config.max_len - ck.config.recent_len
        for user, row in store.get_many(list(by_user), version).items():
            aged = [e["item_id"] for e in by_user[user][:row.watermark]][-keep:]
            assert row.history.tolist() == id_map.encode(aged).tolist(), (version, user)
            with torch.no_grad():
                expected = model.compress(torch.from_numpy(row.history)[None], torch.tensor([len(row.history)]))[0]
            assert np.abs(row.tensor - expected.numpy()).max() < 1e-5, (version, user)
            checked += 1
    return checked
