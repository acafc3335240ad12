"""A small asyncio TCP proxy between aqsh and a real ``redis-server``, with faults on demand.

The faults are the network's, which Redis itself cannot produce: every connection dropped at
once, a reply lost after its command was applied (the request goes through, the connection is
dropped before the reply is forwarded — the case that makes a retry run a command twice), a
reply cut in the middle of its frame, replies delayed, and a black hole (connections accepted,
nothing ever answered). Redis sees an ordinary client; nothing is mocked.

Use it as ``async with FaultProxy(port) as proxy:`` and point the client at ``proxy.url``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection to Redis."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    #: Set when a request matched ``lose_reply_to``: the next reply is not forwarded.
    lose_next_reply: bool = False
    cut_next_reply: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # no FIN handshake: a dropped connection, as on a cut


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        #: Replies are held this long before they are forwarded.
        self.delay_s = 0.0
        #: Accept and read, never forward anything either way (a peer that went silent).
        self.black_hole = False
        self._lose: list[tuple[bytes, int]] = []
        self._cut: list[tuple[bytes, int]] = []
        #: Faults applied so far (tests assert that the fault really happened).
        self.replies_lost = 0
        self.replies_cut = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_all()
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ faults
    def drop_all(self) -> int:
        """Abort every open connection (both sides); new ones are still accepted."""
        links = list(self._links)
        for link in links:
            link.close()
        self._links.clear()
        return len(links)

    def lose_reply_to(self, marker: bytes, times: int = 1) -> None:
        """The next ``times`` requests containing ``marker`` (e.g. ``b"EVALSHA"``) reach Redis
        and are applied, but their connection is dropped before the reply is forwarded."""
        self._lose.append((marker, times))

    def cut_reply_to(self, marker: bytes, times: int = 1) -> None:
        """Like ``lose_reply_to``, but half of the reply's first chunk is forwarded first: the
        client reads a frame that stops in the middle."""
        self._cut.append((marker, times))

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _take(rules: list[tuple[bytes, int]], data: bytes) -> bool:
        for i, (marker, times) in enumerate(rules):
            if marker in data:
                if times <= 1:
                    del rules[i]
                else:
                    rules[i] = (marker, times - 1)
                return True
        return False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host,
                                                                 self.upstream_port)
        except OSError:
            writer.transport.abort()  # Redis is down: so is the proxy, for this client
            return
        self.connections += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [asyncio.create_task(self._requests(link, reader)),
                      asyncio.create_task(self._replies(link, up_reader))]
        try:
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.close()
            self._links.discard(link)
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)

    async def _requests(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            if self.black_hole:
                continue
            if self._take(self._lose, data):
                link.lose_next_reply = True
            elif self._take(self._cut, data):
                link.cut_next_reply = True
            link.upstream.write(data)
            await link.upstream.drain()

    async def _replies(self, link: _Link, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            if self.black_hole:
                continue
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if link.lose_next_reply:
                self.replies_lost += 1
                return  # the caller closes both sides: the reply never reaches the client
            if link.cut_next_reply:
                self.replies_cut += 1
                link.client.write(data[: max(1, len(data) // 2)])
                with contextlib.suppress(ConnectionError):
                    await link.client.drain()
                return
            link.client.write(data)
            await link.client.drain()
