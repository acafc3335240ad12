"""The worker server against a real Redis: every outcome path, leases, recovery, shutdown.

Leases and retry times use a ManualClock; background loops get long intervals so the tests
drive them (``beat()``, ``run_once()``) instead of waiting for timers.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys, wire
from aqsh.engine.client import Client
from aqsh.engine.processor import queue_order
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import ServeMux, Server
from aqsh.engine.task import CancelReason, RevokeTask, SkipRetry, Task, TaskContext
from aqsh.redis_process import RedisProcess
from tests.support import wait_until

Q = keys.queue_keys("default")
ServerFactory = Callable[..., Server]


@pytest.fixture(params=[False, True], ids=["redis-py", "fast-lane"])
async def make_server(
    redis: aioredis.Redis, clock: ManualClock, request: pytest.FixtureRequest
) -> AsyncIterator[ServerFactory]:
    """Servers whose broker sends script calls through redis-py, or through its own fast lane
    as aqsh serve wires it."""
    servers: list[Server] = []
    brokers: list[RedisBroker] = []

    def factory(handler: Any, **options: Any) -> Server:
        options.setdefault("queues", {"default": 1})
        options.setdefault("heartbeat_interval_s", 3600)
        options.setdefault("forward_interval_s", 3600)
        options.setdefault("recover_interval_s", 3600)
        options.setdefault("janitor_interval_s", 3600)
        broker = RedisBroker(redis, fast_lane=request.param)
        brokers.append(broker)
        server = Server(broker, handler, clock=clock, **options)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop(shutdown_timeout_s=0)
    for broker in brokers:
        await broker.close_fast_lane()


@pytest.fixture
def client(redis: aioredis.Redis, clock: ManualClock) -> Client:
    return Client(redis, clock=clock)


async def state_of(redis: aioredis.Redis, task_id: str) -> str | None:
    raw = await redis.hget(Q.task(task_id), "state")
    return raw.decode() if raw else None


async def test_success_deletes_task_and_counts(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    seen: list[Task] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        seen.append(task)
        return None

    server = make_server(handler)
    await server.start()
    info = await client.enqueue("email", b"hi", headers={"k": "v"})
    await wait_until(lambda: redis.get(Q.processed_total), message="processed")
    assert await redis.exists(Q.task(info.id)) == 0
    assert [(t.type, t.payload, t.headers) for t in seen] == [("email", b"hi", {"k": "v"})]
    assert await redis.llen(Q.active) == 0
    assert await redis.zcard(Q.lease) == 0


async def test_success_with_retention_keeps_result(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return b"result:" + task.payload

    server = make_server(handler)
    await server.start()
    info = await client.enqueue("email", b"x", retention=3600)
    await wait_until(lambda: state_of(redis, info.id), message="task hash")
    await wait_until(lambda: redis.zscore(Q.completed, info.id), message="completed")
    h = await redis.hgetall(Q.task(info.id))
    assert (h[b"state"], h[b"result"]) == (b"completed", b"result:x")


async def test_failure_retries_with_delay_fn_then_archives(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, clock: ManualClock
) -> None:
    attempts: list[int] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        attempts.append(ctx.retry_count)
        raise ValueError("nope")

    server = make_server(handler, retry_delay=lambda n, exc, task: 10.0 * (n + 1))
    await server.start()
    info = await client.enqueue("email", b"x", max_retry=1)
    await wait_until(lambda: redis.zscore(Q.retry, info.id), message="retry")
    assert await redis.zscore(Q.retry, info.id) == unix_s(clock) + 10
    msg = wire.decode_task(await redis.hget(Q.task(info.id), "msg"))
    assert (msg.retried, msg.error_msg) == (1, "ValueError: nope")
    assert await redis.get(Q.failed_total) == b"1"
    clock.advance(10)
    assert await server.forwarder.run_once() == 1
    await wait_until(lambda: redis.zscore(Q.archived, info.id), message="archived")
    assert attempts == [0, 1]
    assert await redis.mget(Q.processed_total, Q.failed_total) == [b"2", b"2"]


async def test_skip_retry_archives_and_revoke_deletes_without_failure(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        if task.type == "skip":
            raise SkipRetry("bad input")
        raise RevokeTask("not needed")

    server = make_server(handler)
    await server.start()
    skip = await client.enqueue("skip", b"")
    revoke = await client.enqueue("revoke", b"")
    await wait_until(lambda: redis.zscore(Q.archived, skip.id), message="archived")
    await wait_until(lambda: _eq(redis, Q.processed_total, b"2"), message="both done")
    assert wire.decode_task(await redis.hget(Q.task(skip.id), "msg")).error_msg == "bad input"
    assert await redis.exists(Q.task(revoke.id)) == 0
    assert await redis.get(Q.failed_total) == b"1"  # only the archive counted as failure


async def _eq(redis: aioredis.Redis, key: str, value: bytes) -> bool:
    return bool(await redis.get(key) == value)


async def test_unexpected_exception_and_missing_handler_never_crash_the_worker(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    mux = ServeMux()
    ok: list[str] = []

    async def boom(task: Task, ctx: TaskContext) -> bytes | None:
        raise KeyError("x")

    async def fine(task: Task, ctx: TaskContext) -> bytes | None:
        ok.append(task.type)
        return None

    mux.handle("boom", boom)
    mux.handle("fine:", fine)
    server = make_server(mux)
    await server.start()
    b = await client.enqueue("boom", b"")
    u = await client.enqueue("unknown", b"")
    await client.enqueue("fine:one", b"")
    await wait_until(lambda: ok, message="fine handled")
    await wait_until(lambda: redis.zscore(Q.retry, u.id), message="unknown retried")
    await wait_until(lambda: redis.zscore(Q.retry, b.id), message="boom retried")
    err = wire.decode_task(await redis.hget(Q.task(u.id), "msg")).error_msg
    assert err == 'handler not found for task "unknown"'
    assert ok == ["fine:one"]


async def test_deadline_cancels_handler(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, clock: ManualClock
) -> None:
    reasons: list[CancelReason | None] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        try:
            await asyncio.Event().wait()
        finally:
            reasons.append(ctx.cancel_reason)
        return None

    server = make_server(handler)
    await server.start()
    info = await client.enqueue("slow", b"", timeout=1)
    await wait_until(lambda: redis.zscore(Q.retry, info.id), message="retry after deadline")
    assert reasons == [CancelReason.DEADLINE]
    assert wire.decode_task(await redis.hget(Q.task(info.id), "msg")).error_msg == (
        "context deadline exceeded")


async def subscribers(redis: aioredis.Redis, channel: str) -> int:
    """PUBSUB NUMSUB's count: its reply, ``[(channel, n)]``, is truthy even when n is 0, so a
    wait on the reply itself did not wait (a cancel published then was lost, seen on Valkey)."""
    return int((await redis.pubsub_numsub(channel))[0][1])


async def test_cancel_via_pubsub_stops_running_handler(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    started = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert ctx.cancel_reason is CancelReason.CANCELED
            raise SkipRetry("canceled") from None
        return None

    server = make_server(handler)
    await server.start()
    info = await client.enqueue("slow", b"")
    await asyncio.wait_for(started.wait(), 5)
    await wait_until(lambda: subscribers(redis, keys.CANCEL_CHANNEL), message="subscribed")
    await RedisBroker(redis).publish_cancel(info.id)
    await wait_until(lambda: redis.zscore(Q.archived, info.id), message="archived on cancel")


async def test_lost_lease_stops_handler_without_writing(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, clock: ManualClock
) -> None:
    started = asyncio.Event()
    reasons: list[CancelReason | None] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            reasons.append(ctx.cancel_reason)
        return None

    server = make_server(handler, concurrency=2)
    await server.start()
    a = await client.enqueue("slow", b"a")
    await asyncio.wait_for(started.wait(), 5)
    # Someone else (a recoverer) took the lease away: the next heartbeat must stop the handler.
    await redis.zrem(Q.lease, a.id)
    await server.heartbeater.beat()
    await wait_until(lambda: reasons, message="handler stopped")
    assert reasons == [CancelReason.LEASE_LOST]
    await wait_until(lambda: not server.processor.running, message="slot freed")
    assert await state_of(redis, a.id) == "active"  # untouched: the new owner decides

    started.clear()
    b = await client.enqueue("slow", b"b")
    await asyncio.wait_for(started.wait(), 5)
    clock.advance(31)  # heartbeats could not extend it in time
    await server.heartbeater.beat()
    await wait_until(lambda: len(reasons) == 2, message="second handler stopped")
    assert reasons[1] is CancelReason.LEASE_LOST
    assert await state_of(redis, b.id) == "active"


async def test_heartbeat_extends_leases_and_publishes_server_state(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client, clock: ManualClock
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        await release.wait()
        return None

    server = make_server(handler, concurrency=3, queues={"default": 2, "critical": 4})
    await server.start()
    info = await client.enqueue("slow", b"p")
    await asyncio.wait_for(started.wait(), 5)
    hb = server.heartbeater
    # The server's own first beat (possibly taken before the task ran) must be done before
    # ours, or its older snapshot could be the one left in Redis.
    await wait_until(lambda: hb.beats_completed >= 1, message="first heartbeat")
    clock.advance(20)
    await hb.beat()
    assert await redis.zscore(Q.lease, info.id) == unix_s(clock) + 30
    skey = keys.server_key(hb.host, hb.pid, hb.server_id)
    server_info = wire.decode_server(await redis.get(skey))
    assert (server_info.concurrency, server_info.queues, server_info.active_worker_count) == (
        3, {"default": 1, "critical": 2}, 1)
    workers = await redis.hgetall(keys.workers_key(hb.host, hb.pid, hb.server_id))
    worker = wire.decode_worker(workers[info.id.encode()])
    assert (worker.task_type, worker.task_payload, worker.queue) == ("slow", b"p", "default")
    release.set()
    await server.stop()
    assert await redis.exists(skey) == 0
    assert await redis.zcard(keys.ALL_SERVERS) == 0


async def test_recoverer_retries_or_archives_abandoned_tasks(
    redis: aioredis.Redis, make_server: ServerFactory, clock: ManualClock
) -> None:
    from aqsh.engine.models import TaskMessage

    now = unix_s(clock)
    for tid, retried in (("r1", 0), ("r2", 3)):
        m = TaskMessage(type="x", id=tid, queue="default", retry=3, retried=retried,
                        timeout_s=60)
        await redis.hset(Q.task(tid), mapping={"msg": wire.encode_task(m), "state": "active"})
        await redis.lpush(Q.active, tid)
        await redis.zadd(Q.lease, {tid: now - 31})

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        return None

    server = make_server(handler, retry_delay=lambda n, e, t: 100.0)
    assert await server.recoverer.run_once() == 2
    assert await redis.zscore(Q.retry, "r1") == now + 100
    assert await redis.zscore(Q.archived, "r2") == now
    for tid in ("r1", "r2"):
        msg = wire.decode_task(await redis.hget(Q.task(tid), "msg"))
        assert msg.error_msg == "asynq: task lease expired"
    assert await redis.llen(Q.active) == 0


async def test_a_recovered_task_runs_without_waiting_for_the_forwarders_round(
    redis: aioredis.Redis, make_server: ServerFactory, clock: ManualClock
) -> None:
    from aqsh.engine.models import TaskMessage

    m = TaskMessage(type="x", id="abandoned", queue="default", retry=3, timeout_s=60)
    await redis.hset(Q.task("abandoned"), mapping={"msg": wire.encode_task(m), "state": "active"})
    await redis.lpush(Q.active, "abandoned")
    await redis.zadd(Q.lease, {"abandoned": unix_s(clock) - 2})  # its worker died
    ran = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        ran.set()
        return None

    # The forwarder's own round is an hour away: only the recoverer's poke can move it.
    server = make_server(handler, retry_delay=lambda n, e, t: 0.0, recover_interval_s=0.2)
    await server.start()
    await asyncio.wait_for(ran.wait(), 10)


async def test_janitor_deletes_expired_completed(
    redis: aioredis.Redis, make_server: ServerFactory, clock: ManualClock
) -> None:
    now = unix_s(clock)
    await redis.hset(Q.task("c1"), mapping={"msg": b"m", "state": "completed"})
    await redis.zadd(Q.completed, {"c1": now - 1})
    server = make_server(lambda t, c: None)
    assert await server.janitor.run_once() == 1
    assert await redis.exists(Q.task("c1")) == 0


async def test_graceful_shutdown_requeues_what_still_runs(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    started = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        await asyncio.Event().wait()
        return None

    server = make_server(handler)
    await server.start()
    info = await client.enqueue("slow", b"")
    await asyncio.wait_for(started.wait(), 5)
    await server.stop(shutdown_timeout_s=0.2)
    assert await redis.lrange(Q.pending, 0, -1) == [info.id.encode()]
    assert await state_of(redis, info.id) == "pending"
    assert await redis.llen(Q.active) == 0
    assert await redis.zcard(Q.lease) == 0


async def test_graceful_shutdown_lets_short_handlers_finish(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        await release.wait()
        return None

    server = make_server(handler)
    await server.start()
    info = await client.enqueue("short", b"")
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(server.stop(shutdown_timeout_s=10))
    # stop() has begun (heartbeats say "closed") while the handler is still running
    await wait_until(lambda: server.heartbeater.status == "closed", message="stopping")
    assert not stopping.done()
    release.set()
    await stopping
    assert await redis.exists(Q.task(info.id)) == 0
    assert await redis.get(Q.processed_total) == b"1"


async def test_wakeup_starts_task_before_the_poll_would(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    started = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.set()
        return None

    server = make_server(handler, poll_interval_s=30.0)
    await server.start()
    await wait_until(lambda: subscribers(redis, keys.WAKE_CHANNEL), message="wake subscribed")
    loop = asyncio.get_running_loop()
    processor = server.processor

    def next_poll_is_far() -> bool:  # the processor has backed off to a long idle wait
        due = processor.next_poll_at
        return due is not None and due - loop.time() > 1.0

    await wait_until(next_poll_is_far, timeout_s=10, message="long idle wait")
    poll_due = processor.next_poll_at
    assert poll_due is not None
    await client.enqueue("quick", b"")
    await asyncio.wait_for(started.wait(), 5)
    assert loop.time() < poll_due  # started by the wake-up, before its next poll


async def test_paused_queue_is_not_served(
    redis: aioredis.Redis, make_server: ServerFactory, client: Client
) -> None:
    ran: list[str] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        ran.append(task.queue)
        return None

    await RedisBroker(redis).pause("default", now_s=1)
    server = make_server(handler, queues={"default": 1, "other": 1})
    await server.start()
    await client.enqueue("x", b"", queue="default")
    await client.enqueue("x", b"", queue="other")
    await wait_until(lambda: ran, message="other served")
    await server.processor.stop_fetching()
    assert ran == ["other"]
    assert await redis.llen(Q.pending) == 1


def test_queue_order_weighted_and_strict() -> None:
    queues = {"critical": 6, "default": 3, "low": 1}
    assert queue_order(queues, strict=True) == ["critical", "default", "low"]
    firsts = collections.Counter(queue_order(queues, strict=False)[0] for _ in range(5000))
    assert set(firsts) == set(queues)
    assert 0.55 < firsts["critical"] / 5000 < 0.65
    assert 0.25 < firsts["default"] / 5000 < 0.35


async def test_syncer_retries_a_write_lost_to_an_outage(clock: ManualClock) -> None:
    with RedisProcess(persistent=True) as server_proc:
        redis = aioredis.Redis.from_url(server_proc.url, socket_timeout=1,
                                        socket_connect_timeout=1)
        broker = RedisBroker(redis)
        client = Client(redis, clock=clock)
        info = await client.enqueue("x", b"")
        leased = await broker.dequeue(["default"], now_s=unix_s(clock))
        assert leased is not None
        server_proc.stop_keep_data()
        from aqsh.engine.syncer import Syncer

        syncer = Syncer(clock)

        async def write() -> None:
            await broker.done(leased.message, now_s=unix_s(clock))

        with pytest.raises(errors.BrokerUnavailable):
            await write()
        syncer.add(info.id, write, leased.lease_expires_s)
        assert await syncer.run_once() == 0
        assert len(syncer.pending) == 1
        server_proc.start()
        assert await syncer.run_once() == 1
        assert syncer.pending == []
        assert await redis.exists(Q.task(info.id)) == 0
        clock.advance(100)
        syncer.add("late", write, leased.lease_expires_s)
        assert await syncer.run_once() == 0  # lease passed: dropped, not retried
        assert syncer.pending == []
        await redis.aclose()


async def test_acknowledged_task_is_not_reported_as_a_lost_lease(
    redis: aioredis.Redis, make_server: ServerFactory, clock: ManualClock
) -> None:
    """A beat can race an ack: the lease is gone because the task finished, not stolen."""
    from aqsh.engine.models import TaskMessage
    from aqsh.engine.processor import Running, _Writer

    server = make_server(lambda t, c: None)
    broker = server.broker
    msg = TaskMessage(type="x", id="acked", queue="default", retry=1, timeout_s=60)

    async def finished_handler() -> bytes | None:
        return None

    run = Running(message=msg, lease_expires_s=clock.now_s() + 30, started_ns=0,
                  deadline=clock.now_s() + 60, result_writer=_Writer(broker, msg))
    run.handler_task = asyncio.create_task(finished_handler())
    await run.handler_task
    await server.heartbeater.extend_leases([run], int(clock.now_s()))
    assert run.cancel_reason is None


class _GatedAcks(RedisBroker):
    """A real broker whose acknowledgements wait at a gate the test opens: the window between
    a handler's success and its ack's reply, held open so the test can look inside it."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.gate = asyncio.Event()
        self.acks_waiting = 0

    async def finish_successes(self, *args: Any, **kwargs: Any) -> Any:
        self.acks_waiting += 1
        await self.gate.wait()
        return await super().finish_successes(*args, **kwargs)


async def test_a_success_gives_its_slot_back_before_its_ack_returns(
    redis: aioredis.Redis, clock: ManualClock, client: Client
) -> None:
    """At concurrency 1 the next task starts while the previous one's ack is on its way (they
    share a round trip), and the ack still lands: nothing is lost by giving the slot back."""
    started: list[str] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        started.append(task.id)
        return None

    broker = _GatedAcks(redis)
    server = Server(broker, handler, clock=clock, queues={"default": 1}, concurrency=1,
                    heartbeat_interval_s=3600, forward_interval_s=3600,
                    recover_interval_s=3600, janitor_interval_s=3600)
    first = await client.enqueue("t", b"1")
    second = await client.enqueue("t", b"2")
    await server.start()
    try:
        await wait_until(lambda: len(started) == 2, message="the second task starting")
        assert broker.acks_waiting >= 1  # the first ack was still held when the second started
        assert await redis.get(Q.processed_total) is None
        assert server.processor.busy <= 1
        broker.gate.set()

        async def both_acked() -> bool:
            return await redis.get(Q.processed_total) == b"2"

        await wait_until(both_acked, message="both acks")
        assert await redis.exists(Q.task(first.id), Q.task(second.id)) == 0
    finally:
        broker.gate.set()
        await server.stop(shutdown_timeout_s=5)
