"""Syncer: a finishing write that failed because Redis was away is retried until the task's
lease ends, so a result is not lost to a brief outage (asynq's syncer, same rule)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from aqsh import errors
from aqsh.clock import Clock, finish, wait_event
from aqsh.engine.faults import Loops

log = structlog.get_logger("aqsh.engine")


@dataclass
class _Pending:
    task_id: str
    write: Callable[[], Awaitable[object]]
    lease_expires_s: float


class Syncer:
    def __init__(self, clock: Clock, interval_s: float = 1.0,
                 loops: Loops | None = None) -> None:
        self.clock = clock
        self.monitor = (loops if loops is not None else Loops()).monitor(
            "syncer", ready_after_s=30.0, live_after_s=120.0)
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
            await finish(self._task, cancel=False)
        await self.run_once()

    async def run_once(self) -> int:
        """Try every pending write once; drop those whose lease has passed. Returns successes."""
        now_s = self.clock.now_s()
        keep: list[_Pending] = []
        synced = 0
        failure: Exception | None = None
        batch, self.pending = self.pending, []
        for item in batch:
            if now_s > item.lease_expires_s:
                log.warning("syncer.dropped", task_id=item.task_id)
                continue
            try:
                await item.write()
                synced += 1
            except (errors.BrokerUnavailable, errors.BrokerFault) as exc:
                # Redis cannot take it now (away, full, read-only, refusing): keep trying
                # until the lease ends; after that the recoverer owns the task.
                keep.append(item)
                failure = failure or exc
            except errors.AqshError as exc:
                log.warning("syncer.write_failed", task_id=item.task_id, error=str(exc))
            except Exception as exc:  # a bug in one write must not cost the others theirs
                keep.append(item)
                failure = failure or exc
        self.pending = keep + self.pending  # plus whatever was added meanwhile
        if failure is not None:
            self.monitor.failed(failure)
        else:
            self.monitor.ok()
        return synced

    async def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                self._added.clear()
                stop = asyncio.create_task(self._stop.wait())
                added = asyncio.create_task(self._added.wait())
                with self.monitor.parking():  # nothing to write: not a stall
                    await asyncio.wait({stop, added}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                added.cancel()
                continue
            await wait_event(self._stop, self.interval_s)
            await self.run_once()
