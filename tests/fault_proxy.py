"""A TCP proxy in front of a real ``redis-server`` that misbehaves on request.

The fast-lane, fault and CLI tests need a Redis that answers late, answers half a reply, stops
answering, stops reading or applies a command whose reply is then lost, none of which a real
server does when asked. Redis sees an ordinary client; nothing is mocked. The proxy runs in the
test's own event loop, so flipping a fault is a plain attribute write that takes effect for the
next bytes.

Faults (all can be changed at any time, existing connections included):

* ``reply_delay_s``: every server-to-client chunk is held this long (order kept);
* ``holding``: server-to-client bytes are kept until ``release()``;
* ``black_hole``: connections are still accepted but nothing is forwarded either way (bytes
  are read and thrown away, so the client's writes never block);
* ``stalled``: the proxy stops reading from its clients, so their write buffers fill up;
* ``cut_next_reply()``: the next server-to-client chunk is cut in half and that connection
  closed, leaving the client with half a frame;
* ``lose_reply_to(marker)`` / ``cut_reply_to(marker)``: the next request containing ``marker``
  (``b"EVALSHA"``, say) reaches Redis and is applied, but its connection is dropped before the
  reply is forwarded, or after half of it — the case that makes a retry run a command twice;
* ``drop_all()``: every open connection is closed at once.

``await FaultProxy(port).start()`` or ``async with FaultProxy(port) as proxy:``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast


class _Pair:
    """One client connection and its upstream connection to Redis."""

    def __init__(self, proxy: FaultProxy, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self._early: list[bytes] = []  # client bytes that came before the upstream connected
        self._to_client: collections.deque[tuple[float, bytes]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        #: Set when a request matched a lose/cut rule: applies to this connection's next reply.
        self.reply_fault: str | None = None
        if proxy.stalled:
            client.pause_reading()

    def from_client(self, data: bytes) -> None:
        if self.proxy.black_hole or self.closed:
            return
        if self.reply_fault is None:
            if self.proxy.take_rule(self.proxy.lose_rules, data):
                self.reply_fault = "lose"
            elif self.proxy.take_rule(self.proxy.cut_rules, data):
                self.reply_fault = "cut"
        if self.upstream is None:
            self._early.append(data)
        else:
            self.upstream.write(data)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        if self.closed:
            transport.abort()
            return
        for data in self._early:
            transport.write(data)
        self._early.clear()

    def from_server(self, data: bytes) -> None:
        if self.proxy.black_hole or self.closed:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + self.proxy.reply_delay_s
        if self._to_client:  # a shorter delay set meanwhile must not overtake earlier bytes
            due = max(due, self._to_client[-1][0])
        self._to_client.append((due, data))
        self.pump()

    def pump(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._to_client and not self.proxy.holding and not self.closed:
            due, data = self._to_client[0]
            if due > loop.time():
                self._timer = loop.call_at(due, self.pump)
                return
            self._to_client.popleft()
            if self.reply_fault == "lose":
                self.proxy.replies_lost += 1
                self.close()
                return
            if self.reply_fault == "cut":
                self.proxy.replies_cut += 1
                self.client.write(data[: max(1, len(data) // 2)])
                self.close()
                return
            if self.proxy.cut_pending:
                self.proxy.cut_pending = False
                self.client.write(data[: len(data) // 2])
                self.proxy.cuts += 1
                self.close()
                return
            self.client.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        # close(), not abort(): bytes already written (half a frame) still reach the client
        self.client.close()
        if self.upstream is not None:
            self.upstream.abort()
        self.proxy.pairs.discard(self)


class _ClientSide(asyncio.Protocol):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.pair: _Pair | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pair = _Pair(self.proxy, cast(asyncio.Transport, transport))
        self.proxy.pairs.add(self.pair)
        self.proxy.accepted += 1
        task = asyncio.get_running_loop().create_task(self._connect_upstream(self.pair))
        self.proxy.tasks.add(task)
        task.add_done_callback(self.proxy.tasks.discard)

    async def _connect_upstream(self, pair: _Pair) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _ServerSide(pair), "127.0.0.1", self.proxy.upstream_port)
        except OSError:
            pair.close()
            return
        pair.upstream_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        assert self.pair is not None
        self.pair.from_client(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pair is not None:
            self.pair.close()


class _ServerSide(asyncio.Protocol):
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair

    def data_received(self, data: bytes) -> None:
        self.pair.from_server(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.close()


class FaultProxy:
    """``await FaultProxy(redis_port).start()``; clients connect to ``proxy.port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.reply_delay_s = 0.0
        self.holding = False
        self.black_hole = False
        self.cut_pending = False
        self.pairs: set[_Pair] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections ever accepted
        self.cuts = 0  # replies cut in half so far (cut_next_reply)
        self.lose_rules: list[tuple[bytes, int]] = []
        self.cut_rules: list[tuple[bytes, int]] = []
        self.replies_lost = 0  # lose_reply_to / cut_reply_to faults applied so far
        self.replies_cut = 0
        self._stalled = False
        self._server: asyncio.Server | None = None

    async def start(self) -> FaultProxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientSide(self), "127.0.0.1", 0)
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def open_connections(self) -> int:
        return len(self.pairs)

    @property
    def stalled(self) -> bool:
        return self._stalled

    @stalled.setter
    def stalled(self, value: bool) -> None:
        self._stalled = value
        for pair in self.pairs:
            if value:
                pair.client.pause_reading()
            else:
                pair.client.resume_reading()

    def release(self) -> None:
        """Stop holding: every held reply goes out, in order."""
        self.holding = False
        for pair in list(self.pairs):
            pair.pump()

    def cut_next_reply(self) -> None:
        self.cut_pending = True

    def lose_reply_to(self, marker: bytes, times: int = 1) -> None:
        self.lose_rules.append((marker, times))

    def cut_reply_to(self, marker: bytes, times: int = 1) -> None:
        self.cut_rules.append((marker, times))

    @staticmethod
    def take_rule(rules: list[tuple[bytes, int]], data: bytes) -> bool:
        for i, (marker, times) in enumerate(rules):
            if marker in data:
                if times <= 1:
                    del rules[i]
                else:
                    rules[i] = (marker, times - 1)
                return True
        return False

    def inject(self, data: bytes) -> None:
        """Bytes to every client as if Redis had sent them (an unsolicited reply, garbage)."""
        for pair in self.pairs:
            pair.client.write(data)

    def drop_all(self) -> None:
        for pair in list(self.pairs):
            pair.close()

    def heal(self) -> None:
        """Back to a faithful proxy (existing connections keep working)."""
        self.reply_delay_s = 0.0
        self.black_hole = False
        self.cut_pending = False
        self.stalled = False
        self.release()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_all()
        for task in list(self.tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
