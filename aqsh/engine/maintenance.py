"""Periodic housekeeping that any server sharing the queues may do: forward, recover, clean up.

Each component exposes ``run_once()`` (what tests call with a ManualClock) and a loop that
calls it every interval until stopped. Intervals follow asynq's defaults.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog

from aqsh import errors
from aqsh.clock import Clock, finish, wait_event
from aqsh.engine.broker import Broker
from aqsh.engine.faults import Backoff, Loops
from aqsh.engine.models import TaskMessage
from aqsh.engine.processor import LEASE_EXPIRED_ERROR, RetryDelayFn
from aqsh.engine.task import Task

log = structlog.get_logger("aqsh.engine")

#: How long past its lease an active task waits before it is recovered (see Recoverer).
RECOVER_GRACE_S = 1
#: How often the recoverer looks for stale aggregation sets. A set is stale two minutes after
#: it was made, so half a minute more costs little and saves a script call per queue in most
#: of the recoverer's 2 s rounds.
RECLAIM_INTERVAL_S = 30


class LeaseExpired(Exception):
    """What the retry-delay and is-failure functions are shown for a task whose worker
    vanished (asynq's ErrLeaseExpired, same text)."""

    def __init__(self) -> None:
        super().__init__(LEASE_EXPIRED_ERROR)


class Periodic:
    """Runs ``run_once`` every ``interval_s`` until ``stop()``; errors are logged, not fatal."""

    name = "periodic"

    def __init__(self, interval_s: float, *, run_first: bool, loops: Loops | None = None) -> None:
        self.interval_s = interval_s
        self.run_first = run_first
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # stop() or poke(): cut the wait short
        self._task: asyncio.Task[None] | None = None
        self.monitor = (loops if loops is not None else Loops()).monitor(
            self.name, ready_after_s=max(30.0, 3 * interval_s),
            live_after_s=max(120.0, 10 * interval_s))

    async def run_once(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"aqsh-{self.name}")

    def poke(self) -> None:
        """Run a round now instead of at the end of the interval."""
        self._wake.set()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await finish(self._task, cancel=False)

    async def _loop(self) -> None:
        """A failed round (an outage, an error reply, a bug) is recorded and retried after a
        jittered back-off shorter than the interval; the loop itself never ends on one."""
        first = self.run_first
        backoff = Backoff(first_s=0.1, max_s=min(2.0, self.interval_s))
        delay_s = self.interval_s
        while not self._stop.is_set():
            if not first:
                await wait_event(self._wake, delay_s)
                self._wake.clear()
                if self._stop.is_set():
                    return
            first = False
            try:
                await self.run_once()
            except Exception as exc:  # see the docstring
                self.monitor.failed(exc)
                delay_s = backoff.next_delay_s()
                continue
            self.monitor.ok()
            backoff.reset()
            delay_s = self.interval_s


class Forwarder(Periodic):
    """scheduled/retry tasks whose time has come → pending (asynq: every 5 s)."""

    name = "forwarder"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 interval_s: float = 5.0, on_forward: Callable[[], None] | None = None,
                 loops: Loops | None = None) -> None:
        super().__init__(interval_s, run_first=False, loops=loops)
        self.broker, self.queues, self.clock = broker, list(queues), clock
        self.on_forward = on_forward

    async def run_once(self) -> int:
        moved = await self.broker.forward_if_ready(self.queues, now_ns=self.clock.now_ns())
        if moved and self.on_forward is not None:
            self.on_forward()
        return moved


class Recoverer(Periodic):
    """Active tasks whose lease ran out were abandoned by a dead worker: retry or archive them
    with asynq's error text. asynq waits 30 s past the lease and looks every minute, so a dead
    worker's task waits 60–120 s; aqsh looks every 2 s with a 1 s grace, so it waits at most
    ~33 s (a lease lasts 30 s). A live worker never runs past its lease: its heartbeat cancels
    a run whose lease it could not extend in time."""

    name = "recoverer"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 retry_delay: RetryDelayFn, interval_s: float = 2.0,
                 loops: Loops | None = None,
                 on_recovered: Callable[[], None] | None = None,
                 is_failure: Callable[[BaseException], bool] = lambda exc: True) -> None:
        """``on_recovered`` hears of every round that put tasks back: the server pokes its
        forwarder with it, so a recovered task whose retry is due runs now rather than after
        the forwarder's next 5 s round. ``is_failure`` is the server's: as in asynq, a lease
        expiry it does not count as a failure retries without using up a retry."""
        super().__init__(interval_s, run_first=True, loops=loops)
        self.broker, self.queues, self.clock = broker, list(queues), clock
        self.retry_delay = retry_delay
        self.on_recovered = on_recovered
        self.is_failure = is_failure
        self._next_reclaim_s = 0.0

    async def run_once(self) -> int:
        now_s = int(self.clock.now_s())
        expired = await self.broker.list_lease_expired(
            self.queues, cutoff_s=now_s - RECOVER_GRACE_S
        )
        recovered = 0
        # Before the expired runs are retried (which frees their slots too): a slot whose
        # holder died is free once its lease lapsed, and the oldest waiter takes it. Also
        # what heals a line that a foreign tool changed (a waiter run or deleted by hand).
        for qname in self.queues:
            await self.broker.repair_flow(qname, now_s=now_s)
        for msg in expired:
            try:
                if msg.retried >= msg.retry:
                    await self.broker.archive(msg, error_msg=LEASE_EXPIRED_ERROR, now_s=now_s)
                else:
                    task = Task(id=msg.id, type=msg.type, payload=msg.payload, queue=msg.queue,
                                headers=msg.headers, retried=msg.retried, max_retry=msg.retry)
                    error = LeaseExpired()
                    delay_s = self.retry_delay(msg.retried, error, task)
                    await self.broker.retry(msg, retry_at_s=int(now_s + delay_s),
                                            error_msg=LEASE_EXPIRED_ERROR,
                                            is_failure=self.is_failure(error), now_s=now_s)
                recovered += 1
                log.info("task.recovered", task_id=msg.id, queue=msg.queue)
            except errors.TaskNotFound:
                continue  # finished or recovered by someone else meanwhile
        if recovered and self.on_recovered is not None:
            self.on_recovered()
        if now_s >= self._next_reclaim_s:
            # Sets whose aggregator died or failed (any server's, Go's too) give their tasks
            # back to their groups; see aqsh.engine.aggregator.
            for qname in self.queues:
                await self.broker.reclaim_stale_aggregation_sets(qname, now_s=now_s)
            self._next_reclaim_s = now_s + RECLAIM_INTERVAL_S
        return recovered


class DependencySweep(Periodic):
    """Runs submitted to start after other tasks (aqsh.engine.flow.HEADER_AFTER) start once
    all of those completed, or are cancelled when one failed or was cancelled: looked at every
    second, so a dependent starts at most ~1 s after its last dependency completed."""

    name = "dependencies"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 interval_s: float = 1.0, loops: Loops | None = None,
                 on_canceled: Callable[[TaskMessage], None] | None = None,
                 before_cancel: Callable[[TaskMessage], Awaitable[None]] | None = None) -> None:
        """``on_canceled``: told of each run this sweep archived (stored message, its
        ``error_msg`` naming the dependency), after the write; it must not raise.
        ``before_cancel``: awaited with the same message before the write, for a notice that
        must survive this process dying right after it (a failure defers the cancel)."""
        super().__init__(interval_s, run_first=True, loops=loops)
        self.broker, self.queues, self.clock = broker, list(queues), clock
        self.on_canceled = on_canceled
        self.before_cancel = before_cancel

    async def run_once(self) -> int:
        now_s = int(self.clock.now_s())
        moved = 0
        for qname in self.queues:
            swept = await self.broker.sweep_dependencies(qname, now_s=now_s,
                                                         before_cancel=self.before_cancel)
            moved += swept.moved
            for msg in swept.canceled:
                log.info("task.dependency_canceled", task_id=msg.id, queue=msg.queue,
                         error=msg.error_msg)
                if self.on_canceled is not None:
                    self.on_canceled(msg)
        return moved


class Janitor(Periodic):
    """Completed tasks past their retention are deleted (asynq: every 8 s, batches of 100)."""

    name = "janitor"

    def __init__(self, broker: Broker, queues: Sequence[str], clock: Clock,
                 interval_s: float = 8.0, batch_size: int = 100,
                 loops: Loops | None = None) -> None:
        super().__init__(interval_s, run_first=False, loops=loops)
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
