"""Redis fault taxonomy and the supervised-loop pattern every long-lived loop runs under.

A worker lives for weeks; Redis will answer some command with an error reply in that time
(``OOM`` when maxmemory is reached, ``READONLY`` after a failover, ``LOADING`` while a restart
reads its AOF, ``NOPERM`` after an ACL change). None of those may end a loop: a dead fetcher
leaves tasks pending forever, a dead heartbeat lets every lease lapse so other workers run the
same tasks again. So every loop runs under :func:`supervise`, which logs, counts, backs off and
resumes, and records what it saw in a :class:`LoopMonitor` that the health endpoints read.

The taxonomy splits faults in two. *Transient* ones clear by themselves (connection loss, a
replica that is being promoted, a full memory that an operator or eviction frees); *operator*
ones do not (a missing ACL permission, a key of the wrong type). Both are retried forever —
giving up would lose work — but operator faults are logged at error level, because waiting will
not fix them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import structlog
from redis import exceptions as rex

from aqsh import errors
from aqsh.clock import wait_event

log = structlog.get_logger("aqsh.engine")

#: Error-reply codes that clear without an operator: memory freed or evicted, a save that
#: succeeds again, a failover that completes, a script that ends, a load that finishes.
TRANSIENT_CODES = frozenset({
    "OOM", "MISCONF", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
    "MOVED", "ASK", "NOREPLICAS", "UNBLOCKED",
})
#: Error-reply codes that persist until someone changes the deployment.
OPERATOR_CODES = frozenset({"NOPERM", "WRONGTYPE", "NOAUTH", "WRONGPASS", "NOSCRIPT"})

# redis-py strips the code from some replies and raises a subclass instead; map them back.
_CLASS_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (rex.OutOfMemoryError, "OOM"),
    (rex.ReadOnlyError, "READONLY"),
    (rex.BusyLoadingError, "LOADING"),
    (rex.NoPermissionError, "NOPERM"),
    (rex.NoScriptError, "NOSCRIPT"),
    (rex.AuthenticationError, "NOAUTH"),
    (rex.ClusterDownError, "CLUSTERDOWN"),
    (rex.TryAgainError, "TRYAGAIN"),
    (rex.AskError, "ASK"),
    (rex.MovedError, "MOVED"),
)
# A reply starts with its code; inside a script error (``ERR Error running script ...:
# @user_script:3: -OOM command not allowed``) the code of the failing call follows a dash.
_CODE_RE = re.compile(r"(?:^|-|\s)([A-Z]{2,12})\b")
_KNOWN_CODES = TRANSIENT_CODES | OPERATOR_CODES


@dataclass(frozen=True)
class Fault:
    #: A short label for logs and metrics: a Redis error code in lower case (``oom``,
    #: ``noperm``), ``connection``, ``timeout``, ``redis_error`` (another error reply) or
    #: ``internal`` (not a Redis fault: a bug).
    kind: str
    transient: bool


def redis_error_code(exc: BaseException) -> str | None:
    """The Redis error code of an error reply (``OOM``, ``NOPERM``...), if it is a known one."""
    for cls, code in _CLASS_CODES:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, rex.ResponseError):
        for match in _CODE_RE.finditer(str(exc)):
            if match.group(1) in _KNOWN_CODES:
                return match.group(1)
    return None


def classify(exc: BaseException) -> Fault:
    """Decides whether waiting can cure ``exc``; unwraps aqsh errors to the Redis cause."""
    cause: BaseException | None = exc
    while isinstance(cause, errors.AqshError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is None:
        cause = exc
    code = redis_error_code(cause)
    if code is not None:
        return Fault(code.lower(), code in TRANSIENT_CODES)
    if isinstance(cause, (rex.TimeoutError, TimeoutError)):
        return Fault("timeout", True)
    if isinstance(cause, (rex.ConnectionError, OSError, EOFError)):
        return Fault("connection", True)
    if isinstance(exc, errors.BrokerUnavailable):
        return Fault("connection", True)
    if isinstance(cause, rex.ResponseError):
        return Fault("redis_error", False)
    if isinstance(exc, errors.BrokerFault):
        return Fault("redis_error", False)
    return Fault("internal", False)


def is_redis_fault(exc: BaseException) -> bool:
    """An error reply that says something about Redis's condition rather than about the
    command (a script's own ``NOT FOUND`` reply is not one)."""
    return redis_error_code(exc) is not None


class Backoff:
    """Exponential back-off with full jitter, so that workers that failed together (one Redis
    restart) do not retry together."""

    def __init__(self, first_s: float = 0.05, max_s: float = 2.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.attempt = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.max_s, self.first_s * (2 ** min(self.attempt, 16)))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class LoopMonitor:
    """What one loop last did, for ``/health``: a loop is *stalled* (not ready) when it has not
    completed a cycle within ``ready_after_s`` or its last attempt failed, and *wedged* (not
    live — a restart is the cure) when it has done nothing at all, neither a cycle nor a
    failure, for ``live_after_s``. A loop that fails keeps trying and is not wedged: restarting
    the process does not bring Redis back. ``parked`` marks a wait that is the loop's job
    (a fetcher with every slot busy), which neither check holds against it."""

    name: str
    ready_after_s: float
    live_after_s: float
    clock: Callable[[], float] = time.monotonic
    started_at: float = field(default=0.0)
    last_ok_at: float | None = None
    last_activity_at: float = 0.0
    last_error: str | None = None
    last_kind: str | None = None
    consecutive_errors: int = 0
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    parked: bool = False

    def __post_init__(self) -> None:
        self.started_at = self.last_activity_at = self.clock()

    def ok(self) -> None:
        self.last_ok_at = self.last_activity_at = self.clock()
        self.consecutive_errors = 0

    def failed(self, exc: BaseException) -> Fault:
        fault = classify(exc)
        self.last_activity_at = self.clock()
        self.consecutive_errors += 1
        self.errors_by_kind[fault.kind] += 1
        self.last_kind = fault.kind
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        level = log.warning if fault.transient else log.error
        level("loop.failed", loop=self.name, kind=fault.kind, transient=fault.transient,
              error=self.last_error, consecutive=self.consecutive_errors,
              exc_info=fault.kind == "internal")
        return fault

    @contextlib.contextmanager
    def parking(self) -> Iterator[None]:
        self.parked = True
        try:
            yield
        finally:
            self.parked = False
            self.last_activity_at = self.clock()

    def problems(self) -> tuple[str | None, str | None]:
        """(why not ready, why not live); None where the check passes."""
        now = self.clock()
        not_ready = not_live = None
        # A failure counts while it is recent: a loop that acts on events (acks) may fail once
        # and then have nothing to do, and must not stay unready for ever after.
        if self.consecutive_errors and now - self.last_activity_at <= self.ready_after_s:
            not_ready = f"failing: {self.last_kind}: {self.last_error}"
        elif not self.parked:
            since = self.last_ok_at if self.last_ok_at is not None else self.started_at
            if now - since > self.ready_after_s:
                not_ready = f"no cycle completed for {now - since:.1f}s"
        if not self.parked and now - self.last_activity_at > self.live_after_s:
            not_live = f"wedged: no progress for {now - self.last_activity_at:.1f}s"
        return not_ready, not_live


class Loops:
    """Every supervised loop of a process, as the health endpoints and metrics see them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.monitors: dict[str, LoopMonitor] = {}

    def monitor(self, name: str, *, ready_after_s: float = 30.0,
                live_after_s: float = 120.0) -> LoopMonitor:
        """The monitor of ``name``; a second loop of the same name (a restarted component)
        takes over the record."""
        found = self.monitors[name] = LoopMonitor(name, ready_after_s, live_after_s,
                                                  clock=self.clock)
        return found

    def remove(self, name: str) -> None:
        self.monitors.pop(name, None)

    def report(self) -> tuple[bool, bool, dict[str, dict[str, object]]]:
        """(ready, live, per-loop detail) for the health endpoints."""
        ready = live = True
        detail: dict[str, dict[str, object]] = {}
        for name, mon in sorted(self.monitors.items()):
            not_ready, not_live = mon.problems()
            ready = ready and not_ready is None
            live = live and not_live is None
            entry: dict[str, object] = {"ok": not_ready is None and not_live is None}
            if not_ready is not None:
                entry["not_ready"] = not_ready
            if not_live is not None:
                entry["not_live"] = not_live
            if mon.parked:
                entry["parked"] = True
            detail[name] = entry
        return ready, live, detail

    def error_counts(self) -> Iterator[tuple[str, str, int]]:
        for name, mon in self.monitors.items():
            for kind, count in mon.errors_by_kind.items():
                yield name, kind, count


async def supervise(monitor: LoopMonitor, body: Callable[[], Awaitable[None]],
                    *, backoff: Backoff | None = None) -> None:
    """Runs ``body`` until it returns (a requested stop). Any exception is recorded on the
    monitor, backed off with jitter, and ``body`` is called again: a loop never dies on an
    error. Cancellation is the only way to end it early."""
    backoff = backoff or Backoff()
    task = asyncio.current_task()
    while True:
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the point of a supervisor
            if task is not None and task.cancelling():
                # A library turned our cancellation into another error: stop, don't retry.
                raise asyncio.CancelledError from exc
            monitor.failed(exc)
            await asyncio.sleep(backoff.next_delay_s())


async def pause_after_failure(monitor: LoopMonitor, exc: BaseException, backoff: Backoff,
                              stop: asyncio.Event | None = None) -> None:
    """For loops that handle a failure inside their cycle (to keep their state): record it and
    wait out the back-off, cut short by ``stop``."""
    monitor.failed(exc)
    delay = backoff.next_delay_s()
    if stop is None:
        await asyncio.sleep(delay)
        return
    await wait_event(stop, delay)
