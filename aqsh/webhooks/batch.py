"""Coalescing writes: whatever waits to be written when the previous write returns goes in the
next one, so under load many small writes cost one round trip (as the engine's acks do)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, send: Callable[[list[T]], Awaitable[object]]) -> None:
        self._send = send
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def add(self, item: T) -> None:
        """Returns once ``item`` is written; raises what its batch's write raised."""
        await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[None]:
        """``item`` queued for the next write; the future settles as its batch's write does.
        A caller that overlaps the write with other work awaits this rather than wrapping
        ``add`` in a task: one object per item instead of a coroutine, a task and a future."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return waiter

    async def _flush(self) -> None:
        while self._items:
            items, waiters = self._items, self._waiters
            self._items, self._waiters = [], []
            error: BaseException | None = None
            try:
                await self._send(items)
            except Exception as exc:
                error = exc
            for waiter in waiters:
                if waiter.done():
                    continue
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
