"""Syncer: a finishing write that failed because Redis was away is retried until the task's
lease ends, so a result is not lost to a brief outage (asynq's syncer, same rule)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from aqsh import errors
from aqsh.clock import Clock

log = structlog.get_logger("aqsh.engine")


@dataclass
class _Pending:
    task_id: str
    write: Callable[[], Awaitable[object]]
    lease_expires_s: float


class Syncer:
    def __init__(self, clock: Clock, interval_s: float = 1.0) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.pending: list[_Pending] = []
        self._added = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, task_id: str, write: Callable[[], Awaitable[object]],
            lease_expires_s: float) -> None:
        self.pending.append(_Pending(task_id, write, lease_expires_s))
        self._added.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="aqsh-syncer")

    async def stop(self) -> None:
        """One final attempt, then stop (asynq does the same at shutdown)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.run_once()

    async def run_once(self) -> int:
        """Try every pending write once; drop those whose lease has passed. Returns successes."""
        now_s = self.clock.now_s()
        keep: list[_Pending] = []
        synced = 0
        batch, self.pending = self.pending, []
        for item in batch:
            if now_s > item.lease_expires_s:
                log.warning("syncer.dropped", task_id=item.task_id)
                continue
            try:
                await item.write()
                synced += 1
            except errors.BrokerUnavailable:
                keep.append(item)
            except errors.AqshError as exc:
                log.warning("syncer.write_failed", task_id=item.task_id, error=str(exc))
        self.pending = keep + self.pending  # plus whatever was added meanwhile
        return synced

    async def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                self._added.clear()
                stop = asyncio.create_task(self._stop.wait())
                added = asyncio.create_task(self._added.wait())
                await asyncio.wait({stop, added}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                added.cancel()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
            await self.run_once()
