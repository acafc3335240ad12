"""Processor: fetch tasks, run handlers, record outcomes with asynq's semantics.

Differences from asynq that keep the Redis layout identical:
- several free slots are filled by one batched dequeue script call per queue;
- successes are acknowledged in pipelined batches by one flusher task;
- an idle processor sleeps until a wake-up (our client publishes the queue name after an
  enqueue) or its poll timer, so aqsh-enqueued tasks start within milliseconds while foreign
  enqueuers are still picked up by polling.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import reduce

import structlog

from aqsh import errors
from aqsh.clock import Clock, finish, raise_if_cancelling, wait_event
from aqsh.engine.broker import Broker, Leased
from aqsh.engine.faults import Backoff, Loops, pause_after_failure
from aqsh.engine.models import TaskMessage
from aqsh.engine.task import (
    CONTEXT_CANCELED,
    CancelReason,
    Handler,
    RevokeTask,
    SkipRetry,
    Task,
    TaskError,
)

log = structlog.get_logger("aqsh.engine")

#: asynq's deadline when a message has neither timeout nor deadline (it logs an error too).
FALLBACK_TIMEOUT_S = 30 * 60
LEASE_EXPIRED_ERROR = "asynq: task lease expired"

RetryDelayFn = Callable[[int, BaseException, Task], float]
#: Told after a finishing write is stored: (the message as it was leased, the transition —
#: "completed", "archived", "retry" or "revoked"; or "canceled" for a run the server's
#: dependency sweep archived before it ever ran —, the error text or ""). Called on the
#: event loop; it must return quickly and never raise (an observer, not a participant).
TransitionHook = Callable[[TaskMessage, str, str], None]


def default_retry_delay(retried: int, error: BaseException, task: Task) -> float:
    """asynq's default: n⁴ + 15 + rand(0..29)·(n+1) seconds (Sidekiq's formula)."""
    return float(retried**4 + 15 + random.randint(0, 29) * (retried + 1))


def normalise_queues(queues: Mapping[str, int]) -> dict[str, int]:
    """Drop blank names and non-positive weights, divide by the GCD (asynq §5.2)."""
    kept = {q: int(w) for q, w in queues.items() if q.strip() and int(w) > 0}
    if not kept:
        return {"default": 1}
    divisor = reduce(math.gcd, kept.values())
    return {q: w // divisor for q, w in kept.items()}


def queue_order(queues: Mapping[str, int], *, strict: bool) -> list[str]:
    """The order to try queues for one fetch.

    Strict: by weight, highest first. Weighted: each queue appears weight times in a shuffled
    list and its first occurrence counts, so a queue comes first with probability w / Σw.
    """
    if len(queues) == 1:
        return list(queues)
    if strict:
        return sorted(queues, key=lambda q: -queues[q])
    tickets = [q for q, w in queues.items() for _ in range(w)]
    random.shuffle(tickets)
    return list(dict.fromkeys(tickets))


def deadline_for(msg: TaskMessage, now_s: float) -> float:
    """min(now + timeout, deadline), per attempt (asynq §5.4)."""
    if msg.timeout_s and msg.deadline_s:
        return float(min(int(now_s) + msg.timeout_s, msg.deadline_s))
    if msg.timeout_s:
        return now_s + msg.timeout_s
    if msg.deadline_s:
        return float(msg.deadline_s)
    return now_s + FALLBACK_TIMEOUT_S


class _Writer:
    def __init__(self, broker: Broker, msg: TaskMessage) -> None:
        self._broker = broker
        self._msg = msg

    async def write(self, data: bytes) -> int:
        return await self._broker.write_result(self._msg.queue, self._msg.id, data)


@dataclass(eq=False)
class Running:
    """A task in flight: what the heartbeater reports and the lease keeper extends."""

    message: TaskMessage
    lease_expires_s: float
    started_ns: int
    deadline: float
    result_writer: _Writer
    cancel_reason: CancelReason | None = None
    handler_task: asyncio.Task[bytes | None] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    # TaskContext protocol
    @property
    def task_id(self) -> str:
        return self.message.id

    @property
    def queue(self) -> str:
        return self.message.queue

    @property
    def retry_count(self) -> int:
        return self.message.retried

    @property
    def max_retry(self) -> int:
        return self.message.retry

    @property
    def deadline_s(self) -> float:
        return self.deadline

    @property
    def handler_done(self) -> bool:
        return self.handler_task is not None and self.handler_task.done()

    def cancel(self, reason: CancelReason) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.handler_task is not None and not self.handler_task.done():
            self.handler_task.cancel()


class Processor:
    def __init__(
        self,
        broker: Broker,
        handler: Handler,
        *,
        clock: Clock,
        concurrency: int,
        queues: Mapping[str, int],
        strict_priority: bool = False,
        retry_delay: RetryDelayFn = default_retry_delay,
        is_failure: Callable[[BaseException], bool] = lambda exc: True,
        on_write_failure: Callable[[Running, Callable[[], object]], None] | None = None,
        poll_interval_s: float = 1.0,
        max_batch: int = 32,
        loops: Loops | None = None,
        cancel_retries: bool = False,
        on_transition: TransitionHook | None = None,
    ) -> None:
        """``cancel_retries``: see Server."""
        self.broker = broker
        self.on_transition = on_transition
        self.handler = handler
        self.clock = clock
        self.concurrency = max(1, concurrency)
        self.queues = normalise_queues(queues)
        self.strict_priority = strict_priority
        self.retry_delay = retry_delay
        self.is_failure = is_failure
        self.on_write_failure = on_write_failure
        self.poll_interval_s = poll_interval_s
        self.max_batch = max_batch
        self.cancel_retries = cancel_retries
        self.running: dict[str, Running] = {}
        #: Runs in ``running`` whose handler succeeded and whose acknowledgement is on its way.
        self._acking = 0
        self._wake = asyncio.Event()
        #: While idle: the event-loop time of the next poll (what a wake-up cuts short).
        self.next_poll_at: float | None = None
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._fetcher: asyncio.Task[None] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._acks: asyncio.Queue[tuple[Running, bytes | None, asyncio.Future[None]]] = (
            asyncio.Queue()
        )
        self._ack_flusher: asyncio.Task[None] | None = None
        self.loops = loops if loops is not None else Loops()
        # A fetcher cycle is at most the idle poll interval (or a parked wait for a slot).
        self.fetch_monitor = self.loops.monitor("fetcher", ready_after_s=30.0,
                                                live_after_s=120.0)
        self.ack_monitor = self.loops.monitor("acks", ready_after_s=30.0, live_after_s=120.0)

    @property
    def busy(self) -> int:
        """Slots taken by handlers still working. A success waiting for its ack has given its
        slot back already: at concurrency 1 the ack and the next dequeue then share a round
        trip instead of following each other, and the ack cannot be lost by it (drain waits
        for it; a failed one goes to the syncer)."""
        return len(self.running) - self._acking

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._fetcher = asyncio.create_task(self._fetch_loop(), name="aqsh-fetcher")
        self._ack_flusher = asyncio.create_task(self._flush_acks(), name="aqsh-acks")

    def wake(self, qname: str | None = None) -> None:
        """Called on a wake-up publish: fetch now instead of at the next poll."""
        if qname is None or qname in self.queues:
            self._wake.set()

    async def stop_fetching(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._fetcher is not None:
            await finish(self._fetcher)

    async def drain(self, timeout_s: float, *, ack_grace_s: float = 10.0) -> list[Running]:
        """Wait for running handlers up to ``timeout_s``; return the ones still executing.

        A run whose handler has returned is finished work even if its acknowledgement is still
        queued or in flight: requeueing it would run a task that already succeeded a second
        time. So those are never returned; they get ``ack_grace_s`` more to be acknowledged
        (a failed ack goes to the syncer, which makes a final attempt at shutdown)."""
        if self._workers:
            await asyncio.wait(set(self._workers), timeout=timeout_s)
        acking = [r for r in self.running.values()
                  if r.handler_done and not r.finished.is_set()]
        if acking:
            await asyncio.wait([asyncio.ensure_future(r.finished.wait()) for r in acking],
                               timeout=ack_grace_s)
        return [r for r in self.running.values()
                if not r.finished.is_set() and not r.handler_done]

    async def abort(self, leftovers: list[Running]) -> None:
        """Shutdown timeout: requeue what still runs, then cancel the handlers (asynq order).

        The requeue happens first so the task is never active without a lease owner; the
        handler's own eventual outcome is then ignored.
        """
        for run in leftovers:
            run.cancel_reason = CancelReason.SHUTDOWN
            try:
                await self.broker.requeue(run.message)
            except errors.AqshError as exc:
                log.warning("task.requeue_failed", task_id=run.task_id, error=str(exc))
        for run in leftovers:
            run.cancel(CancelReason.SHUTDOWN)
        if self._workers:
            await asyncio.wait(set(self._workers), timeout=30)

    async def close(self) -> None:
        """After the last task: stop acknowledging, then close the handler if it has an
        ``aclose`` coroutine (a handler with a Redis connection of its own, say): it has no
        task left to serve, and a stopped server should leave nothing open behind it."""
        if self._ack_flusher is not None:
            await finish(self._ack_flusher)
        closer = getattr(self.handler, "aclose", None)
        if closer is not None:
            await closer()

    # ---------------------------------------------------------------- fetching
    async def _fetch_loop(self) -> None:
        """Never ends on an error: any failure of a dequeue (an outage, an error reply such as
        OOM or NOPERM, a bug) is recorded, backed off, and the loop goes on."""
        idle_polls = 0
        backoff = Backoff(first_s=0.1, max_s=2.0)
        while not self._stopping.is_set():
            free = self.concurrency - self.busy
            if free <= 0:
                self.fetch_monitor.ok()
                self._slot_free.clear()
                raise_if_cancelling()  # a cancel redis-py swallowed must not park us for good
                with self.fetch_monitor.parking():  # every slot busy: waiting is the job
                    await self._slot_free.wait()
                continue
            self._wake.clear()
            try:
                batch = await self.broker.dequeue_many(
                    queue_order(self.queues, strict=self.strict_priority),
                    limit=min(free, self.max_batch),
                    now_s=int(self.clock.now_s()),
                )
            except Exception as exc:  # see the docstring
                await pause_after_failure(self.fetch_monitor, exc, backoff, self._stopping)
                continue
            backoff.reset()
            self.fetch_monitor.ok()
            if batch:
                idle_polls = 0
                for leased in batch:
                    self._spawn(leased)
                continue
            idle_polls += 1
            # Back off from 0.1 s to the poll interval while idle: a wake-up cuts it short.
            delay = min(self.poll_interval_s, 0.05 * (2**min(idle_polls, 10)))
            loop = asyncio.get_running_loop()
            self.next_poll_at = loop.time() + delay
            await wait_event(self._wake, delay)
            self.next_poll_at = None

    def _spawn(self, leased: Leased) -> None:
        msg = leased.message
        now_s = self.clock.now_s()
        run = Running(
            message=msg,
            lease_expires_s=float(leased.lease_expires_s),
            started_ns=self.clock.now_ns(),
            deadline=deadline_for(msg, now_s),
            result_writer=_Writer(self.broker, msg),
        )
        self.running[msg.id] = run
        worker = asyncio.create_task(self._work(run), name=f"aqsh-task-{msg.id}")
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    # ---------------------------------------------------------------- running
    async def _work(self, run: Running) -> None:
        msg = run.message
        task = Task(id=msg.id, type=msg.type, payload=msg.payload, queue=msg.queue,
                    headers=msg.headers, retried=msg.retried, max_retry=msg.retry)
        loop = asyncio.get_running_loop()
        timer = None
        try:
            run.handler_task = asyncio.create_task(self._call(task, run))
            remaining_s = run.deadline - self.clock.now_s()
            if remaining_s <= 0:
                run.cancel(CancelReason.DEADLINE)
            else:
                timer = loop.call_later(remaining_s, run.cancel, CancelReason.DEADLINE)
            outcome: BaseException | None = None
            result: bytes | None = None
            try:
                result = await asyncio.shield(run.handler_task)
            except asyncio.CancelledError:
                if run.handler_task.done() and not run.handler_task.cancelled():
                    outcome = run.handler_task.exception()
                elif run.handler_task.cancelled():
                    outcome = _cancel_error(run.cancel_reason)
                else:
                    raise  # the worker itself is being cancelled
            except BaseException as exc:
                outcome = exc
            await self._record(run, task, result, outcome)
        except Exception:
            log.exception("task.internal_error", task_id=msg.id)
        finally:
            if timer is not None:
                timer.cancel()
            run.finished.set()
            self.running.pop(msg.id, None)
            self._slot_free.set()

    async def _call(self, task: Task, run: Running) -> bytes | None:
        return await self.handler(task, run)

    async def _record(
        self, run: Running, task: Task, result: bytes | None, outcome: BaseException | None
    ) -> None:
        msg = run.message
        reason = run.cancel_reason
        if reason in (CancelReason.SHUTDOWN, CancelReason.LEASE_LOST):
            # Shutdown already requeued it; a lost lease means someone else owns it now.
            log.info("task.abandoned", task_id=msg.id, reason=str(reason))
            return
        if self.clock.now_s() > run.lease_expires_s:
            log.warning("task.lease_expired_before_write", task_id=msg.id)
            return
        now_s = int(self.clock.now_s())
        if outcome is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await self._acks.put((run, result, done))
            self._acking += 1
            self._slot_free.set()
            try:
                await done
            finally:
                self._acking -= 1
            log.debug("task.succeeded", task_id=msg.id, type=msg.type)
            return
        if isinstance(outcome, RevokeTask):
            if await self._write(run, lambda: self.broker.done(msg, now_s=now_s)):
                self._told(msg, "revoked", "")
            return
        error_msg = _error_text(outcome)
        # A handler that let a cancellation (asynq:cancel) end it: aqsh ends the task, as
        # someone asked it to stop; asynq retries it (cancel_retries=True).
        cancelled = (reason is CancelReason.CANCELED
                     and isinstance(outcome, asyncio.CancelledError))
        if (isinstance(outcome, SkipRetry) or msg.retried >= msg.retry
                or (cancelled and not self.cancel_retries)):
            log.info("task.archived", task_id=msg.id, type=msg.type, error=error_msg)
            if await self._write(run, lambda: self.broker.archive(msg, error_msg=error_msg,
                                                                  now_s=now_s)):
                self._told(msg, "archived", error_msg)
            return
        delay_s = self.retry_delay(msg.retried, outcome, task)
        retry_at_s = int(now_s + delay_s)
        failure = self.is_failure(outcome)
        log.info("task.retry", task_id=msg.id, type=msg.type, error=error_msg,
                 retry_in_s=delay_s)
        if await self._write(
            run,
            lambda: self.broker.retry(msg, retry_at_s=retry_at_s, error_msg=error_msg,
                                      is_failure=failure, now_s=now_s),
        ):
            self._told(msg, "retry", error_msg)

    def _told(self, msg: TaskMessage, transition: str, error_msg: str) -> None:
        """Writes deferred to the syncer are not told: an observer that must not miss one
        has to look at the stored state itself (aqsh.webhooks sweeps for that)."""
        if self.on_transition is None:
            return
        try:
            self.on_transition(msg, transition, error_msg)
        except Exception:
            log.exception("task.transition_hook_failed", task_id=msg.id)

    async def _write(self, run: Running, write: Callable[[], object]) -> bool:
        """True when the write is stored."""
        try:
            await write()  # type: ignore[misc]
        except _RETRIABLE_WRITE as exc:
            log.warning("task.write_deferred", task_id=run.task_id, error=str(exc))
            if self.on_write_failure is not None:
                self.on_write_failure(run, write)
        except errors.AqshError as exc:
            log.warning("task.write_failed", task_id=run.task_id, error=str(exc))
        else:
            return True
        return False

    async def _flush_acks(self) -> None:
        """One pipelined round trip acknowledges every success that finished meanwhile.

        Nothing may end this loop: a success whose ack is never sent would wait forever and
        hold its slot. Any failure of the round trip hands each ack to the syncer."""
        while True:
            with self.ack_monitor.parking():  # nothing to acknowledge: not a stall
                batch = [await self._acks.get()]
            while not self._acks.empty() and len(batch) < 256:
                batch.append(self._acks.get_nowait())
            msgs = [run.message for run, _, _ in batch]
            outcomes: list[errors.AqshError | None]
            try:
                outcomes = await self.broker.finish_successes(
                    msgs, now_s=int(self.clock.now_s()), results=[r for _, r, _ in batch]
                )
            except Exception as exc:  # see the docstring
                unavailable = errors.BrokerUnavailable(f"acknowledgement failed: {exc}")
                unavailable.__cause__ = exc
                outcomes = [unavailable for _ in batch]
            faults = [err for err in outcomes if isinstance(err, _RETRIABLE_WRITE)]
            if faults:
                self.ack_monitor.failed(faults[0])
            else:
                self.ack_monitor.ok()
            for (run, result, fut), err in zip(batch, outcomes, strict=True):
                if isinstance(err, _RETRIABLE_WRITE) and self.on_write_failure:
                    self.on_write_failure(run, _success_write(self.broker, run, result,
                                                              self.clock))
                elif err is not None:
                    log.warning("task.ack_failed", task_id=run.task_id, error=str(err))
                else:
                    self._told(run.message, "completed", "")
                if not fut.done():
                    fut.set_result(None)


#: A finishing write that failed this way did not happen and may succeed later: the syncer
#: retries it until the lease ends. An outage, an error reply about Redis's condition, and one
#: that needs an operator (NOPERM) alike — dropping it would leave the task active until the
#: recoverer runs it a second time.
_RETRIABLE_WRITE = (errors.BrokerUnavailable, errors.BrokerFault)


def _success_write(
    broker: Broker, run: Running, result: bytes | None, clock: Clock
) -> Callable[[], object]:
    async def write() -> None:
        errs = await broker.finish_successes(
            [run.message], now_s=int(clock.now_s()), results=[result]
        )
        if errs[0] is not None:
            raise errs[0]

    return write


def _cancel_error(reason: CancelReason | None) -> BaseException:
    if reason is CancelReason.DEADLINE:
        return TimeoutError("context deadline exceeded")
    return asyncio.CancelledError(CONTEXT_CANCELED)


def _error_text(exc: BaseException) -> str:
    """Signals aqsh raises on purpose keep their text; anything else says what blew up."""
    text = str(exc)
    expected = (TimeoutError, asyncio.CancelledError, TaskError, errors.AqshError)
    if isinstance(exc, expected):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
