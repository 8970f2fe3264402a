"""stream/poison.py: a batch that fails is retried, then bisected; only an event that fails on
its own is set aside, and outages are waited out."""

import asyncio

import pytest

from persrec.stream.poison import Failure, Health, isolate


def classify(exc: BaseException) -> Failure:
    return Failure.OUTAGE if isinstance(exc, ConnectionError) else Failure.ERROR


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_poison_item_is_found_by_bisection_and_the_rest_proceeds() -> None:
    calls = []

    async def model(part):
        calls.append(list(part))
        if 13 in part or 5 in part:
            raise ValueError("bad input")
        return [x * 10 for x in part]

    items = list(range(16))
    results, failed = run(isolate(items, model, classify, Health(), attempts=2, delay=0.001))
    assert [i for i, _ in failed] == [5, 13] and all(isinstance(e, ValueError) for _, e in failed)
    assert results == [None if i in (5, 13) else i * 10 for i in items]
    assert calls.count(items) == 1 + 2  # the whole batch: once as usual, then `attempts` times alone, then bisected
    assert len(calls) < 40  # bisection, not one call per item


def test_an_outage_is_waited_out_and_sets_nothing_aside() -> None:
    down = {"calls": 0}

    async def model(part):
        down["calls"] += 1
        if down["calls"] <= 6:
            raise ConnectionError("triton unreachable")
        return list(part)

    results, failed = run(isolate([1, 2, 3], model, classify, Health(), attempts=2, delay=0.001, max_delay=0.002))
    assert failed == [] and results == [1, 2, 3] and down["calls"] == 7


def test_when_everything_fails_nothing_is_set_aside_until_something_works() -> None:
    """A broken model (every input fails) must not dead-letter the stream: the batch waits."""
    state = {"broken": True, "calls": 0}

    async def model(part):
        state["calls"] += 1
        if state["calls"] == 12:
            state["broken"] = False  # repaired
        if state["broken"]:
            raise RuntimeError("model broken")
        return list(part)

    results, failed = run(isolate([1, 2], model, classify, Health(), attempts=2, delay=0.001, max_delay=0.002))
    assert failed == [] and results == [1, 2]


def test_a_lone_poison_event_is_set_aside_once_another_batch_succeeds() -> None:
    health = Health()

    async def model(part):
        if part == ["poison"]:
            raise ValueError("bad input")
        return list(part)

    async def both():
        stuck = asyncio.create_task(isolate(["poison"], model, classify, health, attempts=2, delay=0.001, max_delay=0.01))
        await asyncio.sleep(0.05)
        assert not stuck.done()  # no evidence yet that the model works: it waits
        await isolate(["fine"], model, classify, health)  # another batch is answered
        return await stuck

    results, failed = run(both())
    assert results == [None] and [i for i, _ in failed] == [0]


@pytest.mark.parametrize("attempts", [1, 3])
def test_a_transient_error_is_retried_before_bisecting(attempts: int) -> None:
    state = {"calls": 0}

    async def model(part):
        state["calls"] += 1
        if state["calls"] < attempts:
            raise RuntimeError("blip")
        return list(part)

    results, failed = run(isolate([1, 2, 3, 4], model, classify, Health(), attempts=attempts, delay=0.001))
    assert failed == [] and results == [1, 2, 3, 4] and state["calls"] == attempts


def test_an_event_batched_with_another_partitions_poison_event_is_not_set_aside() -> None:
    """Triton's dynamic batcher runs concurrent requests in one ``execute``; a model that raises
    fails them all. Two partitions each isolate one suspect at the same moment, one poison and one
    innocent: only the poison event may be set aside (the verdict is tried alone)."""
    health = Health()
    pending: list[tuple[list, asyncio.Future]] = []

    async def batched_model(part):  # requests within 5 ms share one execute call
        future = asyncio.get_running_loop().create_future()
        pending.append((list(part), future))
        if len(pending) == 1:
            await asyncio.sleep(0.005)
            calls, pending[:] = list(pending), []
            poisoned = any("poison" in p for p, _ in calls)
            for p, f in calls:
                f.set_exception(ValueError("bad input")) if poisoned else f.set_result(list(p))
        return await future

    async def others_succeed():  # the rest of the stream is being answered meanwhile
        while True:
            health.succeeded()
            await asyncio.sleep(0.001)

    async def both():
        background = asyncio.create_task(others_succeed())
        try:
            return await asyncio.gather(
                isolate(["poison"], batched_model, classify, health, attempts=3, delay=0.01, max_delay=0.02),
                isolate(["fine"], batched_model, classify, health, attempts=3, delay=0.01, max_delay=0.02))
        finally:
            background.cancel()

    (poison_results, poison_failed), (fine_results, fine_failed) = run(both())
    assert poison_results == [None] and [i for i, _ in poison_failed] == [0]
    assert fine_results == ["fine"] and fine_failed == []


def merging_model(window: float = 0.005):
    """A model behind Triton's dynamic batcher: requests that arrive within ``window`` s share one
    ``execute``, and one poison row fails them all. Returns the model and the list of calls made."""
    pending: list[tuple[list, asyncio.Future]] = []
    calls: list[list[list]] = []

    async def model(part):
        future = asyncio.get_running_loop().create_future()
        pending.append((list(part), future))
        if len(pending) == 1:
            await asyncio.sleep(window)
            merged, pending[:] = list(pending), []
            calls.append([p for p, _ in merged])
            poisoned = any(x == "poison" for p, _ in merged for x in p)
            for p, f in merged:
                f.set_exception(ValueError("bad input")) if poisoned else f.set_result(list(p))
        return await future

    return model, calls


def test_partitions_that_all_carry_poison_each_set_aside_only_their_poison() -> None:
    """Every partition's batch holds a poison event and nothing else is answered meanwhile (CI
    saw this stall: retries of all four partitions kept meeting in one ``execute``, so nothing
    ever succeeded, and no event could be judged). Once a batch has failed, its calls run alone."""
    model, calls = merging_model()
    health = Health()
    batches = [[f"{p}-{i}" for i in range(8)] for p in range(4)]
    for p, batch in enumerate(batches):
        batch[(3 * p + 1) % 8] = "poison"

    async def partitions():
        return await asyncio.gather(*(isolate(b, model, classify, health, attempts=2, delay=0.01, max_delay=0.05)
                                      for b in batches))

    for batch, (results, failed) in zip(batches, run(partitions())):
        assert [i for i, _ in failed] == [batch.index("poison")]
        assert results == [None if x == "poison" else x for x in batch]
    merged_after_failure = [c for c in calls[1:] if len(c) > 1]
    assert merged_after_failure == []  # once batches fail, no call shares an execute with another


def test_a_lone_poison_item_is_set_aside_once_the_model_answers_the_probe() -> None:
    """Nothing else runs through the item encoder: a harmless probe input, answered, is the
    evidence that the lone item is at fault; a broken model fails the probe too and is waited on."""
    state = {"broken": False, "calls": 0}

    async def encoder(part):
        state["calls"] += 1
        if state["broken"] or "poison" in part:
            raise ValueError("rejected")
        return [len(t) for t in part]

    results, failed = run(isolate(["poison"], encoder, classify, Health(), attempts=2, delay=0.001, probe="item"))
    assert results == [None] and [i for i, _ in failed] == [0]
    results, failed = run(isolate(["a", "poison", "ccc"], encoder, classify, Health(), attempts=2, delay=0.001,
                                  probe="item"))
    assert results == [1, None, 3] and [i for i, _ in failed] == [1]

    state["broken"] = True

    async def broken():
        stuck = asyncio.create_task(isolate(["fine"], encoder, classify, Health(), attempts=2, delay=0.001,
                                            max_delay=0.01, probe="item"))
        await asyncio.sleep(0.2)
        calls = state["calls"]
        assert not stuck.done()  # the probe fails too: nothing is set aside
        state["broken"] = False  # repaired
        return calls, await stuck

    calls, (results, failed) = run(broken())
    assert calls > 4 and results == [4] and failed == []
