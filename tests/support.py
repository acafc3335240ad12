"""Test helpers shared by every suite: polling with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_until(
    condition: Callable[[], Awaitable[T] | T],
    timeout_s: float = 10.0,
    interval_s: float = 0.01,
    message: str = "condition",
) -> T:
    """Poll ``condition`` (sync or async) until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value  # type: ignore[misc]
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        await asyncio.sleep(interval_s)


def wait_until_sync(
    condition: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.01,
    message: str = "condition",
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)


async def redis_answers(redis: Any) -> bool:
    """For polling until a restarted Redis is back: True once PING succeeds."""
    try:
        return bool(await redis.ping())
    except Exception:
        return False


def json_log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process's output, parsed: tests look at fields, never at how a
    renderer spaces them."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
