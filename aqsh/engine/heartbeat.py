"""Heartbeater: server/worker state for the Go Inspector, Asynqmon and ``asynq server ls``, and
lease extension for every running task (both every 5 s, like asynq)."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import uuid
from collections.abc import Mapping

import structlog

from aqsh.clock import Clock, finish, wait_event
from aqsh.engine.broker import Broker
from aqsh.engine.faults import Loops, supervise
from aqsh.engine.models import ServerInfo, WorkerInfo
from aqsh.engine.processor import Processor, Running
from aqsh.engine.task import CancelReason

log = structlog.get_logger("aqsh.engine")

HEARTBEAT_INTERVAL_S = 5.0


class Heartbeater:
    def __init__(
        self,
        broker: Broker,
        processor: Processor,
        clock: Clock,
        *,
        concurrency: int,
        queues: Mapping[str, int],
        strict_priority: bool,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        loops: Loops | None = None,
    ) -> None:
        self.broker = broker
        self.processor = processor
        self.clock = clock
        self.interval_s = interval_s
        self.host = socket.gethostname() or "unknown-host"
        self.pid = os.getpid()
        self.server_id = str(uuid.uuid4())
        self.status = "active"
        self.concurrency = concurrency
        self.queues = dict(queues)
        self.strict_priority = strict_priority
        self.started_ns = clock.now_ns()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Two beats must never interleave: each writes a snapshot of the running tasks, and an
        # older snapshot landing after a newer one would report tasks that already finished
        # (and hand out leases from a stale list).
        self._beat_lock = asyncio.Lock()
        self.beats_completed = 0
        # Leases last 30 s and are extended every beat: three missed beats are a real problem.
        self.monitor = (loops if loops is not None else Loops()).monitor(
            "heartbeat", ready_after_s=max(15.0, 3 * interval_s),
            live_after_s=max(90.0, 18 * interval_s))

    def server_info(self) -> ServerInfo:
        return ServerInfo(
            host=self.host, pid=self.pid, server_id=self.server_id,
            concurrency=self.concurrency, queues=self.queues,
            strict_priority=self.strict_priority, status=self.status,
            start_time_ns=self.started_ns, active_worker_count=self.processor.busy,
        )

    def worker_info(self, run: Running) -> WorkerInfo:
        msg = run.message
        return WorkerInfo(
            host=self.host, pid=self.pid, server_id=self.server_id, task_id=msg.id,
            task_type=msg.type, task_payload=msg.payload, queue=msg.queue,
            start_time_ns=run.started_ns, deadline_ns=int(run.deadline * 1e9),
        )

    async def beat(self) -> None:
        """Write server state, then extend leases; each part survives the other failing."""
        async with self._beat_lock:
            await self._beat()
            self.beats_completed += 1

    async def _beat(self) -> None:
        running = list(self.processor.running.values())
        now_s = int(self.clock.now_s())
        failure: BaseException | None = None
        try:
            await self.broker.write_server_state(
                self.server_info(), [self.worker_info(r) for r in running],
                ttl_s=max(1, math.ceil(self.interval_s * 2)), now_s=now_s,
            )
        except Exception as exc:  # the leases below must still be extended
            failure = exc
        try:
            await self.extend_leases(running, now_s)
        except Exception as exc:  # recorded below; the next beat tries again
            failure = failure or exc
        if failure is None:
            self.monitor.ok()
        else:
            self.monitor.failed(failure)

    async def extend_leases(self, running: list[Running], now_s: int) -> None:
        """Raises the first failure after trying every queue (one queue's error must not cost
        the others their leases)."""
        failure: Exception | None = None
        by_queue: dict[str, list[Running]] = {}
        for run in running:
            if run.finished.is_set():
                continue
            if now_s > run.lease_expires_s:
                # Could not extend in time: someone may already run it; stop ours.
                run.cancel(CancelReason.LEASE_LOST)
                continue
            by_queue.setdefault(run.queue, []).append(run)
        for qname, runs in by_queue.items():
            try:
                expires_s, lost = await self.broker.extend_leases(
                    qname, [r.task_id for r in runs], now_s=now_s
                )
            except Exception as exc:  # see the docstring
                log.warning("lease.extend_failed", queue=qname, error=str(exc))
                failure = failure or exc
                continue
            lost_ids = set(lost)
            for run in runs:
                if run.task_id not in lost_ids:
                    run.lease_expires_s = float(expires_s)
                elif not run.handler_done:
                    # A task whose handler already returned was simply acknowledged while
                    # this beat was in flight; only a running handler has really lost it.
                    log.warning("lease.lost", task_id=run.task_id)
                    run.cancel(CancelReason.LEASE_LOST)
        if failure is not None:
            raise failure

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="aqsh-heartbeat")

    async def _loop(self) -> None:
        await supervise(self.monitor, self._beats)

    async def _beats(self) -> None:
        while not self._stop.is_set():
            await self.beat()
            await wait_event(self._stop, self.interval_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await finish(self._task, cancel=False)
        try:
            await self.broker.clear_server_state(self.host, self.pid, self.server_id)
        except Exception as exc:  # the entry expires on its own
            log.warning("heartbeat.clear_failed", error=str(exc))
