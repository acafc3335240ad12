"""Log reading at its edges: bad cursors refused before any stream, a cap on followers,
``?follow=false`` in pages, lines trimmed by the cap reported (``event: gap``, a lost-lines
line), attempt times that outlive the stream's markers, and a client that leaves being no
error."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog

from aqsh.runner.logs import LogWriter, log_key
from tests.api.conftest import Service, ServiceFactory, sse_events
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)


async def _scheduled_task(service: Service) -> str:
    """A task that stays scheduled for an hour: its followers follow until they leave."""
    status, body, _ = await service.request("POST", "/tasks/slow?process_in=1h")
    assert status == 202
    return str(body["id"])


async def _write(redis: aioredis.Redis, writer: LogWriter, task_id: str,
                 lines: list[str]) -> None:
    writer.put_lines("stdout", lines)

    async def written() -> bool:  # the last line is the stream's last entry (cap or not)
        last = await redis.xrevrange(log_key(task_id), count=1)
        return bool(last) and last[0][1].get(b"line") == lines[-1].encode()

    await wait_until(written, timeout_s=30, message="lines written")


@pytest.mark.parametrize("bad", ["-1", "1-", "-", "18446744073709551616-0",
                                 "0-18446744073709551616", "1-2-3", "abc", "1 -2", ""])
async def test_a_bad_last_event_id_is_a_400_before_any_stream(
    make_service: ServiceFactory, bad: str
) -> None:
    service = await make_service(worker=False)
    task_id = await _scheduled_task(service)
    for path, kwargs in [
        (f"/tasks/{task_id}/logs", {"headers": {"Last-Event-ID": bad}}),
        (f"/tasks/{task_id}/logs", {"params": {"last_event_id": bad}}),
        (f"/tasks/{task_id}/logs?follow=false", {"headers": {"Last-Event-ID": bad}}),
    ]:
        status, body, headers = await service.request("GET", path, **kwargs)
        assert status == 400, (path, kwargs, body)
        assert headers["Content-Type"].startswith("application/json")
        assert body["error"]["code"] == "bad_last_event_id"


async def test_the_largest_stream_id_is_a_valid_cursor(make_service: ServiceFactory) -> None:
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    await sse_events(service, body["id"])  # to its eof: the task has finished
    largest = "18446744073709551615-18446744073709551615"
    status, text, _ = await service.request("GET", f"/tasks/{body['id']}/logs?follow=false",
                                            headers={"Last-Event-ID": largest})
    assert (status, text) == (200, None)  # an empty body
    events = await sse_events(service, body["id"], last_event_id=largest)
    assert [e.get("event") for e in events] == ["eof"]


async def test_followers_beyond_the_cap_get_503_with_retry_after(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False, max_sse_clients=2)
    task_id = await _scheduled_task(service)
    timeout = aiohttp.ClientTimeout(total=60)
    url = f"{service.url}/tasks/{task_id}/logs"
    held = [await service.session.get(url, timeout=timeout) for _ in range(2)]
    try:
        assert [r.status for r in held] == [200, 200]
        status, body, headers = await service.request("GET", f"/tasks/{task_id}/logs")
        assert status == 503
        assert body["error"]["code"] == "too_many_followers"
        assert int(headers["Retry-After"]) > 0
        # Reading without following is not capped.
        status, _, _ = await service.request("GET", f"/tasks/{task_id}/logs?follow=false")
        assert status == 200
    finally:
        held[0].close()
    # The slot comes back once the server sees the client gone.
    await wait_until(lambda: _accepted(service, url), timeout_s=60, interval_s=0.5,
                     message="a slot freed by the client that left")
    held[1].close()


async def _accepted(service: Service, url: str) -> bool:
    resp = await service.session.get(url, timeout=aiohttp.ClientTimeout(total=60))
    resp.close()
    return resp.status == 200


async def test_follow_false_streams_a_long_log_in_pages(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    service = await make_service(worker=False)
    task_id = await _scheduled_task(service)
    writer = LogWriter(redis, task_id, retention_s=600)
    writer.mark_start(0)
    writer.put_lines("stdout", [f"n {i}" for i in range(2500)])
    await writer.close(0)
    async with service.session.get(f"{service.url}/tasks/{task_id}/logs?follow=false") as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"  # written as it is read
        text = await resp.text()
    assert text.splitlines() == [f"n {i}" for i in range(2500)]


async def test_lines_the_cap_trimmed_are_reported_as_a_gap(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A follower resuming behind the trimmed part gets ``event: gap`` with the exact count,
    then every line that is left; ``?follow=false`` writes a line saying how many are gone."""
    service = await make_service(worker=False)
    task_id = await _scheduled_task(service)
    writer = LogWriter(redis, task_id, retention_s=600, max_stream_len=100, linger_s=0)
    writer.mark_start(0)
    await _write(redis, writer, task_id, ["a", "b", "c"])
    seen = [i.decode() for i, _ in await redis.xrange(log_key(task_id))][-1]  # line "c"
    await _write(redis, writer, task_id, [f"n {i}" for i in range(1000)])
    entries = await redis.xrange(log_key(task_id))
    first_kept = int(entries[0][0].decode().split("-")[1])
    last = int(entries[-1][0].decode().split("-")[1])
    expected_lost = first_kept - int(seen.split("-")[1]) - 1
    assert expected_lost > 0  # the cap did trim what the follower had not seen

    events = await sse_events(service, task_id, last_event_id=seen, limit=1 + len(entries))
    assert events[0]["event"] == "gap"
    assert events[0]["data"] == f'{{"lost":{expected_lost}}}'
    lines = [e["data"] for e in events[1:]]
    assert lines == [f[b"line"].decode() for _, f in entries]
    assert expected_lost + len(lines) == last - int(seen.split("-")[1])

    status, text, _ = await service.request("GET", f"/tasks/{task_id}/logs?follow=false")
    assert status == 200
    first, *rest = text.splitlines()
    assert first == (f"[aqsh] {first_kept - 1} log lines lost: trimmed by the log's length "
                     "cap before they were read")
    assert rest == lines


async def test_attempt_times_outlive_the_streams_markers(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/echo", json={"name": "ada"})
    await sse_events(service, body["id"])
    before = await _finished_task(service, body["id"])
    assert before["started_at"] is not None
    assert before["finished_at"] is not None
    await redis.xtrim(log_key(body["id"]), maxlen=0)  # what the cap does to a long log
    _, after, _ = await service.request("GET", f"/tasks/{body['id']}")
    assert (after["started_at"], after["finished_at"]) == (before["started_at"],
                                                           before["finished_at"])


async def _finished_task(service: Service, task_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        _, task, _ = await service.request("GET", f"/tasks/{task_id}")
        return task if task["state"] == "completed" else None

    return await wait_until(check, timeout_s=30, message="task completed")


async def test_a_client_that_leaves_is_not_an_error(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    service = await make_service(worker=False)
    task_id = await _scheduled_task(service)
    writer = LogWriter(redis, task_id, retention_s=600, linger_s=0)
    writer.mark_start(0)
    await _write(redis, writer, task_id, ["first"])
    with structlog.testing.capture_logs() as logs:
        reader, conn = await asyncio.open_connection("127.0.0.1", int(service.url.rsplit(":")[-1]))
        conn.write(f"GET /tasks/{task_id}/logs HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await conn.drain()
        raw = b""
        while b"data: first" not in raw:
            raw += await asyncio.wait_for(reader.read(4096), 30)
        assert _followers(service) == 1
        conn.transport.abort()
        count = 0
        while _followers(service):  # lines keep coming; the follower must notice
            await _write(redis, writer, task_id, [f"more {count}"])
            count += 1
            await asyncio.sleep(0.05)
    await writer.close(0)
    errors = [e for e in logs if e["log_level"] in ("error", "critical", "exception")]
    assert errors == []


def _followers(service: Service) -> float:
    value = service.state.metrics.registry.get_sample_value("aqsh_sse_clients")
    return value or 0.0
