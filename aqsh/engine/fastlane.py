"""FastLane: one multiplexed RESP connection for the producer and worker hot paths.

redis-py spends tens of microseconds of CPU per command (connection checkout, command packing,
response parsing through several layers), several times what the Redis protocol itself costs.
An enqueue is one short EVALSHA (plus a PUBLISH), so that overhead dominates its cost. This
connection writes commands packed by hiredis straight to an asyncio transport and resolves
replies in order from a hiredis reader:

* many coroutines share the one connection; their commands reach Redis back to back, so
  concurrent enqueues pipeline themselves instead of each waiting for a pooled connection;
* a list of commands is one ``write`` and one wait (``execute_many``);
* replies are never out of step with callers: a cancelled caller's reply is still read and
  dropped, a reply nobody asked for is dropped, and any timeout, connection loss or bytes that
  are not RESP close the connection and fail every waiter, so the next call starts on a fresh
  connection;
* error replies come back as the exception classes redis-py's own parser picks (OOM, READONLY,
  NOPERM, ...): both transports look the same to the code above them;
* it is bounded: at most ``max_in_flight`` commands await replies and about
  ``max_write_buffer_bytes`` wait to be written; beyond that callers queue, first come first
  served, until Redis has caught up (a stalled Redis makes callers wait, not memory grow);
* connecting (TCP and the AUTH/SELECT handshake) has its own deadline, every reply has a read
  deadline, and TCP keepalive notices a peer that vanished while the connection sat idle;
* a lone caller may spin briefly before parking (``spin_us``). When Redis runs on another
  core, a sequential producer's round trip is dominated by the event loop going to sleep in
  ``epoll_wait`` and the kernel waking it up again, not by Redis; Go's runtime avoids that cost by
  spinning before it parks a thread. When Redis shares the caller's core, spinning holds the CPU
  Redis needs and parking is faster. The OS moves processes between those cases at run time, so
  the lane measures both (``_WaitChooser``) and spins only while spinning has been faster. The
  spin yields to the event loop on every turn (other tasks and I/O keep running) and is bounded.

It only speaks to a plain TCP standalone Redis (what ``from_redis`` can derive from a redis-py
client); TLS, unix sockets and Sentinel stay on redis-py. ``execute_scripts`` leaves the
NOSCRIPT reload to ``aqsh.engine.scripts``, the one place that does it for both transports;
that module does not import this one, so the two form no import cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh.engine import scripts
from aqsh.engine.connection import RedisClient

Command = tuple[Any, ...]

DEFAULT_SPIN_US = 200
#: TCP connect plus the AUTH/SELECT handshake.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: The read deadline when the redis-py client it is derived from sets none: without one a Redis
#: that accepts and never answers would hold every caller forever.
DEFAULT_TIMEOUT_S = 5.0
#: Far above any worker's concurrency or an API burst; the bound is there for a stalled Redis.
DEFAULT_MAX_IN_FLIGHT = 10_000
DEFAULT_MAX_WRITE_BUFFER_BYTES = 4 * 1024 * 1024
# Every this many lone calls, the wait the chooser does not prefer is tried again.
EXPLORE_EVERY = 64
# Spinning is preferred only when its average round trip is below this share of parking's.
SPIN_MUST_WIN_BY = 0.85
_FIRST_SAMPLES = 3  # of each wait, before comparing them


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """TCP keepalive probes: a connection idle for ``idle_s`` is probed every ``interval_s``
    and dropped after ``count`` unanswered probes (about a minute with the defaults), so a
    Redis host that vanished without a FIN is noticed before the next command waits on it.
    Only the platform's options that exist are set (Linux has all three)."""

    idle_s: int = 30
    interval_s: int = 10
    count: int = 3


DEFAULT_KEEPALIVE = KeepAlive()


def _set_keepalive(sock: Any, keepalive: KeepAlive) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # macOS names the idle time TCP_KEEPALIVE.
    idle_option = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
    for option, value in (
        (idle_option, keepalive.idle_s),
        (getattr(socket, "TCP_KEEPINTVL", None), keepalive.interval_s),
        (getattr(socket, "TCP_KEEPCNT", None), keepalive.count),
    ):
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


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
    after a restart or failover, OOM, NOPERM, ...), so callers treat them the same on both
    paths."""
    return cast(Exception, BaseParser.parse_error(text))  # type: ignore[no-untyped-call]


def _handshake_error(reply: Exception) -> Exception:
    """The reply's own class (AuthenticationError for a wrong password, as redis-py raises),
    saying where it happened."""
    try:
        return type(reply)(f"redis handshake failed: {reply}")
    except Exception:  # a class whose constructor parses its message (MOVED, ASK)
        return RedisConnectionError(f"redis handshake failed: {reply}")


class _Protocol(asyncio.Protocol):
    """Feeds bytes into a hiredis reader and hands each reply to the oldest waiter.

    One watchdog timer per connection (not one per call: a timer per call costs as much as the
    rest of the call) fails the connection when the oldest reply is overdue, since replies can
    then no longer be matched to callers.

    ``blocked`` is the one flag the hot path reads: set while the transport has paused writing,
    the outbox is over its limit or callers queue for room, so a newcomer queues behind them
    instead of overtaking.
    """

    def __init__(
        self,
        timeout_s: float | None,
        max_in_flight: int,
        max_write_buffer_bytes: int,
        keepalive: KeepAlive | None,
    ) -> None:
        self.reader = hiredis.Reader(replyError=_reply_error)
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self.max_write_buffer_bytes = max_write_buffer_bytes
        self.keepalive = keepalive
        self.blocked = False
        self.paused = False  # the transport's buffer is over its high-water mark
        self.outbox_bytes = 0
        self.unsolicited = 0  # replies that arrived while no command was in flight
        self._last_unsolicited: Any = None  # said when the connection then closes
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self._outbox: list[bytes] = []
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.max_write_buffer_bytes)
        sock = transport.get_extra_info("socket")
        if self.keepalive is not None and sock is not None:
            # Best effort: a platform that refuses an option still gets a working connection
            # (the read deadline then catches a vanished peer, later).
            with contextlib.suppress(OSError):
                _set_keepalive(sock, self.keepalive)

    # ------------------------------------------------------------ writing, within bounds
    def admits(self, count: int) -> bool:
        """Whether ``count`` more commands may be written now. A batch larger than the bound
        still goes out alone, or it could never be sent."""
        in_flight = len(self.waiters)
        return (
            not self.paused
            and self.outbox_bytes <= self.max_write_buffer_bytes
            and (not in_flight or in_flight + count <= self.max_in_flight)
        )

    @property
    def room_waiters(self) -> int:
        return len(self._room)

    async def wait_for_room(self, first: bool) -> None:
        """Queue until ``admits`` may have turned true; ``first``: back to the head of the
        queue (a caller that was woken but still did not fit keeps its turn)."""
        future = self._loop.create_future()
        if first:
            self._room.appendleft(future)
        else:
            self._room.append(future)
        self.blocked = True
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():
                # _wake_room may have dropped it already (it skips cancelled ones).
                with contextlib.suppress(ValueError):
                    self._room.remove(future)
            else:  # woken, then cancelled before its turn: the turn passes on
                self._wake_room()
            self._update_blocked()
            raise

    def _update_blocked(self) -> None:
        self.blocked = (
            self.paused or self.outbox_bytes > self.max_write_buffer_bytes or bool(self._room)
        )

    def _wake_room(self) -> None:
        """Wake the first queued caller if there is room; it wakes the next one once it has
        written (``send``), so they go out in queue order without a thundering herd."""
        while self._room and self.admits(1):
            future = self._room.popleft()
            if not future.done():
                future.set_result(None)
                break
        self._update_blocked()

    def pause_writing(self) -> None:
        self.paused = True
        self.blocked = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_room()

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
            self.outbox_bytes += len(packed)
            if self.outbox_bytes > self.max_write_buffer_bytes:
                self.blocked = True
        else:
            self.transport.write(packed)  # a lone caller gets no added latency
        self.waiters.extend((f, deadline) for f in futures)
        if self._watchdog is None and self.timeout_s is not None:
            self._watchdog = self._loop.call_at(deadline, self._check_overdue)
        if self._room:
            self._wake_room()
        return futures

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        self.outbox_bytes = 0
        if self.transport is not None and self.lost is None:
            self.transport.write(b"".join(outbox))  # may pause writing, synchronously
        if self.blocked:
            self._wake_room()

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self.waiters:
            return
        deadline = self.waiters[0][1]
        if deadline <= self._loop.time():
            self.fail(RedisTimeoutError("timed out waiting for redis"))
        else:
            self._watchdog = self._loop.call_at(deadline, self._check_overdue)

    # ------------------------------------------------------------ reading
    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                # Not RESP: nothing after this can be matched to a caller.
                self.fail(RedisConnectionError(f"protocol error from redis: {exc}"))
                return
            if reply is False:
                break
            if not waiters:
                # Every written command keeps its waiter until its reply is read (a cancelled
                # caller's too), so this reply answers none of ours (an error Redis sends
                # before closing, say); dropping it keeps later replies in step.
                self.unsolicited += 1
                self._last_unsolicited = reply
                continue
            waiter = waiters.popleft()[0]
            if not waiter.done():  # the caller may have been cancelled; its reply is dropped
                waiter.set_result(reply)
        if self._room:
            self._wake_room()

    def fail(self, exc: BaseException) -> None:
        """Close for good and fail every waiter with ``exc``; callers queued for room are
        woken to try a fresh connection (nothing of theirs was written)."""
        if self.lost is None:
            self.lost = exc
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.transport is not None:
            self.transport.abort()
        self._outbox.clear()
        self.outbox_bytes = 0
        while self.waiters:
            waiter = self.waiters.popleft()[0]
            if not waiter.done():
                waiter.set_exception(exc)
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
        self.blocked = False

    def connection_lost(self, exc: Exception | None) -> None:
        said = self._last_unsolicited
        # Redis refusing a client (max number of clients reached) says why, then closes.
        why = f" (redis said: {said})" if isinstance(said, Exception) else ""
        self.fail(RedisConnectionError(f"connection to redis lost: {exc or 'closed'}{why}"))


async def _in_order(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The results of one call's futures. Replies arrive in order, so once the last future is
    settled every one is: awaiting it alone spares ``asyncio.gather``'s wrapper future and
    per-child callbacks. A cancelled caller cancels them all (their replies are then read and
    dropped); on a failure, the others' exceptions (the same connection error) are retrieved
    so none is reported as never retrieved."""
    try:
        await futures[-1]
    except asyncio.CancelledError:
        for future in futures:
            future.cancel()
        raise
    except BaseException:
        for future in futures:
            if future.done() and not future.cancelled():
                future.exception()
        raise
    return [future.result() for future in futures]


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
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        spin_us: int = DEFAULT_SPIN_US,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_write_buffer_bytes: int = DEFAULT_MAX_WRITE_BUFFER_BYTES,
        keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
    ) -> None:
        """``timeout_s``: read deadline per reply (None: wait forever). ``spin_us``: how long
        a lone caller keeps polling for its reply before it parks (0 turns spinning off).
        ``max_in_flight`` / ``max_write_buffer_bytes``: beyond these, callers wait for room.
        ``keepalive=None`` turns TCP keepalive off."""
        if max_in_flight < 1 or max_write_buffer_bytes < 1:
            raise ValueError("max_in_flight and max_write_buffer_bytes must be positive")
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.db = db
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.spin_s = spin_us / 1e6
        self.max_in_flight = max_in_flight
        self.max_write_buffer_bytes = max_write_buffer_bytes
        self.keepalive = keepalive
        self._chooser = _WaitChooser()
        # Lone calls answered while spinning / spins that ran out of budget / lone calls that
        # parked at once (for tests and for judging ``spin_us`` on a given deployment).
        self.spins_won = 0
        self.spins_given_up = 0
        self.parked = 0
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._generation = 0  # bumped by aclose(): a handshake that straddles it is dropped
        self._handshaking: _Protocol | None = None  # a connection not yet ``_protocol``

    @classmethod
    def from_redis(
        cls,
        client: RedisClient,
        *,
        spin_us: int = DEFAULT_SPIN_US,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_write_buffer_bytes: int = DEFAULT_MAX_WRITE_BUFFER_BYTES,
        keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
    ) -> FastLane | None:
        """A lane to the same server as ``client``, with its timeouts, or None when it is not
        plain TCP."""
        pool = getattr(client, "connection_pool", None)  # a cluster client has none
        if pool is None or pool.connection_class is not Connection:
            return None
        kwargs = pool.connection_kwargs
        timeout = kwargs.get("socket_timeout")
        connect_timeout = kwargs.get("socket_connect_timeout")
        return cls(
            str(kwargs.get("host", "127.0.0.1")),
            int(kwargs.get("port", 6379)),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            db=int(kwargs.get("db", 0) or 0),
            timeout_s=float(timeout) if timeout else DEFAULT_TIMEOUT_S,
            connect_timeout_s=(
                float(connect_timeout) if connect_timeout else DEFAULT_CONNECT_TIMEOUT_S),
            spin_us=spin_us,
            max_in_flight=max_in_flight,
            max_write_buffer_bytes=max_write_buffer_bytes,
            keepalive=keepalive,
        )

    def _new_protocol(self) -> _Protocol:
        return _Protocol(
            self.timeout_s, self.max_in_flight, self.max_write_buffer_bytes, self.keepalive)

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            generation = self._generation
            loop = asyncio.get_running_loop()
            protocol: _Protocol | None = None
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    _, protocol = await loop.create_connection(
                        self._new_protocol, self.host, self.port)
                    self._handshaking = protocol
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
                            raise _handshake_error(reply) from reply
            except BaseException as exc:
                # Cancelled, timed out or refused half-way: the socket is this call's alone
                # (not yet ``self._protocol``), so it must be closed here or it leaks.
                if protocol is not None:
                    protocol.fail(RedisConnectionError("redis handshake abandoned"))
                if isinstance(exc, TimeoutError):  # asyncio.timeout's (an OSError too)
                    raise RedisTimeoutError("timed out connecting to redis") from exc
                if isinstance(exc, OSError):
                    raise RedisConnectionError(
                        f"error connecting to redis at {self.host}:{self.port}: {exc}"
                    ) from exc
                raise
            finally:
                self._handshaking = None
            if generation != self._generation:
                protocol.fail(RedisConnectionError("fast lane closed"))
                raise RedisConnectionError("fast lane closed while connecting")
            self._protocol = protocol
            return protocol

    async def _ready(self, count: int) -> _Protocol:
        """A connection with room for ``count`` more commands: connects, or queues behind
        earlier callers until Redis has read and answered enough."""
        woken = False
        while True:
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                protocol = await self._connect()
            if protocol.admits(count) and (woken or not protocol.room_waiters):
                return protocol
            await protocol.wait_for_room(first=woken)
            woken = True

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Replies in order; Redis error replies come back as redis-py exception objects.

        Raises redis-py's ConnectionError/TimeoutError when the connection fails or a reply is
        overdue; the next call connects afresh.
        """
        if not commands:
            return []
        protocol = self._protocol
        if (
            protocol is None
            or protocol.blocked
            or protocol.lost is not None
            or len(protocol.waiters) + len(commands) > self.max_in_flight
        ):
            protocol = await self._ready(len(commands))
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
            return await _in_order(futures)
        replies = [await futures[0]]  # the hot path: one future, nothing to collect
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

    async def load_scripts(self, sources: Sequence[str]) -> None:
        """SCRIPT LOAD each source; a refusal (OOM, NOPERM, ...) raises as redis-py would."""
        for reply in await self.execute_many([("SCRIPT", "LOAD", s) for s in sources]):
            if isinstance(reply, RedisError):
                raise reply

    async def execute_scripts(
        self, commands: Sequence[Command], script_names: Sequence[str]
    ) -> list[Any]:
        """Like ``execute_many`` for EVALSHA commands of ``aqsh.engine.scripts``' scripts:
        after a NOSCRIPT (a restarted or flushed Redis) the scripts are loaded and only the
        failed commands are sent again, so no transition runs twice."""
        return await scripts.execute_reloading(
            self.execute_many, self.load_scripts, commands, script_names)

    async def aclose(self) -> None:
        """Close the connection (one being set up included); a later call reconnects."""
        self._generation += 1
        closed = RedisConnectionError("fast lane closed")
        if self._handshaking is not None:
            self._handshaking.fail(closed)
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(closed)
            await asyncio.sleep(0)  # the transport closes its socket in a loop callback
