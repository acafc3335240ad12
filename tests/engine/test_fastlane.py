"""FastLane: the multiplexed producer connection writes exactly what redis-py would, keeps
replies matched to callers through cancellation, timeouts, NOSCRIPT and dropped connections."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh import errors
from aqsh.clock import ManualClock
from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.fastlane import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    EXPLORE_EVERY,
    FastLane,
    KeepAlive,
    _Protocol,
    _WaitChooser,
)
from aqsh.redis_process import RedisProcess, free_port, server_version
from tests.fault_proxy import FaultProxy
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


# ------------------------------------------------------------ faults, through a proxy


@pytest.fixture
async def proxy(redis_server: RedisProcess) -> AsyncIterator[FaultProxy]:
    made = await FaultProxy(redis_server.port).start()
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler: a protocol callback that raised
    (asyncio then logs it and closes the connection) shows up here."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


def protocol_of(lane: FastLane) -> _Protocol:
    assert lane._protocol is not None
    return lane._protocol


async def test_a_caller_cancelled_during_the_handshake_leaves_no_connection(
    proxy: FaultProxy,
) -> None:
    lane = FastLane("127.0.0.1", proxy.port, db=3)  # db 3: the lane sends SELECT first
    proxy.holding = True  # the SELECT reaches Redis, its reply does not come back
    caller = asyncio.create_task(lane.execute("PING"))
    await wait_until(lambda: proxy.open_connections == 1 and lane._connecting.locked())
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    proxy.release()
    await wait_until(lambda: proxy.open_connections == 0, message="the lane closes its socket")
    assert lane._protocol is None
    assert await lane.execute("ECHO", "after") == b"after"  # the next call connects afresh
    assert proxy.accepted == 2
    await lane.aclose()


async def test_a_handshake_that_outlasts_the_connect_timeout_leaves_no_connection(
    proxy: FaultProxy,
) -> None:
    # No read deadline at all: the connect timeout alone must end a handshake that hangs.
    lane = FastLane("127.0.0.1", proxy.port, db=3, timeout_s=None, connect_timeout_s=0.3)
    proxy.black_hole = True  # accepts, never answers
    with pytest.raises(RedisTimeoutError, match="connecting"):
        await asyncio.wait_for(lane.execute("PING"), 10)
    await wait_until(lambda: proxy.open_connections == 0, message="the lane closes its socket")
    proxy.heal()
    assert await lane.execute("ECHO", "back") == b"back"
    await lane.aclose()


async def test_closing_the_lane_during_a_handshake_keeps_no_connection(
    proxy: FaultProxy,
) -> None:
    lane = FastLane("127.0.0.1", proxy.port, db=3)
    proxy.holding = True
    caller = asyncio.create_task(lane.execute("PING"))
    await wait_until(lambda: proxy.open_connections == 1 and lane._connecting.locked())
    await lane.aclose()  # a shutdown while the connection is still being set up
    proxy.release()
    with pytest.raises(RedisConnectionError, match="closed"):
        await caller
    await wait_until(lambda: proxy.open_connections == 0, message="the lane closes its socket")
    assert lane._protocol is None


def test_connect_timeout_and_read_deadline_have_defaults_and_follow_the_client() -> None:
    plain = FastLane.from_redis(aioredis.Redis(port=1))
    assert plain is not None
    assert (plain.connect_timeout_s, plain.timeout_s) == (
        DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S)
    assert DEFAULT_CONNECT_TIMEOUT_S == 5.0
    tuned = FastLane.from_redis(
        aioredis.Redis(port=1, socket_timeout=2.5, socket_connect_timeout=1.5))
    assert tuned is not None
    assert (tuned.connect_timeout_s, tuned.timeout_s) == (1.5, 2.5)


async def test_the_socket_has_tcp_keepalive(lane: FastLane) -> None:
    await lane.execute("PING")
    sock = protocol_of(lane).transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    if hasattr(socket, "TCP_KEEPIDLE"):
        defaults = KeepAlive()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == defaults.idle_s
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == defaults.interval_s
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == defaults.count
    tuned = FastLane(lane.host, lane.port, keepalive=KeepAlive(idle_s=7, interval_s=3, count=2))
    await tuned.execute("PING")
    sock = protocol_of(tuned).transport.get_extra_info("socket")  # type: ignore[union-attr]
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
    await tuned.aclose()
    off = FastLane(lane.host, lane.port, keepalive=None)
    await off.execute("PING")
    sock = protocol_of(off).transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    await off.aclose()


async def test_a_reply_no_caller_waits_for_is_discarded_and_the_lane_stays_in_step(
    proxy: FaultProxy, loop_errors: list[dict[str, Any]]
) -> None:
    lane = FastLane("127.0.0.1", proxy.port)
    first_id = await lane.execute("CLIENT", "ID")
    proxy.inject(b"+unsolicited\r\n")  # nothing is in flight: no caller can own this reply
    await wait_until(lambda: protocol_of(lane).unsolicited == 1)
    assert await lane.execute("ECHO", "mine") == b"mine"
    assert await lane.execute("CLIENT", "ID") == first_id  # the same connection, still in step
    assert loop_errors == []
    await lane.aclose()


async def test_replies_of_cancelled_callers_are_dropped_in_order(proxy: FaultProxy) -> None:
    lane = FastLane("127.0.0.1", proxy.port)
    await lane.execute("PING")
    proxy.holding = True  # every command is written and run; the replies wait in the proxy
    callers = [asyncio.create_task(lane.execute("ECHO", f"r{n}")) for n in range(6)]
    await wait_until(lambda: len(protocol_of(lane).waiters) == 6)
    for n in (0, 2, 3):
        callers[n].cancel()
    later = [asyncio.create_task(lane.execute("ECHO", f"late{n}")) for n in range(3)]
    await wait_until(lambda: len(protocol_of(lane).waiters) == 9)
    proxy.release()
    assert [await callers[n] for n in (1, 4, 5)] == [b"r1", b"r4", b"r5"]
    assert await asyncio.gather(*later) == [b"late0", b"late1", b"late2"]
    await lane.aclose()


async def test_a_cancelled_call_of_several_commands_does_not_shift_later_replies(
    proxy: FaultProxy,
) -> None:
    """A call of several commands awaits only its last reply; cancelled, it gives up every
    one of its replies, and the next caller still gets its own."""
    lane = FastLane("127.0.0.1", proxy.port)
    await lane.execute("PING")
    proxy.holding = True
    call = asyncio.create_task(lane.execute_many([("ECHO", "a"), ("ECHO", "b"), ("ECHO", "c")]))
    await wait_until(lambda: len(protocol_of(lane).waiters) == 3)
    call.cancel()
    later = asyncio.create_task(lane.execute_many([("ECHO", "d"), ("ECHO", "e")]))
    await wait_until(lambda: len(protocol_of(lane).waiters) == 5)
    proxy.release()
    assert await later == [b"d", b"e"]
    with pytest.raises(asyncio.CancelledError):
        await call
    await lane.aclose()


@pytest.mark.parametrize("commands", [1, 3])
async def test_garbage_from_redis_fails_the_callers_and_the_lane_reconnects(
    proxy: FaultProxy, loop_errors: list[dict[str, Any]], commands: int
) -> None:
    """With several commands in the failed call, none of their futures is left holding an
    exception nobody retrieved (asyncio would report it to the loop's handler)."""
    lane = FastLane("127.0.0.1", proxy.port)
    await lane.execute("PING")
    proxy.holding = True
    caller = asyncio.create_task(lane.execute_many([("ECHO", "x")] * commands))
    await wait_until(lambda: len(protocol_of(lane).waiters) == commands)
    proxy.inject(b"!not resp\r\n")
    with pytest.raises(RedisConnectionError, match="protocol"):
        await caller
    proxy.heal()
    assert await lane.execute_many([("ECHO", "fresh")] * commands) == [b"fresh"] * commands
    assert proxy.accepted == 2
    gc.collect()  # a never-retrieved exception is reported when its future is collected
    assert loop_errors == []
    await lane.aclose()


async def test_in_flight_commands_are_bounded_and_callers_wait_for_room(
    redis: aioredis.Redis, proxy: FaultProxy
) -> None:
    lane = FastLane("127.0.0.1", proxy.port, max_in_flight=4)
    await lane.execute("PING")
    proxy.holding = True
    callers = [asyncio.create_task(lane.execute("INCR", "counter")) for _ in range(10)]
    await wait_until(lambda: protocol_of(lane).room_waiters == 6)
    await wait_until(lambda: redis.get("counter"), message="the first commands reach Redis")
    await wait_until(lambda: _equals(redis.get("counter"), b"4"))
    assert len(protocol_of(lane).waiters) == 4  # the other six were never written
    proxy.release()
    assert sorted(await asyncio.gather(*callers)) == list(range(1, 11))
    # A batch larger than the bound still goes out when nothing else is in flight.
    assert await lane.execute_many([("INCR", "counter")] * 6) == list(range(11, 17))
    await lane.aclose()


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_caller_cancelled_while_waiting_for_room_sends_nothing(
    redis: aioredis.Redis, proxy: FaultProxy
) -> None:
    lane = FastLane("127.0.0.1", proxy.port, max_in_flight=1)
    await lane.execute("PING")
    proxy.holding = True
    first = asyncio.create_task(lane.execute("INCR", "counter"))
    waiting = asyncio.create_task(lane.execute("INCR", "counter"))
    third = asyncio.create_task(lane.execute("INCR", "counter"))
    await wait_until(lambda: protocol_of(lane).room_waiters == 2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    proxy.release()
    assert (await first, await third) == (1, 2)
    assert await redis.get("counter") == b"2"
    await lane.aclose()


async def test_the_write_buffer_is_bounded_while_redis_does_not_read(
    redis: aioredis.Redis, proxy: FaultProxy
) -> None:
    limit = 256 * 1024
    value = b"v" * (512 * 1024)
    lane = FastLane("127.0.0.1", proxy.port, max_write_buffer_bytes=limit)
    await lane.execute("PING")
    sock = protocol_of(lane).transport.get_extra_info("socket")  # type: ignore[union-attr]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)  # little room in the kernel
    proxy.stalled = True  # Redis (behind the proxy) reads nothing more
    callers = [asyncio.create_task(lane.execute("SET", f"big{n}", value)) for n in range(16)]
    await wait_until(lambda: protocol_of(lane).room_waiters > 0 and protocol_of(lane).paused)
    protocol = protocol_of(lane)
    assert protocol.transport is not None
    buffered = protocol.transport.get_write_buffer_size() + protocol.outbox_bytes
    assert buffered <= limit + 2 * len(value)  # the bound, overshot by at most one write
    proxy.stalled = False
    assert await asyncio.gather(*callers) == [b"OK"] * 16
    assert await redis.strlen("big15") == len(value)
    await lane.aclose()


async def test_black_holed_redis_times_out_and_the_lane_reconnects(proxy: FaultProxy) -> None:
    lane = FastLane("127.0.0.1", proxy.port, timeout_s=0.3)
    await lane.execute("PING")
    proxy.black_hole = True
    with pytest.raises(RedisTimeoutError):
        await asyncio.wait_for(lane.execute("PING"), 10)
    proxy.heal()
    assert await lane.execute("ECHO", "back") == b"back"
    assert proxy.accepted == 2
    await lane.aclose()


async def test_a_reply_cut_mid_frame_fails_the_caller_and_the_lane_reconnects(
    proxy: FaultProxy,
) -> None:
    lane = FastLane("127.0.0.1", proxy.port)
    await lane.execute("PING")
    proxy.cut_next_reply()
    with pytest.raises(RedisConnectionError):
        await lane.execute("ECHO", "x" * 100)
    assert proxy.cuts == 1
    assert await lane.execute("ECHO", "whole") == b"whole"
    await lane.aclose()


# ------------------------------------------------------------ error replies, as redis-py


@pytest.fixture(scope="module")
def fault_server() -> Iterator[RedisProcess]:
    """A server of its own: the error cases change its configuration (maxmemory, ACL users,
    replication) and must not leak into other tests."""
    with RedisProcess(extra_args=("--lua-time-limit", "50"), debug_command=True) as server:
        yield server


async def test_a_server_started_with_debug_command_allows_debug_on_any_version(
    fault_server: RedisProcess,
) -> None:
    assert ("--enable-debug-command" in fault_server.command()) == (server_version() >= (7,))
    redis = aioredis.Redis.from_url(fault_server.url)
    assert await redis.execute_command("DEBUG", "SLEEP", "0") == b"OK"
    await redis.aclose()


async def _both_fail(
    redis: aioredis.Redis, lane: FastLane, *command: Any
) -> tuple[BaseException, BaseException]:
    with pytest.raises(RedisError) as via_redis_py:
        await redis.execute_command(*command)
    with pytest.raises(RedisError) as via_lane:
        await lane.execute(*command)
    return via_redis_py.value, via_lane.value


async def test_error_replies_are_redis_pys_exceptions_and_leave_the_lane_running(
    fault_server: RedisProcess,
) -> None:
    redis = aioredis.Redis.from_url(fault_server.url)
    lane = FastLane("127.0.0.1", fault_server.port)
    await redis.flushall()
    lane_id = await lane.execute("CLIENT", "ID")
    seen: dict[str, tuple[BaseException, BaseException]] = {}
    await redis.set("text", "v")
    seen["wrongtype"] = await _both_fail(redis, lane, "LPUSH", "text", "x")
    seen["noscript"] = await _both_fail(redis, lane, "EVALSHA", "0" * 40, 0)
    try:
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        seen["oom"] = await _both_fail(redis, lane, "SET", "k", "v")
    finally:
        await redis.config_set("maxmemory", 0)
    try:
        await redis.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a master never up
        seen["readonly"] = await _both_fail(redis, lane, "SET", "k", "v")
        await redis.config_set("replica-serve-stale-data", "no")
        seen["masterdown"] = await _both_fail(redis, lane, "GET", "k")
    finally:
        await redis.config_set("replica-serve-stale-data", "yes")
        await redis.execute_command("REPLICAOF", "NO", "ONE")
    await redis.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-set")
    limited = aioredis.Redis.from_url(fault_server.url, username="limited", password="pw")
    limited_lane = FastLane("127.0.0.1", fault_server.port, username="limited", password="pw")
    seen["noperm"] = await _both_fail(limited, limited_lane, "SET", "k", "v")
    assert await limited_lane.execute("GET", "text") == b"v"
    await limited.aclose()
    await limited_lane.aclose()
    wrong = aioredis.Redis.from_url(fault_server.url, username="limited", password="wrong")
    wrong_lane = FastLane("127.0.0.1", fault_server.port, username="limited", password="wrong")
    seen["wrongpass"] = await _both_fail(wrong, wrong_lane, "GET", "text")
    await wrong.aclose()
    await wrong_lane.aclose()
    busy = asyncio.create_task(redis.eval(BUSY_SCRIPT, 0, 10_000))
    probe = aioredis.Redis.from_url(fault_server.url)
    try:
        await wait_until(lambda: _is_busy(probe), message="the script holds Redis")
        seen["busy"] = await _both_fail(probe, lane, "GET", "text")
    finally:
        await probe.script_kill()
        with pytest.raises(ResponseError):
            await busy
        await probe.aclose()
    expected = {
        "wrongtype": ResponseError, "noscript": NoScriptError, "oom": OutOfMemoryError,
        "readonly": ReadOnlyError, "masterdown": MasterDownError,
        "noperm": NoPermissionError, "busy": ResponseError,
        "wrongpass": AuthenticationError,
    }
    for case, (via_redis_py, via_lane) in seen.items():
        assert type(via_lane) is type(via_redis_py) is expected[case], case
        if case == "wrongpass":  # the lane says it happened while connecting
            assert str(via_lane) == f"redis handshake failed: {via_redis_py}"
        else:
            assert str(via_lane) == str(via_redis_py), case
    assert await lane.execute("CLIENT", "ID") == lane_id  # one connection through it all
    await lane.aclose()
    await redis.aclose()


#: Holds Redis (read-only, so SCRIPT KILL can end it) for up to ARGV[1] milliseconds.
BUSY_SCRIPT = """
local start = redis.call('TIME')
local until_ms = start[1] * 1000 + start[2] / 1000 + tonumber(ARGV[1])
while true do
  local now = redis.call('TIME')
  if now[1] * 1000 + now[2] / 1000 > until_ms then return 0 end
end
"""


async def _is_busy(probe: aioredis.Redis) -> bool:
    try:
        await probe.ping()
    except ResponseError as exc:
        return "BUSY" in str(exc)
    return False


async def test_a_redis_at_its_client_limit_is_a_connection_error_saying_so(
    fault_server: RedisProcess, loop_errors: list[dict[str, Any]]
) -> None:
    admin = aioredis.Redis.from_url(fault_server.url)
    await admin.ping()
    clients = len((await admin.execute_command("CLIENT", "LIST")).splitlines())
    lane = FastLane("127.0.0.1", fault_server.port)
    await admin.config_set("maxclients", clients)  # the lane's connection is one too many
    try:
        # Redis writes its refusal as soon as it accepts, then closes: the lane sees it as the
        # reply to its command or, when it comes first, as a reply nobody asked for (below).
        with pytest.raises(RedisConnectionError, match="max number of clients reached"):
            await lane.execute("PING")
    finally:
        await admin.config_set("maxclients", 10_000)
    assert await lane.execute("ECHO", "admitted") == b"admitted"
    assert loop_errors == []
    await lane.aclose()
    await admin.aclose()


async def test_a_refusal_redis_sends_before_closing_is_named_in_the_connection_error(
    proxy: FaultProxy,
) -> None:
    lane = FastLane("127.0.0.1", proxy.port)
    await lane.execute("PING")
    proxy.inject(b"-ERR max number of clients reached\r\n")
    await wait_until(lambda: protocol_of(lane).unsolicited == 1)
    proxy.drop_all()
    await wait_until(lambda: protocol_of(lane).lost is not None)
    assert "max number of clients reached" in str(protocol_of(lane).lost)
    await lane.aclose()


async def test_a_cancelled_room_waiter_already_dropped_from_the_queue_stays_cancelled(
    proxy: FaultProxy,
) -> None:
    lane = FastLane("127.0.0.1", proxy.port, max_in_flight=1)
    await lane.execute("PING")
    proxy.holding = True
    first = asyncio.create_task(lane.execute("ECHO", "first"))
    cancelled = asyncio.create_task(lane.execute("ECHO", "cancelled"))
    last = asyncio.create_task(lane.execute("ECHO", "last"))
    await wait_until(lambda: protocol_of(lane).room_waiters == 2)
    cancelled.cancel()
    # Before the cancelled caller runs again, the connection fails and empties the queue.
    protocol_of(lane).fail(RedisConnectionError("gone"))
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(RedisConnectionError, match="gone"):
        await first
    proxy.release()
    assert await last == b"last"  # woken by the failure, it went out on a new connection
    await lane.aclose()
