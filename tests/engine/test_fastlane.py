"""FastLane: the multiplexed producer connection writes exactly what redis-py would, keeps
replies matched to callers through cancellation, timeouts, NOSCRIPT and dropped connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh import errors
from aqsh.clock import ManualClock
from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.fastlane import EXPLORE_EVERY, FastLane, _WaitChooser
from tests.support import wait_until

Q = keys.queue_keys("default")


@pytest.fixture
async def lane(redis: aioredis.Redis) -> AsyncIterator[FastLane]:
    made = FastLane.from_redis(redis)
    assert made is not None
    try:
        yield made
    finally:
        await made.aclose()


async def raw_task(redis: aioredis.Redis, qname: str, task_id: str) -> dict[bytes, bytes]:
    return await redis.hgetall(keys.queue_keys(qname).task(task_id))


async def test_fast_lane_writes_the_same_keys_as_redis_py(
    redis: aioredis.Redis, clock: ManualClock
) -> None:
    slow = Client(redis, clock=clock)
    async with Client(redis, clock=clock, fast_lane=True) as fast:
        for client, prefix in ((slow, "slow"), (fast, "fast")):
            for n in range(2):  # the first enqueue of a queue registers it, the second not
                await client.enqueue("email", b"p", task_id=f"{prefix}{n}", queue=prefix,
                                     headers={"h": "v"})
            await client.enqueue("email", b"u", task_id=f"{prefix}u", queue=prefix,
                                 unique_ttl=60)
            await client.enqueue("email", b"s", task_id=f"{prefix}s", queue=prefix,
                                 process_in=30)
            with pytest.raises(errors.TaskIdConflict):
                await client.enqueue("email", b"p", task_id=f"{prefix}0", queue=prefix)
            with pytest.raises(errors.DuplicateTask):
                await client.enqueue("email", b"u", queue=prefix, unique_ttl=60)
            batch = await client.enqueue_many([
                EnqueueRequest(type="b", payload=b"1", task_id=f"{prefix}b", queue=prefix),
                EnqueueRequest(type="b", payload=b"2", task_id=f"{prefix}0", queue=prefix),
            ])
            assert [type(r).__name__ for r in batch] == ["TaskInfo", "TaskIdConflict"]
    for suffix in ("0", "1", "u", "s", "b"):
        slow_hash = await raw_task(redis, "slow", "slow" + suffix)
        fast_hash = await raw_task(redis, "fast", "fast" + suffix)
        assert slow_hash.keys() == fast_hash.keys()
        assert slow_hash.get(b"state") == fast_hash.get(b"state")
    s, f = keys.queue_keys("slow"), keys.queue_keys("fast")
    assert [x.replace(b"slow", b"") for x in await redis.lrange(s.pending, 0, -1)] == [
        x.replace(b"fast", b"") for x in await redis.lrange(f.pending, 0, -1)]
    assert await redis.zscore(s.scheduled, "slows") == await redis.zscore(f.scheduled, "fasts")
    assert await redis.smembers(keys.ALL_QUEUES) == {b"slow", b"fast"}


async def test_concurrent_callers_share_one_connection_and_get_their_own_replies(
    redis: aioredis.Redis, lane: FastLane
) -> None:
    async def echo(n: int) -> bytes:
        return bytes(await lane.execute("ECHO", f"reply-{n}"))

    replies = await asyncio.gather(*(echo(n) for n in range(300)))
    assert replies == [f"reply-{n}".encode() for n in range(300)]
    clients = (await redis.execute_command("CLIENT", "LIST")).decode().splitlines()
    assert len(clients) == 2  # the test's redis-py connection and the lane


async def test_a_cancelled_caller_does_not_shift_later_replies(lane: FastLane) -> None:
    slow = asyncio.create_task(lane.execute("DEBUG", "SLEEP", "0.2"))
    await wait_until(lambda: lane._protocol is not None and len(lane._protocol.waiters) == 1)
    slow.cancel()
    assert await lane.execute("ECHO", "after") == b"after"


async def test_a_timeout_drops_the_connection_and_the_next_call_reconnects(
    redis: aioredis.Redis, lane: FastLane
) -> None:
    impatient = FastLane(lane.host, lane.port, timeout_s=0.1)
    first_id = await impatient.execute("CLIENT", "ID")
    with pytest.raises(RedisTimeoutError):
        await impatient.execute("DEBUG", "SLEEP", "0.5")
    await redis.ping()  # Redis is past its sleep
    assert await impatient.execute("ECHO", "fresh") == b"fresh"
    assert await impatient.execute("CLIENT", "ID") != first_id
    await impatient.aclose()


async def test_a_killed_connection_fails_waiters_and_reconnects(
    redis: aioredis.Redis, lane: FastLane, clock: ManualClock
) -> None:
    lane_id = await lane.execute("CLIENT", "ID")
    await redis.execute_command("CLIENT", "KILL", "ID", lane_id)
    await wait_until(lambda: lane._protocol is not None and lane._protocol.lost is not None)
    async with Client(redis, clock=clock, fast_lane=True) as client:
        client._lane = lane
        info = await client.enqueue("email", b"p")
    assert (await raw_task(redis, "default", info.id))[b"state"] == b"pending"


async def test_unreachable_redis_is_broker_unavailable(clock: ManualClock) -> None:
    from aqsh.redis_process import free_port

    redis = aioredis.Redis(port=free_port(), socket_timeout=1)
    async with Client(redis, clock=clock, fast_lane=True) as client:
        with pytest.raises(errors.BrokerUnavailable):
            await client.enqueue("email", b"p")
    await redis.aclose()


async def test_scripts_flushed_mid_flight_are_reloaded_and_run_once(
    redis: aioredis.Redis, clock: ManualClock
) -> None:
    async with Client(redis, clock=clock, fast_lane=True) as client:
        await client.enqueue("email", b"p", task_id="a")
        await redis.script_flush()
        await client.enqueue("email", b"p", task_id="b")
        await redis.script_flush()
        results = await client.enqueue_many(
            [EnqueueRequest(type="e", payload=b"", task_id=f"m{n}") for n in range(3)])
    assert all(not isinstance(r, Exception) for r in results)
    assert await redis.lrange(Q.pending, 0, -1) == [b"m2", b"m1", b"m0", b"b", b"a"]


async def test_error_replies_raise_for_single_commands(lane: FastLane) -> None:
    with pytest.raises(ResponseError, match="unknown command"):
        await lane.execute("NOT-A-COMMAND")
    assert await lane.execute("ECHO", "still in step") == b"still in step"


async def test_database_number_is_selected(redis_url: str, redis: aioredis.Redis) -> None:
    other = aioredis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3")
    made = FastLane.from_redis(other)
    assert made is not None
    assert made.db == 3
    await made.execute("SET", "where", "db3")
    assert await redis.get("where") is None
    assert await other.get("where") == b"db3"
    await made.aclose()
    await other.flushdb()
    await other.aclose()


def test_only_plain_tcp_clients_get_a_lane() -> None:
    assert FastLane.from_redis(aioredis.Redis(unix_socket_path="/tmp/none.sock")) is None
    assert FastLane.from_redis(aioredis.Redis.from_url("rediss://localhost:1")) is None


async def test_password_protected_redis(clock: ManualClock) -> None:
    from aqsh.redis_process import RedisProcess

    with RedisProcess() as server:  # its own server: the password must not leak into others
        setup = aioredis.Redis.from_url(server.url)
        await setup.config_set("requirepass", "s3cret")
        await setup.aclose()
        redis = aioredis.Redis.from_url(server.url.replace("redis://", "redis://:s3cret@"))
        async with Client(redis, clock=clock, fast_lane=True) as client:
            info = await client.enqueue("email", b"p")
        assert (await raw_task(redis, "default", info.id))[b"state"] == b"pending"
        wrong = aioredis.Redis.from_url(server.url.replace("redis://", "redis://:wrong@"))
        async with Client(wrong, clock=clock, fast_lane=True) as client:
            with pytest.raises(errors.BrokerUnavailable, match="handshake"):
                await client.enqueue("email", b"p")
        await redis.aclose()
        await wrong.aclose()


async def test_a_lone_caller_spins_for_its_reply_while_other_tasks_keep_running(
    lane: FastLane,
) -> None:
    patient = FastLane(lane.host, lane.port, spin_us=5_000_000)
    await patient.execute("PING")
    turns = 0
    stop = asyncio.Event()

    async def other_task() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_task())
    assert await patient.execute("DEBUG", "SLEEP", "0.05") == b"OK"
    stop.set()
    await ticker
    assert patient.spins_won == 2
    assert patient.spins_given_up == 0
    assert turns > 10  # the loop ran the other task all along the 50 ms spin
    await patient.aclose()


async def test_a_spin_that_runs_out_of_budget_parks_for_the_reply(lane: FastLane) -> None:
    spinner = FastLane(lane.host, lane.port, spin_us=1000)
    assert await spinner.execute("DEBUG", "SLEEP", "0.02") == b"OK"
    assert (spinner.spins_won, spinner.spins_given_up) == (0, 1)
    await spinner.aclose()


async def test_lone_calls_measure_both_waits_and_keep_trying_the_other(lane: FastLane) -> None:
    measured = FastLane(lane.host, lane.port)
    for n in range(4 * EXPLORE_EVERY):
        assert await measured.execute("ECHO", str(n)) == str(n).encode()
    spins = measured.spins_won + measured.spins_given_up
    assert spins + measured.parked == 4 * EXPLORE_EVERY
    assert spins >= 3
    assert measured.parked >= 3
    await measured.aclose()


def test_the_chooser_prefers_the_faster_wait_and_explores_the_other() -> None:
    chooser = _WaitChooser()
    first = []
    for _ in range(6):
        spun = chooser.spin_next()
        chooser.record(spun, 20e-6 if spun else 60e-6)
        first.append(spun)
    assert first == [True] * 3 + [False] * 3  # neither measured yet: measure both
    picks = [chooser.spin_next() for _ in range(2 * EXPLORE_EVERY)]
    assert picks.count(False) == 2  # spinning is faster: parking only to re-check it
    chooser.record(True, 0.05)  # one stalled call does not flip the choice
    assert chooser.prefers_spin
    for _ in range(20):  # Redis moved onto this core: spinning got slow
        chooser.record(True, 400e-6)
    assert not chooser.prefers_spin
    picks = [chooser.spin_next() for _ in range(2 * EXPLORE_EVERY)]
    assert picks.count(True) == 2
    # an exploring spin gives up once it has taken as long as a parked round trip
    assert chooser.spin_budget(200e-6) == pytest.approx(60e-6)
    for _ in range(20):
        chooser.record(True, 20e-6)
    assert chooser.prefers_spin
    assert chooser.spin_budget(200e-6) == 200e-6
    chooser.record(True, 55e-6)  # a spin that wins only by noise is not worth its CPU
    for _ in range(40):
        chooser.record(True, 55e-6)
    assert not chooser.prefers_spin


async def test_a_caller_cancelled_while_spinning_does_not_shift_later_replies(
    lane: FastLane,
) -> None:
    patient = FastLane(lane.host, lane.port, spin_us=5_000_000)
    slow = asyncio.create_task(patient.execute("DEBUG", "SLEEP", "0.1"))
    await wait_until(
        lambda: patient._protocol is not None and len(patient._protocol.waiters) == 1)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert await patient.execute("ECHO", "after") == b"after"
    await patient.aclose()


async def test_spinning_can_be_turned_off(lane: FastLane) -> None:
    parked = FastLane(lane.host, lane.port, spin_us=0)
    for _ in range(5):
        assert await parked.execute("ECHO", "x") == b"x"
    assert (parked.spins_won, parked.spins_given_up) == (0, 0)
    await parked.aclose()
