"""Periodic housekeeping that any server sharing the queues may do: forward, recover, clean up.

Each component exposes ``run_once()`` (what tests call with a ManualClock) and a loop that
calls it every interval until stopped. Intervals follow asynq's defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import structlog

from aqsh import errors
from aqsh.clock import Clock
from aqsh.engine.broker import LEASE_DURATION_S, Broker
from aqsh.engine.processor import LEASE_EXPIRED_ERROR, RetryDelayFn
from aqsh.engine.task import Task

log = structlog.get_logger("aqsh.engine")


class Periodic:
    """Runs ``run_once`` every ``interval_s`` until ``stop()``; errors are logged, not fatal."""

    name = "periodic"

    def __init__(self, interval_s: float, *, run_first: bool) -> None:
        self.interval_s = interval_s
        self.run_first = run_first
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"aqsh-{self.name}")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        first = self.run_first
        while not self._stop.is_set():
            if not first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
                if self._stop.is_set():
                    return
            first = False
            try:
                await self.run_once()
            except errors.AqshError as exc:
                log.warning(f"{self.name}.failed", error=str(exc))
            except Exception:
                log.exception(f"{self.name}.crashed")


class Forwarder(Periodic):
    """scheduled/retry tasks whose time has come → pending (asynq: every 5 s)."""

    name = "forwarder"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 interval_s: float = 5.0, on_forward: Callable[[], None] | None = None) -> None:
        super().__init__(interval_s, run_first=False)
        self.broker, self.queues, self.clock = broker, list(queues), clock
        self.on_forward = on_forward

    async def run_once(self) -> int:
        moved = await self.broker.forward_if_ready(self.queues, now_ns=self.clock.now_ns())
        if moved and self.on_forward is not None:
            self.on_forward()
        return moved


class Recoverer(Periodic):
    """Active tasks whose lease ran out 30 s ago were abandoned by a dead worker: retry or
    archive them with asynq's error text (asynq: every minute, first run at start)."""

    name = "recoverer"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 retry_delay: RetryDelayFn, interval_s: float = 60.0) -> None:
        super().__init__(interval_s, run_first=True)
        self.broker, self.queues, self.clock = broker, list(queues), clock
        self.retry_delay = retry_delay

    async def run_once(self) -> int:
        now_s = int(self.clock.now_s())
        expired = await self.broker.list_lease_expired(
            self.queues, cutoff_s=now_s - LEASE_DURATION_S
        )
        recovered = 0
        for msg in expired:
            try:
                if msg.retried >= msg.retry:
                    await self.broker.archive(msg, error_msg=LEASE_EXPIRED_ERROR, now_s=now_s)
                else:
                    task = Task(id=msg.id, type=msg.type, payload=msg.payload, queue=msg.queue,
                                headers=msg.headers, retried=msg.retried, max_retry=msg.retry)
                    delay_s = self.retry_delay(msg.retried, RuntimeError(LEASE_EXPIRED_ERROR),
                                               task)
                    await self.broker.retry(msg, retry_at_s=int(now_s + delay_s),
                                            error_msg=LEASE_EXPIRED_ERROR, is_failure=True,
                                            now_s=now_s)
                recovered += 1
                log.info("task.recovered", task_id=msg.id, queue=msg.queue)
            except errors.TaskNotFound:
                continue  # finished or recovered by someone else meanwhile
        return recovered


class Janitor(Periodic):
    """Completed tasks past their retention are deleted (asynq: every 8 s, batches of 100)."""

    name = "janitor"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 interval_s: float = 8.0, batch_size: int = 100) -> None:
        super().__init__(interval_s, run_first=False)
        self.broker, self.queues, self.clock = broker, list(queues), clock
        self.batch_size = batch_size

    async def run_once(self) -> int:
        now_s = int(self.clock.now_s())
        total = 0
        for qname in self.queues:
            total += await self.broker.delete_expired_completed(
                qname, now_s=now_s, batch_size=self.batch_size
            )
        return total
