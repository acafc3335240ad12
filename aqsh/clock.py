"""Time as an injected dependency.

Every component that computes a score, a lease or a retry time reads the clock through this
protocol, so tests drive time with ``ManualClock`` instead of sleeping, and Lua scripts never
read Redis ``TIME`` (asynq writes times from the writer's clock; so do we).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Unix time in nanoseconds."""
        ...

    def now_s(self) -> float:
        """Unix time in seconds, fractional."""
        ...


class SystemClock:
    def now_ns(self) -> int:
        return time.time_ns()

    def now_s(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when a test says so."""

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self._now_ns = int(start_s * 1_000_000_000)

    def now_ns(self) -> int:
        return self._now_ns

    def now_s(self) -> float:
        return self._now_ns / 1_000_000_000

    def advance(self, seconds: float) -> None:
        self._now_ns += int(seconds * 1_000_000_000)

    def set(self, unix_s: float) -> None:
        self._now_ns = int(unix_s * 1_000_000_000)


def unix_s(clock: Clock) -> int:
    """Whole Unix seconds, as asynq writes every score (truncated, never rounded)."""
    return clock.now_ns() // 1_000_000_000


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that something below swallowed (see
    ``wait_event``); loops call it before each wait that has no timeout of its own."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True when it was set.

    Every loop naps this way, never with ``asyncio.wait_for``: on Python 3.11 that swallows a
    cancellation arriving as its timeout fires, and a cancelled loop that goes on running makes
    the ``stop()`` awaiting it hang for ever (seen: a scheduler that kept firing after its
    stop). ``asyncio.timeout`` tells the two apart.

    It also re-raises a cancellation that something below swallowed: redis-py 8 can return
    normally from a command whose task was cancelled meanwhile, and the loop would go on
    napping and firing. A task with a cancel pending never starts a nap."""
    raise_if_cancelling()
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def finish(task: asyncio.Task[Any], *, cancel: bool = True) -> None:
    """Wait for ``task`` to end (cancelling it first unless ``cancel`` is False), swallowing
    only the task's own cancellation.

    ``contextlib.suppress(CancelledError)`` around the await also eats a cancellation of the
    *caller* arriving meanwhile, so a ``stop()`` that was itself cancelled (a shutdown timeout,
    a second signal) would carry on as if nothing happened. Here that one propagates. Only a
    cancel that arrives during this wait counts: cleanup running after the caller's own
    cancellation was delivered (a ``finally`` block) still waits its children out."""
    current = asyncio.current_task()
    pending_before = current.cancelling() if current is not None else 0
    if cancel:
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > pending_before:
            raise
