"""clock.finish: a stop() that is itself cancelled must not carry on as if it had not been."""

from __future__ import annotations

import asyncio

import pytest

from aqsh.clock import finish


async def _slow_to_cancel(cancelled: asyncio.Event, release: asyncio.Event) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        await release.wait()  # a child that takes its time to wind down
        raise


async def test_the_childs_cancellation_is_swallowed() -> None:
    child = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await finish(child)
    assert child.cancelled()


async def test_a_cancel_of_the_caller_during_the_wait_propagates() -> None:
    cancelled, release = asyncio.Event(), asyncio.Event()
    child = asyncio.create_task(_slow_to_cancel(cancelled, release))
    after_finish = []

    async def stopper() -> None:
        await finish(child)
        after_finish.append("went on")

    stop = asyncio.create_task(stopper())
    await cancelled.wait()
    stop.cancel()  # the stopper is cancelled while it waits for the child
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await stop
    assert after_finish == []


async def test_cleanup_after_the_callers_own_cancel_still_waits_children_out() -> None:
    child_done = asyncio.Event()

    async def child_body() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            child_done.set()

    steps = []

    async def owner() -> None:
        child = asyncio.create_task(child_body())
        try:
            await asyncio.Event().wait()
        finally:  # the owner's cancel was delivered already: cleanup must run to its end
            await finish(child)
            steps.append("cleaned")

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert child_done.is_set()
    assert steps == ["cleaned"]
