"""FastLane: one multiplexed RESP connection for the producer hot path.

redis-py spends tens of microseconds of CPU per command (connection checkout, command packing,
response parsing through several layers), several times what the Redis protocol itself costs.
An enqueue is one short EVALSHA (plus a PUBLISH), so that overhead dominates its cost. This
connection writes commands packed by hiredis straight to an asyncio transport and resolves
replies in order from a hiredis reader:

* many coroutines share the one connection; their commands reach Redis back to back, so
  concurrent enqueues pipeline themselves instead of each waiting for a pooled connection;
* a list of commands is one ``write`` and one wait (``execute_many``);
* replies are never out of step with callers: a cancelled caller's reply is still read and
  dropped, and any timeout or connection loss closes the connection and fails every waiter, so
  the next call starts on a fresh connection;
* a lone caller may spin briefly before parking (``spin_us``). When Redis runs on another
  core, a sequential producer's round trip is dominated by the event loop going to sleep in
  ``epoll_wait`` and the kernel waking it up again, not by Redis; Go's runtime avoids that cost by
  spinning before it parks a thread. When Redis shares the caller's core, spinning holds the CPU
  Redis needs and parking is faster. The OS moves processes between those cases at run time, so
  the lane measures both (``_WaitChooser``) and spins only while spinning has been faster. The
  spin yields to the event loop on every turn (other tasks and I/O keep running) and is bounded.

It only speaks to a plain TCP standalone Redis (what ``from_redis`` can derive from a redis-py
client); TLS, unix sockets and Sentinel stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh.engine.connection import RedisClient
from aqsh.engine.scripts import script_source

Command = tuple[Any, ...]

DEFAULT_SPIN_US = 200
# Every this many lone calls, the wait the chooser does not prefer is tried again.
EXPLORE_EVERY = 64
# Spinning is preferred only when its average round trip is below this share of parking's.
SPIN_MUST_WIN_BY = 0.85
_FIRST_SAMPLES = 3  # of each wait, before comparing them


class _WaitChooser:
    """Spin or park for the next lone call: whichever has had the lower average round trip,
    trying the other one every ``EXPLORE_EVERY`` calls so that a change (the OS moving Redis to
    or from this core, a slower Redis) is noticed.

    Averages are exponentially weighted (1/8 per sample) with each sample capped at four times
    the current average, so one stalled call cannot flip the choice; it costs a few float
    operations per call, which matters at ~20 µs per enqueue.
    """

    def __init__(self) -> None:
        self._average = {True: 0.0, False: 0.0}
        self._count = {True: 0, False: 0}
        self._calls = 0

    @property
    def prefers_spin(self) -> bool:
        # Spinning costs CPU, so it must win clearly, not by noise.
        return self._average[True] < SPIN_MUST_WIN_BY * self._average[False]

    def spin_budget(self, longest_s: float) -> float:
        """A spin that outlasts a parked round trip has already lost, so while parking is the
        faster wait a spin (an exploring one) stops there: trying costs little when it fails."""
        park_s = self._average[False]
        return min(longest_s, park_s) if park_s and not self.prefers_spin else longest_s

    def spin_next(self) -> bool:
        self._calls += 1
        if self._count[True] < _FIRST_SAMPLES:
            return True
        if self._count[False] < _FIRST_SAMPLES:
            return False
        preferred = self.prefers_spin
        return not preferred if self._calls % EXPLORE_EVERY == 0 else preferred

    def record(self, spun: bool, round_trip_s: float) -> None:
        average = self._average[spun]
        self._count[spun] += 1
        if not average:
            self._average[spun] = round_trip_s
            return
        self._average[spun] = average + (min(round_trip_s, 4 * average) - average) / 8


def _reply_error(text: str) -> Exception:
    """Error replies as redis-py's own parser classifies them (NOSCRIPT, LOADING and READONLY
    after a restart or failover, ...), so callers treat them the same on both paths."""
    return cast(Exception, BaseParser.parse_error(text))  # type: ignore[no-untyped-call]


class _Protocol(asyncio.Protocol):
    """Feeds bytes into a hiredis reader and hands each reply to the oldest waiter.

    One watchdog timer per connection (not one per call: a timer per call costs as much as the
    rest of the call) fails the connection when the oldest reply is overdue, since replies can
    then no longer be matched to callers.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.reader = hiredis.Reader(replyError=_reply_error)
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self._outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        if self.lost is not None or self.transport is None:
            raise self.lost or RedisConnectionError("not connected")
        deadline = self._loop.time() + (self.timeout_s or 0.0)
        futures = [self._loop.create_future() for _ in commands]
        packed = b"".join([hiredis.pack_command(c) for c in commands])
        if self.waiters or self._outbox:
            # Replies are still due: other callers are active, so gather their commands into
            # one write (one syscall, one read on Redis's side) at the end of this loop pass.
            if not self._outbox:
                self._loop.call_soon(self._flush)
            self._outbox.append(packed)
        else:
            self.transport.write(packed)  # a lone caller gets no added latency
        self.waiters.extend((f, deadline) for f in futures)
        if self._watchdog is None and self.timeout_s is not None:
            self._watchdog = self._loop.call_at(deadline, self._check_overdue)
        return futures

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self.transport is not None and self.lost is None:
            self.transport.write(b"".join(outbox))

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self.waiters:
            return
        deadline = self.waiters[0][1]
        if deadline <= self._loop.time():
            self.fail(RedisTimeoutError("timed out waiting for redis"))
        else:
            self._watchdog = self._loop.call_at(deadline, self._check_overdue)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            waiter = self.waiters.popleft()[0]
            if not waiter.done():  # the caller may have been cancelled; its reply is dropped
                waiter.set_result(reply)

    def fail(self, exc: BaseException) -> None:
        """Close for good and fail every waiter with ``exc``."""
        if self.lost is None:
            self.lost = exc
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiters:
            waiter = self.waiters.popleft()[0]
            if not waiter.done():
                waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed'}"))


class FastLane:
    """A lazily (re)connected single connection; see the module docstring for why."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout_s: float | None = 5.0,
        spin_us: int = DEFAULT_SPIN_US,
    ) -> None:
        """``spin_us``: how long a lone caller keeps polling for its reply before it parks
        (0 turns spinning off)."""
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.db = db
        self.timeout_s = timeout_s
        self.spin_s = spin_us / 1e6
        self._chooser = _WaitChooser()
        # Lone calls answered while spinning / spins that ran out of budget / lone calls that
        # parked at once (for tests and for judging ``spin_us`` on a given deployment).
        self.spins_won = 0
        self.spins_given_up = 0
        self.parked = 0
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_redis(
        cls, client: RedisClient, *, spin_us: int = DEFAULT_SPIN_US
    ) -> FastLane | None:
        """A lane to the same server as ``client``, or None when it is not plain TCP."""
        pool = getattr(client, "connection_pool", None)  # a cluster client has none
        if pool is None or pool.connection_class is not Connection:
            return None
        kwargs = pool.connection_kwargs
        timeout = kwargs.get("socket_timeout")
        return cls(
            str(kwargs.get("host", "127.0.0.1")),
            int(kwargs.get("port", 6379)),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            db=int(kwargs.get("db", 0) or 0),
            timeout_s=float(timeout) if timeout else None,
            spin_us=spin_us,
        )

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self.timeout_s), self.host, self.port
                    )
                    handshake: list[Command] = []
                    if self.password:
                        handshake.append(
                            ("AUTH", self.username, self.password)
                            if self.username
                            else ("AUTH", self.password)
                        )
                    if self.db:
                        handshake.append(("SELECT", self.db))
                    for reply in await asyncio.gather(*protocol.send(handshake)):
                        if isinstance(reply, Exception):
                            failed = RedisConnectionError(f"redis handshake failed: {reply}")
                            protocol.fail(failed)
                            raise failed from reply
            except TimeoutError as exc:
                raise RedisTimeoutError("timed out connecting to redis") from exc
            self._protocol = protocol
            return protocol

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Replies in order; Redis error replies come back as redis-py exception objects.

        Raises redis-py's ConnectionError/TimeoutError when the connection fails or a reply is
        overdue; the next call connects afresh.
        """
        if not commands:
            return []
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        single = len(commands) == 1
        # A lone call may spin (others waiting means replies are already on their way, so
        # not then). Only lone single commands are timed, so samples compare like with like.
        lone = bool(self.spin_s) and not protocol.waiters
        spin = lone and (self._chooser.spin_next() if single else self._chooser.prefers_spin)
        started = time.perf_counter()
        futures = protocol.send(commands)
        if spin:
            await self._spin(futures, self._chooser.spin_budget(self.spin_s))
        elif lone:
            self.parked += 1
        if not single:
            return list(await asyncio.gather(*futures))
        replies = [await futures[0]]  # the hot path: no gather, one loop iteration fewer
        if lone:
            self._chooser.record(spin, time.perf_counter() - started)
        return replies

    async def _spin(self, futures: list[asyncio.Future[Any]], budget_s: float) -> None:
        """Poll (yielding to the loop each turn) until the call's replies are in or the budget
        is spent; replies arrive in order, so the last one settles them all."""
        last = futures[-1]
        give_up_at = time.perf_counter() + budget_s
        try:
            while not last.done():
                if time.perf_counter() >= give_up_at:
                    self.spins_given_up += 1
                    return
                await asyncio.sleep(0)
            self.spins_won += 1
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # their replies, when they come, are read and dropped
            raise

    async def execute(self, *command: Any) -> Any:
        reply = (await self.execute_many([command]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def execute_scripts(
        self, commands: Sequence[Command], script_names: Sequence[str]
    ) -> list[Any]:
        """Like ``execute_many`` for EVALSHA commands: after a NOSCRIPT (a restarted or flushed
        Redis) the scripts are loaded and only the failed commands are sent again, so no
        transition runs twice."""
        replies = await self.execute_many(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            await self.execute_many([("SCRIPT", "LOAD", script_source(n)) for n in script_names])
            again = await self.execute_many([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(RedisConnectionError("fast lane closed"))
            await asyncio.sleep(0)  # the transport closes its socket in a loop callback
