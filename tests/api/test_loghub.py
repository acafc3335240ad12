"""The shared log reader: one XREAD for many followers, each still getting exactly the entries
after its own position, slow followers dropped (and caught up) instead of buffered forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.api.loghub import Follower, LogHub, encode_event, stream_id
from aqsh.engine.faults import Loops
from tests.api.conftest import ServiceFactory, sse_events
from tests.support import redis_answers, wait_until


@pytest.fixture
async def hub(redis_url: str) -> AsyncIterator[LogHub]:
    reader = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    made = LogHub(reader, block_ms=5000)
    yield made
    await made.close()
    await reader.aclose()


async def received(follower: Follower, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        for share in await follower.take(5):
            out.extend(share.ids)
    return out


async def test_followers_get_what_is_after_their_own_position(
    redis: aioredis.Redis, hub: LogHub
) -> None:
    ids = [(await redis.xadd("logs:t", {"line": str(n)})).decode() for n in range(3)]
    ahead = hub.join("logs:t", ids[1])  # caught up to the second entry on its own
    assert await received(ahead, 1) == [ids[2]]
    behind = hub.join("logs:t", "0-0")  # joins behind the hub's position: it reads again
    assert await received(behind, 3) == ids
    later = (await redis.xadd("logs:t", {"line": "3"})).decode()
    assert await received(ahead, 1) == [later]
    assert await received(behind, 1) == [later]
    assert not ahead.waiting  # the re-read for `behind` gave `ahead` no duplicates


async def test_a_follower_takes_everything_waiting_at_once(
    redis: aioredis.Redis, hub: LogHub
) -> None:
    """Reads that queue while a follower is busy reach it as one ``take`` (one write)."""
    follower = hub.join("logs:c", "0-0")
    ids = []
    for n in range(3):
        ids.append((await redis.xadd("logs:c", {"line": str(n)})).decode())
        await wait_until(lambda n=n: len(follower.waiting) == n + 1, message="queued")
    shares = await follower.take(5)
    assert [i for share in shares for i in share.ids] == ids
    assert b"".join(share.data for share in shares) == b"".join(
        encode_event(str(n), id=ids[n]) for n in range(3))
    assert follower.queued_bytes == 0
    assert not follower.waiting


async def test_one_reader_serves_many_streams(redis: aioredis.Redis, hub: LogHub) -> None:
    followers = [hub.join(f"logs:{n}", "0-0") for n in range(20)]
    await wait_until(lambda: _blocked_xreads(redis), message="hub blocked in XREAD")
    for n in range(20):
        await redis.xadd(f"logs:{n}", {"line": f"line {n}"})
    for n, follower in enumerate(followers):
        [share] = await follower.take(5)
        assert share.data == encode_event(f"line {n}", id=share.ids[0])
    assert await _blocked_xreads(redis) <= 1


async def _blocked_xreads(redis: aioredis.Redis) -> int:
    clients = (await redis.execute_command("CLIENT", "LIST")).decode().splitlines()
    return sum(1 for c in clients if "cmd=xread" in c and "flags=b" in c)


async def test_a_follower_too_far_behind_is_dropped_not_buffered(
    redis: aioredis.Redis, redis_url: str
) -> None:
    reader = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    hub = LogHub(reader, queue_limit=1)
    slow = hub.join("logs:s", "0-0")
    await redis.xadd("logs:s", {"line": "1"})
    await wait_until(lambda: len(slow.waiting) == 1, message="first batch")
    await redis.xadd("logs:s", {"line": "2"})
    await wait_until(lambda: slow.dropped, message="dropped")
    assert "logs:s" not in hub._followers  # nothing more is kept for it
    assert len(slow.waiting) == 1
    assert stream_id("1-0") < stream_id("10-0")  # ids compare as numbers, not text
    await hub.close()
    await reader.aclose()


async def test_sse_followers_get_every_line_through_the_hub(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    service = await make_service()
    assert service.state.log_hub is not None
    service.state.log_hub.queue_limit = 1  # slow followers get dropped and catch up alone
    _, body, _ = await service.request("POST", "/tasks/lines?process_in=1s", json={"count": 3000})
    followers = [asyncio.create_task(sse_events(service, body["id"])) for _ in range(8)]
    results = await asyncio.wait_for(asyncio.gather(*followers), 60)
    for events in results:
        assert [e["data"] for e in events] == [f"line {n}" for n in range(3000)] + ["0"]
        ids = [stream_id(e["id"]) for e in events[:-1]]
        assert ids == sorted(set(ids))  # in order, no duplicates
    assert service.state.log_hub.reads > 0  # the live part came through the hub
    assert await _blocked_xreads(redis) <= 1


async def test_the_hub_resumes_after_a_redis_restart() -> None:
    from aqsh.redis_process import RedisProcess

    with RedisProcess(persistent=True) as server:
        reader = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        writer = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        hub = LogHub(reader, block_ms=1000)
        before = (await writer.xadd("logs:r", {"line": "before"})).decode()
        follower = hub.join("logs:r", before)
        await wait_until(lambda: _blocked_xreads(writer), message="hub reading")
        server.stop_keep_data()
        server.start()
        await wait_until(lambda: redis_answers(writer), timeout_s=15, interval_s=0.1,
                         message="up")
        after = (await writer.xadd("logs:r", {"line": "after"})).decode()
        assert await received(follower, 1) == [after]
        await hub.close()
        await reader.aclose()
        await writer.aclose()



async def test_a_follower_joining_behind_during_a_read_loses_nothing(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """The read that was under way when it joined cannot serve it (it started after the
    entries this follower still needs): it gets nothing from that read, and the cursor stays
    where its join put it, so the next read brings it everything in order."""
    reader = aioredis.Redis.from_url(redis_url)
    hub = LogHub(reader)
    ids = [(await redis.xadd("logs:j", {"line": str(n)})).decode() for n in range(4)]
    ahead = hub.join("logs:j", ids[1])
    await hub.close()  # drive the hub's steps by hand from here
    behind = hub.join("logs:j", "0-0")
    await hub.close()
    raw = await redis.xrange("logs:j", min=f"({ids[1]}", max="+")
    entries = [(i.decode(), f) for i, f in raw]
    hub._deliver("logs:j", entries, read_from=stream_id(ids[1]))  # the read issued before
    assert [share.ids for share in ahead.waiting] == [ids[2:]]
    assert not behind.waiting
    assert hub._cursor["logs:j"] == stream_id("0-0")  # the next read starts from `behind`
    raw = await redis.xrange("logs:j", min="-", max="+")
    hub._deliver("logs:j", [(i.decode(), f) for i, f in raw], read_from=stream_id("0-0"))
    assert [share.ids for share in behind.waiting] == [ids]
    assert [share.ids for share in ahead.waiting] == [ids[2:]]  # nothing twice
    await reader.aclose()


async def test_a_follower_over_its_byte_bound_is_dropped_not_buffered(
    redis: aioredis.Redis, redis_url: str
) -> None:
    reader = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    hub = LogHub(reader, follower_max_bytes=1000)
    slow = hub.join("logs:b", "0-0")
    await redis.xadd("logs:b", {"line": "x" * 600})
    await wait_until(lambda: len(slow.waiting) == 1, message="first batch")
    assert 600 < slow.queued_bytes < 1000
    await redis.xadd("logs:b", {"line": "y" * 600})
    await wait_until(lambda: slow.dropped, message="dropped for its bytes")
    assert "logs:b" not in hub._followers
    await slow.take(1)
    assert slow.queued_bytes == 0
    await hub.close()
    await reader.aclose()


async def test_a_failing_read_is_recorded_wakes_followers_and_is_retried(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """An error reply (the key of the wrong type) fails the hub's read: its monitor records
    it, the followers are woken to look for themselves, and the hub keeps reading."""
    loops = Loops()
    monitor = loops.monitor("sse_hub")
    reader = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    hub = LogHub(reader, block_ms=200, monitor=monitor)
    assert monitor.parked  # nobody follows yet: idle is not a stall
    await redis.set("logs:w", "not a stream")
    follower = hub.join("logs:w", "0-0")
    assert await follower.take(10) == []  # the wake-up
    assert monitor.errors_by_kind["wrongtype"] >= 1
    assert hub.read_failures >= 1
    await redis.delete("logs:w")
    added = (await redis.xadd("logs:w", {"line": "back"})).decode()
    batch: list[Any] = []
    while not batch:
        batch = await follower.take(10)  # further wake-ups may come before the news
    assert [entry_id for share in batch for entry_id in share.ids] == [added]
    assert monitor.consecutive_errors == 0
    hub.leave(follower)
    await hub.close()
    assert monitor.parked
    await reader.aclose()


async def test_a_follower_joining_behind_a_blocked_read_is_served_at_once(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A newcomer behind the hub's position makes it abandon its XREAD and read again from
    there. It must not wait for the abandoned read to end: redis-py lets a cancelled XREAD
    BLOCK that has been sent run out its block (30 s here; the take below allows 5)."""
    reader = aioredis.Redis.from_url(redis_url, socket_timeout=60)
    hub = LogHub(reader, block_ms=30_000)
    ids = [(await redis.xadd("logs:a", {"line": str(n)})).decode() for n in range(3)]
    ahead = hub.join("logs:a", ids[1])
    assert await received(ahead, 1) == [ids[2]]  # the hub goes straight on to its next XREAD
    behind = hub.join("logs:a", "0-0")
    assert await received(behind, 3) == ids
    assert not ahead.waiting
    hub.leave(ahead)
    hub.leave(behind)
    await reader.connection_pool.disconnect()  # ends the blocked read: close need not wait
    await hub.close()
    await reader.aclose()
