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
  the next call starts on a fresh connection.

It only speaks to a plain TCP standalone Redis (what ``from_redis`` can derive from a redis-py
client); TLS, unix sockets and Sentinel stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh.engine.scripts import script_source

Command = tuple[Any, ...]


def _reply_error(text: str) -> ResponseError:
    """Error replies as redis-py's classes, so callers classify them the same on both paths."""
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ResponseError(text)


class _Protocol(asyncio.Protocol):
    """Feeds bytes into a hiredis reader and hands each reply to the oldest waiter."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=_reply_error)
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            waiter = self.waiters.popleft()
            if not waiter.done():  # the caller may have been cancelled; its reply is dropped
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"connection to redis lost: {exc or 'closed'}")
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)


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
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.db = db
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_redis(cls, client: aioredis.Redis) -> FastLane | None:
        """A lane to the same server as ``client``, or None when it is not plain TCP."""
        pool = client.connection_pool
        if pool.connection_class is not Connection:
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
        )

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            if self._protocol is not None and self._protocol.lost is None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
                    handshake: list[Command] = []
                    if self.password:
                        handshake.append(
                            ("AUTH", self.username, self.password)
                            if self.username
                            else ("AUTH", self.password)
                        )
                    if self.db:
                        handshake.append(("SELECT", self.db))
                    for reply in await self._send(protocol, handshake):
                        if isinstance(reply, ResponseError):
                            if protocol.transport is not None:
                                protocol.transport.close()
                            raise RedisConnectionError(f"redis handshake failed: {reply}")
            except TimeoutError as exc:
                raise RedisTimeoutError("timed out connecting to redis") from exc
            self._protocol = protocol
            return protocol

    @staticmethod
    def _send(protocol: _Protocol, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        if protocol.lost is not None or protocol.transport is None:
            raise protocol.lost or RedisConnectionError("not connected")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiters.extend(futures)
        protocol.transport.write(b"".join(hiredis.pack_command(c) for c in commands))
        return asyncio.gather(*futures) if len(futures) != 1 else _listed(futures[0])

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]:
        """Replies in order; Redis error replies come back as ResponseError objects."""
        if not commands:
            return []
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        pending = self._send(protocol, commands)
        try:
            if self.timeout_s is None:
                return await pending
            async with asyncio.timeout(self.timeout_s):
                return await pending
        except TimeoutError as exc:
            # Replies can no longer be matched to callers: start over on a new connection.
            self._abort(protocol)
            raise RedisTimeoutError("timed out waiting for redis") from exc

    async def execute(self, *command: Any) -> Any:
        reply = (await self.execute_many([command]))[0]
        if isinstance(reply, ResponseError):
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

    def _abort(self, protocol: _Protocol) -> None:
        if protocol.transport is not None:
            protocol.transport.abort()
        protocol.connection_lost(None)

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


def _listed(future: asyncio.Future[Any]) -> asyncio.Future[list[Any]]:
    """A single reply as a one-element list, without gather's task-per-call overhead."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[list[Any]] = loop.create_future()

    def _done(f: asyncio.Future[Any]) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
        elif (exc := f.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result([f.result()])

    future.add_done_callback(_done)
    return out
