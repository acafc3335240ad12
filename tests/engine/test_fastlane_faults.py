"""The worker's Redis calls under faults, on the fast lane and on redis-py alike.

For each fault (connections dropped, a reply cut mid-frame, slow replies, a black-holed Redis,
a reconnect into a black hole, OOM, NOPERM, BUSY) and each worker call (dequeue, done,
mark_complete, a batched ack, extend_leases), through ``RedisBroker(fast_lane=True)`` and
``RedisBroker(fast_lane=False)``: the call either succeeds or fails with the error class
redis-py gives for that fault, and once the fault clears the broker dequeues, extends and
acknowledges a fresh task within 10 s.

The broker talks to a real ``redis-server`` through ``FaultProxy`` (the network faults) as an
ACL user of its own (NOPERM); the server faults are made on the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh import errors
from aqsh.engine import keys
from aqsh.engine.broker import Leased
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.engine.models import TaskMessage
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scripts import script_source
from aqsh.redis_process import RedisProcess
from tests.fault_proxy import FaultProxy
from tests.support import wait_until

Q = keys.queue_keys("default")
USER, PASSWORD = "worker", "worker-pw"
#: The broker's read deadline: a black-holed call fails after this long.
SOCKET_TIMEOUT_S = 1.0
RECOVERY_S = 10.0
SCRIPTS = ("enqueue", "dequeue", "done", "mark_complete", "write_result", "extend_lease")
#: Holds Redis (read-only, so SCRIPT KILL can end it) for up to ARGV[1] milliseconds.
BUSY_SCRIPT = """
local start = redis.call('TIME')
local until_ms = start[1] * 1000 + start[2] / 1000 + tonumber(ARGV[1])
while true do
  local now = redis.call('TIME')
  if now[1] * 1000 + now[2] / 1000 > until_ms then return 0 end
end
"""
_ids = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisProcess]:
    """A server of its own (its configuration is changed by the faults). A script counts as
    busy after 50 ms, so BUSY shows quickly."""
    with RedisProcess(extra_args=("--lua-time-limit", "50")) as made:
        yield made


@pytest.fixture
async def direct(server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """Straight to the server, as the default user: setup, faults and their repair."""
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    await client.execute_command(
        "ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "+@all")
    for name in SCRIPTS:  # loaded up front: a NOSCRIPT reload is not the fault under test
        await client.script_load(script_source(name))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def proxy(server: RedisProcess) -> AsyncIterator[FaultProxy]:
    made = await FaultProxy(server.port).start()
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture(params=[True, False], ids=["fast-lane", "redis-py"])
async def broker(request: pytest.FixtureRequest, proxy: FaultProxy) -> AsyncIterator[RedisBroker]:
    """The worker's broker as ``aqsh serve`` builds it (create_client's settings), through the
    proxy, as the ACL user."""
    client = create_client(RedisSettings(
        url=f"redis://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}/0",
        socket_timeout_s=SOCKET_TIMEOUT_S))
    made = RedisBroker(client, fast_lane=request.param)
    assert (made.lane is not None) is request.param
    try:
        yield made
    finally:
        await made.close_fast_lane()
        with contextlib.suppress(Exception):
            await client.aclose()


def now_s() -> int:
    return int(time.time())


async def enqueue(direct: aioredis.Redis, **fields: Any) -> TaskMessage:
    msg = TaskMessage(type="email", payload=b"p", id=f"t{next(_ids)}", queue="default",
                      retry=3, timeout_s=60, **fields)
    await RedisBroker(direct).enqueue(msg, now_ns=time.time_ns())
    return msg


# ------------------------------------------------------------ the calls under test


@dataclass
class Call:
    """One worker call, prepared before the fault (tasks enqueued or leased) and run in it."""

    broker: RedisBroker
    direct: aioredis.Redis
    leased: list[Leased] = field(default_factory=list)

    async def lease_one(self, **fields: Any) -> TaskMessage:
        msg = await enqueue(self.direct, **fields)
        self.leased = await self.broker.dequeue_many(["default"], limit=1, now_s=now_s())
        assert [lease.message.id for lease in self.leased] == [msg.id]
        return msg


Prepare = Callable[[Call], Awaitable[Callable[[], Awaitable[Any]]]]


async def prepare_dequeue(call: Call) -> Callable[[], Awaitable[Any]]:
    await enqueue(call.direct)
    return lambda: call.broker.dequeue_many(["default"], limit=1, now_s=now_s())


async def prepare_done(call: Call) -> Callable[[], Awaitable[Any]]:
    msg = await call.lease_one()
    return lambda: call.broker.done(msg, now_s=now_s())


async def prepare_mark_complete(call: Call) -> Callable[[], Awaitable[Any]]:
    msg = await call.lease_one(retention_s=600)
    return lambda: call.broker.mark_as_complete(msg, now_s=now_s())


async def prepare_finish_successes(call: Call) -> Callable[[], Awaitable[Any]]:
    """The processor's batched ack (result + done in one pipeline): per-task errors come back
    as values, so the first one is raised here to be judged like the others."""
    msg = await call.lease_one()

    async def run() -> None:
        outcome = await call.broker.finish_successes([msg], now_s=now_s(), results=[b"r"])
        if outcome[0] is not None:
            raise outcome[0]

    return run


async def prepare_extend_leases(call: Call) -> Callable[[], Awaitable[Any]]:
    msg = await call.lease_one()
    return lambda: call.broker.extend_leases("default", [msg.id], now_s=now_s())


CALLS: dict[str, Prepare] = {
    "dequeue": prepare_dequeue,
    "done": prepare_done,
    "mark_complete": prepare_mark_complete,
    "finish_successes": prepare_finish_successes,
    "extend_leases": prepare_extend_leases,
}


# ------------------------------------------------------------ the faults


#: Whether a failed call failed the right way.
Check = Callable[[BaseException], bool]


@dataclass
class Fault:
    """``start`` makes the fault and returns what a failed call must look like (a check on
    the exception, or None when the call must succeed); ``clear`` undoes it."""

    start: Callable[[FaultProxy, aioredis.Redis, RedisBroker], Awaitable[Check | None]]
    clear: Callable[[FaultProxy, aioredis.Redis], Awaitable[None]]
    #: Calls that may get through: a dropped socket may be noticed before the call is sent;
    #: under OOM Redis lets a script run on once it has written (an ack's first write is a
    #: removal, which frees memory), so an ack may succeed, the same on both transports.
    may_succeed: frozenset[str] = frozenset()


def redis_error(exc: BaseException) -> BaseException:
    """The Redis exception behind the broker's: BrokerUnavailable and the ack paths'
    AqshError carry it as their cause."""
    if isinstance(exc, RedisError) or exc.__cause__ is None:
        return exc
    return exc.__cause__


def unavailable(redis_class: type[BaseException]) -> Check:
    def check(exc: BaseException) -> bool:
        return isinstance(exc, errors.BrokerUnavailable) and isinstance(
            redis_error(exc), redis_class)
    return check


def error_reply(redis_class: type[BaseException], marker: str) -> Check:
    """An error reply: exactly redis-py's class for it (the batched ack reports it as text)."""
    def check(exc: BaseException) -> bool:
        if marker not in str(exc):
            return False
        cause = redis_error(exc)
        if isinstance(cause, RedisError):
            return type(cause) is redis_class
        return isinstance(exc, errors.AqshError)  # finish_successes: the reply's text only
    return check


async def _heal(proxy: FaultProxy, direct: aioredis.Redis) -> None:
    proxy.heal()


async def _start_drop(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> Check:
    proxy.drop_all()
    return unavailable(RedisConnectionError)


async def _start_cut(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> Check:
    proxy.cut_next_reply()
    return unavailable(RedisConnectionError)


async def _start_delay(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> None:
    proxy.reply_delay_s = SOCKET_TIMEOUT_S / 4  # slow, within the read deadline: must succeed
    return None


async def _start_black_hole(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> Check:
    proxy.black_hole = True
    return unavailable(RedisTimeoutError)


async def _start_reconnect_into_black_hole(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> Check:
    """The connection drops and the new one is accepted but never answered: the AUTH
    handshake itself hangs, so the connect deadline (or the dead socket) must end the call."""
    proxy.drop_all()
    proxy.black_hole = True
    # redis-py notices a dropped socket only by using it: this call spends it, so the call
    # under test connects afresh on both transports.
    with contextlib.suppress(errors.BrokerUnavailable):
        await broker.dequeue_many(["warm-up"], limit=1, now_s=now_s())
    return unavailable(RedisTimeoutError)


async def _start_oom(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> Check:
    await direct.config_set("maxmemory-policy", "noeviction")
    await direct.config_set("maxmemory", 1)
    # What redis-py raises for a script that writes while Redis is out of memory (the text
    # and so the class depend on the Redis version: 6.2 wraps the OOM in a script error, 7
    # passes the "-OOM ..." reply on, whose prefix redis-py turns into the class and drops).
    with pytest.raises(ResponseError, match="maxmemory") as refused:
        await direct.eval("return redis.call('SET', KEYS[1], 'v')", 1, "oom-probe")
    return error_reply(type(refused.value), "maxmemory")


async def _clear_oom(proxy: FaultProxy, direct: aioredis.Redis) -> None:
    await direct.config_set("maxmemory", 0)


async def _start_noperm(
    proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
) -> Check:
    await direct.execute_command("ACL", "SETUSER", USER, "-@scripting")
    return error_reply(NoPermissionError, "no permissions")  # redis-py drops the "NOPERM"


async def _clear_noperm(proxy: FaultProxy, direct: aioredis.Redis) -> None:
    await direct.execute_command("ACL", "SETUSER", USER, "+@all")


class _Busy:
    """A long read-only script on a connection of its own; SCRIPT KILL ends it."""

    def __init__(self) -> None:
        self.holder: aioredis.Redis | None = None
        self.task: asyncio.Task[Any] | None = None
        self.expected: type[BaseException] = ResponseError

    async def start(
        self, proxy: FaultProxy, direct: aioredis.Redis, broker: RedisBroker
    ) -> Check:
        kwargs = direct.connection_pool.connection_kwargs
        self.holder = aioredis.Redis(host=kwargs["host"], port=kwargs["port"])
        self.task = asyncio.create_task(self.holder.eval(BUSY_SCRIPT, 0, 20_000))
        await wait_until(lambda: self._busy(direct), message="the script holds Redis")
        return error_reply(self.expected, "BUSY")

    async def _busy(self, direct: aioredis.Redis) -> bool:
        try:
            await direct.ping()
        except ResponseError as exc:
            self.expected = type(exc)  # what redis-py raises for it
            return "BUSY" in str(exc)
        return False

    async def clear(self, proxy: FaultProxy, direct: aioredis.Redis) -> None:
        assert self.task is not None
        assert self.holder is not None
        await direct.script_kill()
        with contextlib.suppress(ResponseError):
            await self.task
        await self.holder.aclose()


def faults() -> dict[str, Callable[[], Fault]]:
    def busy() -> Fault:
        made = _Busy()
        return Fault(made.start, made.clear)

    return {
        "drop": lambda: Fault(_start_drop, _heal, may_succeed=frozenset(CALLS)),
        "cut": lambda: Fault(_start_cut, _heal),
        "delay": lambda: Fault(_start_delay, _heal),
        "black-hole": lambda: Fault(_start_black_hole, _heal),
        "reconnect-black-hole": lambda: Fault(_start_reconnect_into_black_hole, _heal),
        "oom": lambda: Fault(_start_oom, _clear_oom, may_succeed=frozenset(
            {"done", "mark_complete", "finish_successes"})),
        "noperm": lambda: Fault(_start_noperm, _clear_noperm),
        "busy": busy,
    }


FAULTS = faults()


# ------------------------------------------------------------ the test


async def works_again(broker: RedisBroker, direct: aioredis.Redis) -> bool:
    """A fresh task goes the worker's whole way: dequeued, lease extended, acknowledged."""
    msg = await enqueue(direct)
    try:
        leased = await broker.dequeue_many(["default"], limit=10, now_s=now_s())
        for lease in leased:
            _, lost = await broker.extend_leases("default", [lease.message.id], now_s=now_s())
            assert lost == []
            await broker.done(lease.message, now_s=now_s())
    except (errors.AqshError, RedisError):
        return False
    return any(lease.message.id == msg.id for lease in leased)


@pytest.mark.parametrize("fault_name", list(FAULTS))
@pytest.mark.parametrize("call_name", list(CALLS))
async def test_the_call_fails_as_redis_py_does_and_recovers_once_the_fault_clears(
    fault_name: str, call_name: str, broker: RedisBroker, direct: aioredis.Redis,
    proxy: FaultProxy,
) -> None:
    # A connection exists before the fault (a dropped or cut connection must be a used one).
    assert await broker.dequeue_many(["warm-up"], limit=1, now_s=now_s()) == []
    run = await CALLS[call_name](Call(broker, direct))
    fault = FAULTS[fault_name]()
    failed: BaseException | None = None
    try:
        expected = await fault.start(proxy, direct, broker)
        try:
            await asyncio.wait_for(run(), timeout=RECOVERY_S)
        except (errors.AqshError, RedisError) as exc:
            failed = exc
    finally:
        await fault.clear(proxy, direct)
    if failed is None:
        assert expected is None or call_name in fault.may_succeed, (
            f"{call_name} ignored the {fault_name}")
    else:
        assert expected is not None, f"{call_name} failed on a harmless {fault_name}: {failed!r}"
        assert expected(failed), f"{call_name} under {fault_name}: {failed!r} " \
                                 f"(redis error {redis_error(failed)!r})"
    await wait_until(lambda: works_again(broker, direct), timeout_s=RECOVERY_S,
                     interval_s=0.1, message=f"the broker working after {fault_name}")
    # Nothing is left active without a lease, whatever the fault did half-way.
    active = set(await direct.lrange(Q.active, 0, -1))
    leased = {member for member, _ in await direct.zrange(Q.lease, 0, -1, withscores=True)}
    assert active <= leased


async def test_a_failed_ack_leaves_the_task_active_and_leased(
    broker: RedisBroker, direct: aioredis.Redis, proxy: FaultProxy,
) -> None:
    """The half of a fault the recovery check cannot see: a refused ack changed nothing, so
    the task is still active under its lease (recovered later, never lost)."""
    call = Call(broker, direct)
    msg = await call.lease_one()
    await _start_noperm(proxy, direct, broker)
    try:
        with pytest.raises(errors.AqshError):
            await broker.done(msg, now_s=now_s())
    finally:
        await _clear_noperm(proxy, direct)
    assert await direct.lrange(Q.active, 0, -1) == [msg.id.encode()]
    assert await direct.zscore(Q.lease, msg.id) is not None
    assert await direct.hget(Q.task(msg.id), "state") == b"active"
