"""Server: wires processor, heartbeater, forwarder, recoverer, janitor, aggregator, syncer and
the cancellation/wake-up subscribers, and stops them in an order that loses nothing.

A handler registry (``ServeMux``) routes task types like asynq's: exact match first, then the
longest registered prefix; middleware wraps every handler.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import structlog

from aqsh import errors
from aqsh.clock import Clock, SystemClock
from aqsh.engine.aggregator import Aggregator, GroupAggregator, GroupSettings
from aqsh.engine.broker import Broker
from aqsh.engine.client import Client
from aqsh.engine.faults import Backoff, Loops, redis_error_code, supervise
from aqsh.engine.heartbeat import HEARTBEAT_INTERVAL_S, Heartbeater
from aqsh.engine.maintenance import DependencySweep, Forwarder, Janitor, Recoverer
from aqsh.engine.models import TaskMessage
from aqsh.engine.processor import (
    Processor,
    RetryDelayFn,
    Running,
    TransitionHook,
    default_retry_delay,
    normalise_queues,
)
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.syncer import Syncer
from aqsh.engine.task import CancelReason, Handler, Task, TaskContext

log = structlog.get_logger("aqsh.engine")

Middleware = Callable[[Handler], Handler]

# The longest gap between polls of an idle worker. aqsh's own client (and the forwarder) wake
# workers through a channel, so polling only serves foreign enqueuers such as Go clients; 1.25 s
# keeps an idle worker's Redis commands/s below a Go asynq server's (which polls every 1 s).
IDLE_POLL_INTERVAL_S = 1.25


class HandlerNotFound(errors.AqshError):
    """No handler for a task type: a normal failure (retried), with asynq's error text."""

    code = "handler_not_found"


class ServeMux:
    """Routes a task to the handler registered for its type or the longest matching prefix."""

    def __init__(self) -> None:
        self._exact: dict[str, Handler] = {}
        self._prefixes: list[tuple[str, Handler]] = []
        self._middleware: list[Middleware] = []

    def handle(self, pattern: str, handler: Handler) -> None:
        if not pattern.strip():
            raise ValueError("handler pattern must not be blank")
        self._exact[pattern] = handler
        self._prefixes.append((pattern, handler))
        self._prefixes.sort(key=lambda item: -len(item[0]))

    def use(self, middleware: Middleware) -> None:
        self._middleware.append(middleware)

    def resolve(self, task_type: str) -> Handler | None:
        if task_type in self._exact:
            return self._exact[task_type]
        for pattern, handler in self._prefixes:
            if task_type.startswith(pattern):
                return handler
        return None

    async def __call__(self, task: Task, ctx: TaskContext) -> bytes | None:
        handler = self.resolve(task.type)
        if handler is None:
            raise HandlerNotFound(f'handler not found for task "{task.type}"')
        for middleware in reversed(self._middleware):
            handler = middleware(handler)
        return await handler(task, ctx)


class Server:
    def __init__(
        self,
        broker: Broker,
        handler: Handler,
        *,
        concurrency: int = 10,
        queues: Mapping[str, int] | None = None,
        strict_priority: bool = False,
        shutdown_timeout_s: float = 8.0,
        retry_delay: RetryDelayFn = default_retry_delay,
        is_failure: Callable[[BaseException], bool] = lambda exc: True,
        clock: Clock | None = None,
        poll_interval_s: float = IDLE_POLL_INTERVAL_S,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        forward_interval_s: float = 5.0,
        recover_interval_s: float = 2.0,
        janitor_interval_s: float = 8.0,
        loops: Loops | None = None,
        group_aggregator: GroupAggregator | None = None,
        group_grace_period_s: float = 60.0,
        group_max_delay_s: float = 0.0,
        group_max_size: int = 0,
        aggregation_interval_s: float | None = None,
        group_settings: Callable[[str, str], GroupSettings | None] | None = None,
        cancel_retries: bool = False,
        on_transition: TransitionHook | None = None,
        before_dependency_cancel: Callable[[TaskMessage], Awaitable[None]] | None = None,
    ) -> None:
        """``loops``: where the server's loops report their health (``/health`` reads it);
        pass the process's one registry when other components report there too.

        ``group_aggregator`` turns the tasks of a due group into one task (see
        aqsh.engine.aggregator; asynq's GroupAggregator); without one, grouped tasks wait and
        the log says so. ``group_grace_period_s`` (≥ 1 s), ``group_max_delay_s`` and
        ``group_max_size`` (0 = no limit) are asynq's GroupGracePeriod/MaxDelay/MaxSize;
        ``group_settings(queue, group)`` chooses them per group instead (None: not this
        server's group), and then ``aggregation_interval_s`` should be at most the shortest
        grace period.

        ``cancel_retries``: a task cancelled while running (``asynq:cancel``) is archived at
        once by default, since someone asked it to stop; True retries it under the usual
        rules, as asynq does. A handler that raises on cancellation decides for itself.

        ``on_transition``: told after each finishing write this server stores (see
        ``aqsh.engine.processor.TransitionHook``). A run its dependency sweep cancels is told
        as "canceled" after the write; ``before_dependency_cancel`` is awaited with that run's
        message before it, so a notice can be made durable first (it raising defers the
        cancel to the next sweep)."""
        self.broker = broker
        self.clock = clock or SystemClock()
        self.queues = normalise_queues(queues or {"critical": 6, "default": 3})
        self.shutdown_timeout_s = shutdown_timeout_s
        self.loops = loops = loops if loops is not None else Loops()
        self.syncer = Syncer(self.clock, loops=loops)
        self.processor = Processor(
            broker, handler, clock=self.clock, concurrency=concurrency, queues=self.queues,
            strict_priority=strict_priority, retry_delay=retry_delay, is_failure=is_failure,
            on_write_failure=self._defer_write, poll_interval_s=poll_interval_s, loops=loops,
            cancel_retries=cancel_retries,
            on_transition=on_transition,
        )
        names = list(self.queues)
        self.heartbeater = Heartbeater(
            broker, self.processor, self.clock, concurrency=self.processor.concurrency,
            queues=self.queues, strict_priority=strict_priority,
            interval_s=heartbeat_interval_s, loops=loops,
        )
        self.forwarder = Forwarder(broker, names, self.clock, forward_interval_s,
                                   on_forward=self.processor.wake, loops=loops)
        self.recoverer = Recoverer(broker, names, self.clock, retry_delay, recover_interval_s,
                                   loops=loops, on_recovered=self.forwarder.poke,
                                   is_failure=is_failure)
        settings = GroupSettings(grace_period_s=group_grace_period_s,
                                 max_delay_s=group_max_delay_s, max_size=group_max_size)
        aggregator_client: Client | None = None
        if group_aggregator is not None:
            if not isinstance(broker, RedisBroker):
                raise TypeError("a group aggregator needs a RedisBroker to enqueue with")
            aggregator_client = Client(broker, clock=self.clock)
        self.aggregator = Aggregator(broker, aggregator_client, names, self.clock,
                                     group_aggregator, settings,
                                     interval_s=aggregation_interval_s, loops=loops,
                                     group_settings=group_settings)
        self.janitor = Janitor(broker, names, self.clock, janitor_interval_s, loops=loops)
        self.on_transition = on_transition
        self.dependencies = DependencySweep(broker, names, self.clock, loops=loops,
                                            on_canceled=self._dependency_canceled,
                                            before_cancel=before_dependency_cancel)
        self._listeners: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = asyncio.Event()
        self._force = asyncio.Event()

    @property
    def server_id(self) -> str:
        return self.heartbeater.server_id

    def _dependency_canceled(self, msg: TaskMessage) -> None:
        """A run the dependency sweep archived (a task it waited for failed, was cancelled or
        is gone) never reached a worker: the hook hears of it here, as "canceled"."""
        if self.on_transition is None:
            return
        try:
            self.on_transition(msg, "canceled", msg.error_msg)
        except Exception:
            log.exception("task.transition_hook_failed", task_id=msg.id)

    def _defer_write(self, run: Running, write: Callable[[], object]) -> None:
        self.syncer.add(run.task_id, write, run.lease_expires_s)  # type: ignore[arg-type]

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        self.heartbeater.start()
        self._listeners = [
            asyncio.create_task(
                self._listen("cancel-subscriber", self.broker.cancellations, self._on_cancel),
                name="aqsh-cancel-subscriber"),
            asyncio.create_task(
                self._listen("wake-subscriber", self.broker.wakeups, self.processor.wake,
                             optional=True),
                name="aqsh-wake-subscriber"),
        ]
        self.syncer.start()
        self.recoverer.start()
        self.forwarder.start()
        self.janitor.start()
        self.dependencies.start()
        self.aggregator.start()
        self.processor.start()
        log.info("server.started", server_id=self.server_id, queues=self.queues,
                 concurrency=self.processor.concurrency)

    def _on_cancel(self, task_id: str) -> None:
        run = self.processor.running.get(task_id)
        if run is not None:
            log.info("task.cancel_requested", task_id=task_id)
            run.cancel(CancelReason.CANCELED)

    async def _listen(self, name: str, subscribe: Callable[[], AsyncIterator[str]],
                      sink: Callable[[str], None], *, optional: bool = False) -> None:
        """A subscription resubscribes by itself after connection loss; an error reply (a
        NOPERM on the channel, say) ends it, and then it is made again after a back-off.

        ``optional`` (the wake-ups): a NOPERM ends it for good with one warning, and the
        worker does not count it against readiness — polling finds every task anyway, so an
        ACL without aqsh's own channel (a Go-compatible one) costs latency, not service."""
        monitor = self.loops.monitor(name, ready_after_s=30.0, live_after_s=120.0)

        async def listen() -> None:
            with monitor.parking():  # waiting for messages is its job
                try:
                    async for item in subscribe():
                        sink(item)
                except Exception as exc:
                    if not optional or redis_error_code(exc) != "NOPERM":
                        raise
                    self.loops.remove(name)
                    log.warning("wakeup.subscribe_refused", loop=name, error=str(exc)[:300],
                                hint="workers poll for tasks instead (up to "
                                     f"{self.processor.poll_interval_s}s later)")

        await supervise(monitor, listen, backoff=Backoff(first_s=0.5, max_s=5.0))

    async def stop(self, *, shutdown_timeout_s: float | None = None) -> None:
        """Graceful stop. Order matters: stop producing work before the components that
        finish it, and keep heartbeats (status "closed") until the very end so the server stays
        visible while it drains."""
        if not self._started or self._stopped.is_set():
            return
        timeout_s = self.shutdown_timeout_s if shutdown_timeout_s is None else shutdown_timeout_s
        self.heartbeater.status = "closed"
        log.info("server.stopping", server_id=self.server_id, running=len(self.processor.running))
        await self.forwarder.stop()
        await self.aggregator.stop()
        await self.processor.stop_fetching()
        leftovers = await self._drain(timeout_s)
        if leftovers:
            log.warning("server.requeue_running", count=len(leftovers))
            await self.processor.abort(leftovers)
        await self.processor.close()
        await self.recoverer.stop()
        await self.syncer.stop()
        for listener in self._listeners:
            listener.cancel()
        # Bounded: a subscription blocked in a read whose cancellation a client library
        # swallowed would otherwise hold the whole stop (its connection closes with the pool).
        _, stuck = await asyncio.wait(self._listeners, timeout=5.0)
        if stuck:
            log.warning("server.subscriber_did_not_stop", count=len(stuck))
        await self.janitor.stop()
        await self.dependencies.stop()
        await self.heartbeater.stop()
        self._stopped.set()
        log.info("server.stopped", server_id=self.server_id)

    async def _drain(self, timeout_s: float) -> list[Running]:
        """Wait for handlers, cut short by a second signal (``force``)."""
        drain = asyncio.create_task(self.processor.drain(timeout_s))
        force = asyncio.create_task(self._force.wait())
        await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if drain.done():
            return drain.result()
        drain.cancel()
        return [r for r in self.processor.running.values() if not r.finished.is_set()]

    def force(self) -> None:
        self._force.set()

    async def run(self, until: Awaitable[object] | None = None) -> None:
        """Run until SIGTERM/SIGINT (or ``until`` completes). The first signal drains; a second
        one stops waiting for handlers and requeues them at once."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()

        def on_signal() -> None:
            if stop_requested.is_set():
                log.warning("server.forced_shutdown")
                self.force()
            stop_requested.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await self.start()
        try:
            waiters: set[asyncio.Future[Any]] = {asyncio.create_task(stop_requested.wait())}
            if until is not None:
                waiters.add(asyncio.ensure_future(until))
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
