"""The dequeue script applies a run's concurrency rule itself (lua/dequeue.lua with
lua/_flow_headers.lua): a limited run takes its slot, or is held and the next run taken, in
the one script call of the dequeue. Round trips are counted from Redis's own command stats."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from aqsh.engine import flow, keys, wire
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.client import Client
from aqsh.engine.models import TaskMessage
from aqsh.engine.rdb import DEQUEUE_HOLD_LIMIT, RedisBroker

Q = keys.queue_keys("default")


@pytest.fixture
def broker(redis: aioredis.Redis) -> RedisBroker:
    return RedisBroker(redis)


@pytest.fixture
async def client(redis: aioredis.Redis) -> AsyncIterator[Client]:
    async with Client(redis, wake_workers=False) as c:
        yield c


def now_s() -> int:
    return int(time.time())


async def script_calls(redis: aioredis.Redis) -> int:
    """EVALSHA calls since the last CONFIG RESETSTAT (every aqsh transition is one)."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def dequeue_counted(redis: aioredis.Redis, broker: RedisBroker,
                          limit: int) -> tuple[list[str], int]:
    """The ids one ``dequeue_many`` leased, and how many script calls it made."""
    await broker.scripts.load(["dequeue", "flow_acquire", "flow_rate"])
    await redis.config_resetstat()
    leased = await broker.dequeue_many(["default"], limit=limit, now_s=now_s())
    return [m.message.id for m in leased], await script_calls(redis)


async def test_a_limited_run_takes_its_slot_in_the_dequeue_call(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    rule = flow.headers(concurrency=flow.Concurrency("deploy:prod", 2))
    for n in range(3):
        await client.enqueue("deploy", b"{}", task_id=f"d{n}", headers=rule)
    start = now_s()
    leased, calls = await dequeue_counted(redis, broker, 10)
    assert leased == ["d0", "d1"]
    assert calls == 1  # no flow_acquire after it, and no second dequeue for the held d2
    slots = keys.flow_slots_key("default", "deploy:prod")
    for task_id in ("d0", "d1"):  # the slot is reserved until the lease's end
        assert (await redis.zscore(slots, task_id) or 0) >= start + LEASE_DURATION_S
        assert await redis.hget(Q.task(task_id), "state") == b"active"
    assert await redis.zscore(Q.scheduled, "d2") == flow.HELD_SCORE_S
    assert await redis.hget(keys.flow_registry_key("default"), "deploy:prod") == b"2"


async def test_dequeue_skips_a_held_run_and_takes_the_next_one(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    rule = flow.headers(concurrency=flow.Concurrency("deploy:prod", 1))
    await client.enqueue("deploy", b"{}", task_id="holder", headers=rule)
    (holder,) = await broker.dequeue_many(["default"], limit=1, now_s=now_s())
    await client.enqueue("deploy", b"{}", task_id="waiter", headers=rule)
    await client.enqueue("plain", b"{}", task_id="plain")
    leased, calls = await dequeue_counted(redis, broker, 1)
    assert leased == ["plain"]
    assert calls == 1
    assert [i.decode() for i in await redis.lrange(Q.active, 0, -1)] == ["plain", "holder"]
    assert await redis.zscore(Q.lease, "waiter") is None
    assert await redis.zscore(Q.scheduled, "waiter") == flow.HELD_SCORE_S
    fields = await redis.hmget(Q.task("waiter"), ["state", "pending_since",
                                                  flow.FIELD_REASON])
    assert fields == [b"scheduled", None, b"concurrency"]
    # The holder ends: the waiter is promoted and the next dequeue takes it.
    await broker.done(holder.message, now_s=now_s())
    leased, _ = await dequeue_counted(redis, broker, 10)
    assert leased == ["waiter"]


async def test_a_long_line_is_held_in_calls_of_bounded_length(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    rule = flow.headers(concurrency=flow.Concurrency("k", 1))
    await client.enqueue("t", b"", task_id="holder", headers=rule)
    await broker.dequeue_many(["default"], limit=1, now_s=now_s())
    for n in range(DEQUEUE_HOLD_LIMIT + 5):
        await client.enqueue("t", b"", task_id=f"w{n:03}", headers=rule)
    await client.enqueue("plain", b"", task_id="plain")
    leased, calls = await dequeue_counted(redis, broker, 1)
    assert leased == ["plain"]
    assert calls == 2  # the first call stopped at its hold limit
    assert await redis.zcard(keys.flow_wait_key("default", "k")) == DEQUEUE_HOLD_LIMIT + 5


async def test_the_script_reads_the_rule_as_the_worker_does(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    """The header walk on messages that test it: a payload that names the header without
    having it, a payload long enough for multi-byte lengths, and rules that are not rules
    (a limit Python's ``int`` alone would take). Neither side sees a rule the other does not."""
    big = b"x" * 70_000
    await client.enqueue("a", b"aqsh-concurrency-key aqsh-concurrency-limit 1", task_id="named")
    await client.enqueue("b", big, task_id="big",
                         headers=flow.headers(concurrency=flow.Concurrency("big", 1)))
    for n, limit in enumerate((" 5", "+5", "1_0", "0", "", "5.0")):
        await client.enqueue("c", b"", task_id=f"odd{n}",
                             headers={flow.HEADER_CONCURRENCY_KEY: "odd",
                                      flow.HEADER_CONCURRENCY_LIMIT: limit})
    leased = await broker.dequeue_many(["default"], limit=20, now_s=now_s())
    assert [m.message.id for m in leased] == ["named", "big", *(f"odd{n}" for n in range(6))]
    assert [m.message.payload for m in leased[:2]] == [
        b"aqsh-concurrency-key aqsh-concurrency-limit 1", big]
    assert await redis.zrange(keys.flow_slots_key("default", "big"), 0, -1) == [b"big"]
    assert not await redis.exists(keys.flow_slots_key("default", "odd"))
    for m in leased[2:]:
        assert flow.concurrency_of(m.message) is None
    raw = await redis.hget(Q.task("big"), "msg")
    assert flow.concurrency_of(wire.decode_task(raw)) == flow.Concurrency(
        "big", 1, flow.concurrency_of(leased[1].message).seq_us)  # type: ignore[union-attr]


async def test_a_run_with_a_rate_rule_is_admitted_by_its_window_first(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    """Both rules: the script leaves the run to the worker's rate step, which then takes the
    slot (lua/flow_rate.lua, lua/flow_acquire.lua): a slot is never taken by a run its
    window refuses."""
    both = flow.headers(concurrency=flow.Concurrency("c", 5), rate=flow.Rate("r", 1, 3600))
    for n in range(2):
        await client.enqueue("t", b"", task_id=f"r{n}", headers=both)
    leased = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in leased] == ["r0"]
    assert await redis.zrange(keys.flow_slots_key("default", "c"), 0, -1) == [b"r0"]
    assert await redis.hget(Q.task("r1"), flow.FIELD_REASON) == b"rate"


def _entry(first: tuple[int, bytes], second: tuple[int, bytes]) -> bytes:
    """A header map entry (field 15) with its two fields in the given order."""
    body = b"".join(bytes([tag, len(text)]) + text for tag, text in (first, second))
    return bytes([0x7A, len(body)]) + body


async def test_the_walk_reads_any_field_order_and_long_lengths(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    """Protobuf lets an encoder write an entry's value before its key, and a key of 200
    characters has multi-byte lengths: the script's general path must read both as the
    worker's decoder does."""
    long_key = "k" * 200
    await client.enqueue("t", b"", task_id="long",
                         headers=flow.headers(concurrency=flow.Concurrency(long_key, 1)))
    plain = wire.encode_task(TaskMessage(type="t", payload=b"", id="swapped", queue="default"))
    swapped = plain + b"".join(
        _entry((0x12, value.encode()), (0x0A, name.encode())) for name, value in
        ((flow.HEADER_CONCURRENCY_KEY, "swapped"), (flow.HEADER_CONCURRENCY_LIMIT, "1")))
    assert flow.concurrency_of(wire.decode_task(swapped)) == flow.Concurrency("swapped", 1)
    await redis.hset(Q.task("swapped"), mapping={"msg": swapped, "state": "pending"})
    await redis.lpush(Q.pending, "swapped")
    leased = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
    assert [m.message.id for m in leased] == ["long", "swapped"]
    for key, task_id in ((long_key, "long"), ("swapped", "swapped")):
        assert await redis.zrange(keys.flow_slots_key("default", key), 0, -1) == [
            task_id.encode()]


async def test_a_held_run_without_a_valid_seq_takes_its_place_by_the_dequeue_time(
        redis: aioredis.Redis, broker: RedisBroker, client: Client) -> None:
    """The seq header is checked only when a run is held (flow_take_slot): a valid one is its
    place in line as written, a missing or malformed one gives way to the dequeue's time."""
    rule = {flow.HEADER_CONCURRENCY_KEY: "k", flow.HEADER_CONCURRENCY_LIMIT: "1"}
    await client.enqueue("t", b"", task_id="holder", headers=rule)
    await client.enqueue("t", b"", task_id="valid",
                         headers={**rule, flow.HEADER_CONCURRENCY_SEQ: "5"})
    await client.enqueue("t", b"", task_id="none", headers=rule)
    await client.enqueue("t", b"", task_id="bad",
                         headers={**rule, flow.HEADER_CONCURRENCY_SEQ: "1e5"})
    start = now_s()
    leased = await broker.dequeue_many(["default"], limit=10, now_s=start)
    assert [m.message.id for m in leased] == ["holder"]
    line = keys.flow_wait_key("default", "k")
    assert await redis.zscore(line, "valid") == 5
    assert await redis.zscore(line, "none") == start * 1_000_000
    assert await redis.zscore(line, "bad") == start * 1_000_000
