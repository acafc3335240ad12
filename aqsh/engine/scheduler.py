"""Scheduler: periodic tasks, announced where asynq's Scheduler announces them.

Entries and their enqueue history are written in asynq's layout (protocol §4.22, §3.6, §7.5), so
Asynqmon's scheduler page and ``asynq cron ls`` / ``asynq cron history`` show aqsh's schedules.

Where aqsh differs from asynq, and why:

* **One task per fire across replicas.** A deployment runs several workers, each with the same
  schedules; asynq's Scheduler would enqueue once per replica. Here the task id of a fire is
  derived from what the entry enqueues and the fire time (``cron-<digest>-<unix s>``), so the
  replicas' enqueues of one fire collide (``TaskIdConflict``) and exactly one task is stored. This
  holds while the task is kept: give entries a ``retention`` longer than the replicas' clock skew
  (the shell layer uses the result retention, hours).
* **Missed fires are not replayed**, like cron: after a pause or an outage the latest due fire
  runs once and the schedule continues from now. A fire whose enqueue fails because Redis is
  away is retried every second until it succeeds or the next fire is due.
* **Entries are written at start**, not after the first heartbeat interval, so a new schedule is
  visible at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import structlog

from aqsh import errors
from aqsh.clock import Clock, SystemClock, finish, wait_event
from aqsh.engine import keys
from aqsh.engine.client import DEFAULT_MAX_RETRY, DEFAULT_QUEUE, Client
from aqsh.engine.cron import CronSpec, go_duration
from aqsh.engine.faults import Loops, supervise
from aqsh.engine.models import SchedulerEnqueueEvent, SchedulerEntry, TaskInfo
from aqsh.engine.rdb import RedisBroker

log = structlog.get_logger("aqsh.engine")

HEARTBEAT_INTERVAL_S = 10.0  # asynq v0.25.1+; entries live for twice that
HISTORY_LIMIT = 1000
_RETRY_AFTER_FAILURE_S = 1.0
_LONGEST_NAP_S = 5.0  # bounds the effect of a wall-clock jump on the next fire


class PeriodicTask(msgspec.Struct, frozen=True, kw_only=True):
    """What an entry enqueues, and on which schedule (``spec``: see ``aqsh.engine.cron``)."""

    spec: str
    type: str
    payload: bytes
    queue: str = DEFAULT_QUEUE
    max_retry: int = DEFAULT_MAX_RETRY
    timeout_s: float | None = None
    retention_s: float | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: A header that receives each fire's enqueue time (Unix ns), e.g. for "submitted at".
    fire_time_header: str | None = None

    def digest(self) -> str:
        """Identifies what this entry enqueues; equal on every replica with the same config."""
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:20]

    def option_strings(self) -> list[str]:
        """The entry's options as Go's option ``String()`` forms (§7.5); every one has a "(".
        The Go Inspector would panic on one without it."""
        options = [f"Queue({json.dumps(self.queue, ensure_ascii=False)})",
                   f"MaxRetry({self.max_retry})"]
        if self.timeout_s is not None:
            options.append(f"Timeout({go_duration(self.timeout_s)})")
        if self.retention_s is not None:
            options.append(f"Retention({go_duration(self.retention_s)})")
        return options


@dataclass
class _Entry:
    id: str
    task: PeriodicTask
    cron: CronSpec
    digest: str
    next_s: float
    prev_s: float | None = None
    retry_at_s: float = 0.0

    def due(self, now_s: float) -> bool:
        return self.next_s <= now_s and self.retry_at_s <= now_s


class Scheduler:
    def __init__(
        self,
        broker: RedisBroker,
        *,
        clock: Clock | None = None,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        history_limit: int = HISTORY_LIMIT,
        on_fire: Callable[[str, str], None] | None = None,
        loops: Loops | None = None,
    ) -> None:
        """``on_fire(task_type, outcome)`` hears every fire: ``stored`` (this scheduler stored
        the task), ``elsewhere`` (another replica had), ``failed`` (Redis away; retried) or
        ``refused`` (the entry itself is wrong) — for metrics and alerts on silent schedules."""
        self.on_fire = on_fire
        self.broker = broker
        self.clock = clock or SystemClock()
        self.client = Client(broker, clock=self.clock)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.history_limit = history_limit
        host = socket.gethostname() or "unknown-host"
        self.scheduler_id = f"{host}:{os.getpid()}:{uuid.uuid4()}"
        self.entries_key = keys.scheduler_entries_key(self.scheduler_id)
        self._entries: dict[str, _Entry] = {}
        self._retired: list[str] = []  # entry ids whose history is still to be deleted
        self._changed = asyncio.Event()
        # stop() asks with this as well as with a cancel: a cancel can be lost (it was, against
        # Valkey, on a loaded machine) and the loop would then fire for ever.
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.monitor = (loops if loops is not None else Loops()).monitor(
            "scheduler", ready_after_s=max(30.0, 3 * heartbeat_interval_s),
            live_after_s=max(120.0, 18 * heartbeat_interval_s))

    # ------------------------------------------------------------------ entries
    def register(self, task: PeriodicTask) -> str:
        """Add an entry; returns its id (a UUID, as asynq). Raises InvalidArgument for a bad
        spec before anything changes."""
        try:
            cron = CronSpec(task.spec)
        except ValueError as exc:
            raise errors.InvalidArgument(f"cron spec {task.spec!r}: {exc}") from None
        entry = _Entry(id=str(uuid.uuid4()), task=task, cron=cron, digest=task.digest(),
                       next_s=cron.next_after(self.clock.now_s()))
        self._entries[entry.id] = entry
        self._changed.set()
        return entry.id

    def unregister(self, entry_id: str) -> None:
        if self._entries.pop(entry_id, None) is not None:
            self._retired.append(entry_id)
            self._changed.set()

    def sync(self, tasks: Sequence[PeriodicTask]) -> None:
        """Make the entries exactly ``tasks`` (on a config reload). Unchanged entries keep
        their id, history and next fire time."""
        wanted = {task.digest(): task for task in tasks}
        for entry in list(self._entries.values()):
            if entry.digest not in wanted:
                self.unregister(entry.id)
        present = {entry.digest for entry in self._entries.values()}
        for digest, task in wanted.items():
            if digest not in present:
                self.register(task)

    def entries(self) -> list[SchedulerEntry]:
        """As written for the Inspector, soonest first."""
        return [
            SchedulerEntry(
                id=entry.id, spec=entry.task.spec, task_type=entry.task.type,
                task_payload=entry.task.payload, enqueue_options=entry.task.option_strings(),
                next_enqueue_time_ns=int(entry.next_s * 1e9),
                prev_enqueue_time_ns=None if entry.prev_s is None else int(entry.prev_s * 1e9),
            )
            for entry in sorted(self._entries.values(), key=lambda e: e.next_s)
        ]

    # ------------------------------------------------------------------ work
    async def fire_due(self) -> list[TaskInfo]:
        """Enqueue every entry whose fire time has come; returns the tasks this scheduler
        stored (a fire another replica stored first is not among them)."""
        stored: list[TaskInfo] = []
        now_s = self.clock.now_s()
        for entry in [e for e in self._entries.values() if e.due(now_s)]:
            fire_s = entry.next_s
            while (later := entry.cron.next_after(fire_s)) <= now_s:
                fire_s = later  # missed fires are not replayed: only the latest runs
            task = entry.task
            task_id = f"cron-{entry.digest}-{int(fire_s)}"
            headers = dict(task.headers)
            if task.fire_time_header:
                headers[task.fire_time_header] = str(self.clock.now_ns())
            try:
                info = await self.client.enqueue(
                    task.type, task.payload, queue=task.queue, max_retry=task.max_retry,
                    timeout=task.timeout_s, retention=task.retention_s, headers=headers,
                    task_id=task_id)
            except errors.TaskIdConflict:
                self._heard(task.type, "elsewhere")
                log.debug("scheduler.fired_elsewhere", entry_id=entry.id, task_id=task_id)
            except (errors.BrokerUnavailable, errors.BrokerFault) as exc:
                # Redis could not take it (away, full, refusing): try this fire again soon.
                entry.retry_at_s = now_s + _RETRY_AFTER_FAILURE_S
                self._heard(task.type, "failed")
                log.warning("scheduler.enqueue_failed", entry_id=entry.id, error=str(exc))
                continue
            except errors.AqshError as exc:  # the entry itself is wrong: skip this fire
                self._heard(task.type, "refused")
                log.error("scheduler.enqueue_refused", entry_id=entry.id, error=str(exc))
            else:
                stored.append(info)
                self._heard(task.type, "stored")
                await self._record(entry.id, info.id)
                log.info("scheduler.enqueued", entry_id=entry.id, task_id=info.id,
                         type=task.type, queue=task.queue)
            entry.prev_s = fire_s
            entry.next_s = entry.cron.next_after(now_s)
            entry.retry_at_s = 0.0
        return stored

    def _heard(self, task_type: str, outcome: str) -> None:
        if self.on_fire is not None:
            self.on_fire(task_type, outcome)

    async def _record(self, entry_id: str, task_id: str) -> None:
        """The enqueue is done; losing its history line to a Redis blip is not worth failing
        over, so errors are logged and dropped."""
        event = SchedulerEnqueueEvent(task_id=task_id, enqueue_time_ns=self.clock.now_ns())
        try:
            await self.broker.record_scheduler_event(entry_id, event, limit=self.history_limit)
        except (errors.BrokerUnavailable, errors.BrokerFault) as exc:
            log.warning("scheduler.history_failed", entry_id=entry_id, error=str(exc))

    async def heartbeat(self) -> None:
        """Announce the entries for twice the heartbeat interval; forget retired histories."""
        await self.broker.write_scheduler_entries(
            self.scheduler_id, self.entries(), ttl_s=max(1, int(2 * self.heartbeat_interval_s)),
            now_s=int(self.clock.now_s()))
        if self._retired:
            retired, self._retired = self._retired, []
            await self.broker.delete_scheduler_histories(retired)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stopping = False
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="aqsh-scheduler")

    async def stop(self) -> None:
        """Stop firing, then remove this scheduler's entries and their histories (as asynq)."""
        if self._task is None:
            return
        self._stopping = True
        self._changed.set()  # ends the nap
        await finish(self._task)
        self._task = None
        try:
            await self.broker.clear_scheduler_state(
                self.scheduler_id, [*self._entries, *self._retired])
        except Exception as exc:  # the entries expire on their own
            log.warning("scheduler.clear_failed", error=str(exc))

    async def _run(self) -> None:
        await supervise(self.monitor, self._fire_forever)

    async def _fire_forever(self) -> None:
        next_beat_s = 0.0
        while not self._stopping:
            if self._changed.is_set():  # entries changed: announce them now
                self._changed.clear()
                next_beat_s = 0.0
            now_s = self.clock.now_s()
            if any(entry.due(now_s) for entry in self._entries.values()):
                await self.fire_due()
            if self.clock.now_s() >= next_beat_s:
                try:
                    await self.heartbeat()
                    self.monitor.ok()
                except Exception as exc:  # the entries expire; the next beat writes them
                    self.monitor.failed(exc)
                next_beat_s = self.clock.now_s() + self.heartbeat_interval_s
            wake_s = min([max(e.next_s, e.retry_at_s) for e in self._entries.values()]
                         + [next_beat_s])
            nap_s = min(max(wake_s - self.clock.now_s(), 0.0), _LONGEST_NAP_S)
            await wait_event(self._changed, nap_s)
