"""The log pipeline and SSE under real faults: error replies from a real ``redis-server``
(OOM, READONLY, NOPERM), killed connections, replies lost or cut by a TCP proxy, a Redis that
is stopped under an open event stream.

For the log writer, on both transports (redis-py and the fast lane): while the fault lasts the
script is held by back-pressure, nothing is lost; once it clears, every line arrives exactly
once and in order. For SSE: a failing Redis never makes the server write a second HTTP response
into the open stream; a long outage ends it with ``event: error``, a short one is ridden out,
and a ``Last-Event-ID`` reconnect resumes with no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from aqsh.api import sse
from aqsh.engine.fastlane import FastLane
from aqsh.engine.scripts import script_source
from aqsh.redis_process import RedisProcess
from aqsh.runner.logs import LogWriter, log_key
from aqsh.runner.process import run_process
from tests.api.conftest import ServiceFactory, sse_events
from tests.fault_proxy import FaultProxy
from tests.support import redis_answers, wait_until

TRANSPORTS = ["redis-py", "fast-lane"]
USER, PASSWORD = "logwriter", "logwriter-secret"


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "s.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _count_script(tmp_path: Path, count: int) -> str:
    return _script(tmp_path, f'i=0\nwhile [ $i -lt {count} ]; do echo "n $i"; i=$((i+1)); done\n')


class Writing:
    """A client (and, for the fast lane, a lane) on ``url``, and the writers made on it."""

    def __init__(self, url: str, transport: str, **client_options: Any) -> None:
        options = {"socket_timeout": 5, "socket_connect_timeout": 2, **client_options}
        self.client = aioredis.Redis.from_url(url, **options)
        self.lane = FastLane.from_redis(self.client, spin_us=0) if transport == "fast-lane" \
            else None

    def writer(self, task_id: str, **options: Any) -> LogWriter:
        return LogWriter(self.client, task_id, retention_s=600, lane=self.lane, **options)

    async def aclose(self) -> None:
        if self.lane is not None:
            await self.lane.aclose()
        await self.client.aclose()


@pytest.fixture
async def writing(request: pytest.FixtureRequest, private_redis: RedisProcess
                  ) -> AsyncIterator[Callable[..., Writing]]:
    made: list[Writing] = []

    def make(url: str | None = None, **client_options: Any) -> Writing:
        made.append(Writing(url or private_redis.url, request.param, **client_options))
        return made[-1]

    yield make
    for item in made:
        await item.aclose()


async def _entries(admin: aioredis.Redis, task_id: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(i.decode(), f) for i, f in await admin.xrange(log_key(task_id))]


def _assert_exactly_once(entries: list[tuple[str, dict[bytes, bytes]]], lines: list[str],
                         exit_code: int = 0) -> None:
    """start marker, every line once and in order, eof; ids counting up by one."""
    assert entries[0][1][b"start"] == b"1"
    got = [f[b"line"].decode() for _, f in entries if b"line" in f]
    assert got == lines
    assert entries[-1][1] == {b"eof": b"1", b"exit_code": str(exit_code).encode()}
    counts = [int(entry_id.split("-")[1]) for entry_id, _ in entries]
    assert counts == list(range(1, len(entries) + 1))


# --------------------------------------------------------------------------- error replies
class ErrorReply:
    """Makes the private Redis answer the writer's appends with an error reply, and stops."""

    def __init__(self, kind: str, admin: aioredis.Redis, spare_port: int) -> None:
        self.kind = kind
        self.admin = admin
        self.spare_port = spare_port

    async def inject(self) -> None:
        if self.kind == "oom":
            await self.admin.config_set("maxmemory-policy", "noeviction")
            await self.admin.config_set("maxmemory", "1")
        elif self.kind == "readonly":
            # A replica of a master that is not there: it keeps its data and refuses writes.
            await self.admin.execute_command("REPLICAOF", "127.0.0.1", str(self.spare_port))
        elif self.kind == "noperm":
            await self.admin.execute_command("ACL", "SETUSER", USER, "-@scripting")

    async def clear(self) -> None:
        if self.kind == "oom":
            await self.admin.config_set("maxmemory", "0")
        elif self.kind == "readonly":
            await self.admin.execute_command("REPLICAOF", "NO", "ONE")
        elif self.kind == "noperm":
            await self.admin.execute_command("ACL", "SETUSER", USER, "+@all")


@pytest.mark.parametrize("writing", TRANSPORTS, indirect=True)
@pytest.mark.parametrize("kind", ["oom", "readonly", "noperm"])
async def test_the_writer_rides_out_an_error_reply_and_loses_nothing(
    writing: Callable[..., Writing], admin: aioredis.Redis, private_redis: RedisProcess,
    tmp_path: Path, kind: str,
) -> None:
    """An error reply used to end the flusher: the readers then waited for room forever and
    the script hung until its timeout. Now the batch is retried until the fault clears."""
    await admin.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*",
                                "+@all")
    await admin.script_load(script_source("append_log_lines"))
    fault = ErrorReply(kind, admin, spare_port=_unused_port())
    client = writing(username=USER, password=PASSWORD)
    writer = client.writer("t", max_buffered=200, batch_lines=50)
    await fault.inject()
    try:
        writer.mark_start(0)
        run = asyncio.create_task(run_process(
            [_count_script(tmp_path, 3000)], env={"PATH": os.environ["PATH"]},
            cwd=str(tmp_path), sink=writer))
        # Held by back-pressure: the buffer is full, the batch keeps being retried.
        await wait_until(lambda: writer.write_retries >= 3 and writer.full, timeout_s=30,
                         message=f"the writer retrying through {kind}")
        assert not run.done()
        assert await admin.xlen(log_key("t")) == 0
    finally:
        await fault.clear()
    outcome = await asyncio.wait_for(run, 60)
    await asyncio.wait_for(writer.close(outcome.exit_code), 60)
    _assert_exactly_once(await _entries(admin, "t"), [f"n {i}" for i in range(3000)])
    assert writer.lines_dropped == 0


@pytest.mark.parametrize("writing", TRANSPORTS, indirect=True)
async def test_an_error_reply_for_longer_than_give_up_costs_lines_not_the_task(
    writing: Callable[..., Writing], admin: aioredis.Redis, private_redis: RedisProcess,
) -> None:
    """The 60 s policy (here 3 s) now covers error replies too: the lines are dropped and
    counted, and the count is written as soon as Redis takes writes again."""
    fault = ErrorReply("oom", admin, spare_port=0)
    writer = writing().writer("t", give_up_s=3.0)
    await fault.inject()
    try:
        writer.mark_start(0)
        writer.put_lines("stdout", [f"n {i}" for i in range(10)])
        await wait_until(lambda: writer.lines_dropped == 11, timeout_s=30,
                         message="the lines given up")  # start marker included
    finally:
        await fault.clear()
    await asyncio.wait_for(writer.close(0), 60)
    entries = await _entries(admin, "t")
    first_line = entries[0][1][b"line"]
    assert first_line == b"[aqsh] 11 log lines lost: Redis refused the writes (OOM)"
    assert entries[-1][1] == {b"eof": b"1", b"exit_code": b"0"}


# --------------------------------------------------------------------------- network faults
@pytest.mark.parametrize("writing", TRANSPORTS, indirect=True)
async def test_killed_connections_mid_run_lose_and_repeat_nothing(
    writing: Callable[..., Writing], admin: aioredis.Redis, tmp_path: Path,
) -> None:
    writer = writing().writer("t", max_buffered=500, batch_lines=100)
    writer.mark_start(0)
    run = asyncio.create_task(run_process(
        [_count_script(tmp_path, 20_000)], env={"PATH": os.environ["PATH"]},
        cwd=str(tmp_path), sink=writer))
    killed = 0
    while not run.done():  # pacing the fault, not waiting for an outcome
        killed += await admin.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.01)
    outcome = await run
    await asyncio.wait_for(writer.close(outcome.exit_code), 60)
    assert killed > 0
    _assert_exactly_once(await _entries(admin, "t"), [f"n {i}" for i in range(20_000)])


@pytest.mark.parametrize("writing", TRANSPORTS, indirect=True)
@pytest.mark.parametrize("fault", ["lost", "cut"])
async def test_a_batch_whose_reply_was_lost_is_not_appended_twice(
    writing: Callable[..., Writing], admin: aioredis.Redis, proxy: FaultProxy, fault: str,
) -> None:
    """The request reaches Redis and is applied; the connection drops before the reply (or in
    the middle of it). The retry must find its batch already there."""
    await admin.script_load(script_source("append_log_lines"))
    writer = writing(proxy.url).writer("t")
    (proxy.lose_reply_to if fault == "lost" else proxy.cut_reply_to)(b"EVALSHA")
    writer.mark_start(0)
    writer.put_lines("stdout", ["a", "b", "c"])
    await asyncio.wait_for(writer.close(0), 60)
    assert (proxy.replies_lost if fault == "lost" else proxy.replies_cut) == 1
    assert writer.repeats_skipped == 1
    _assert_exactly_once(await _entries(admin, "t"), ["a", "b", "c"])


@pytest.mark.parametrize("writing", TRANSPORTS, indirect=True)
async def test_a_black_holed_redis_costs_lines_after_give_up_not_a_hung_task(
    writing: Callable[..., Writing], admin: aioredis.Redis, proxy: FaultProxy,
) -> None:
    writer = writing(proxy.url, socket_timeout=0.5).writer("t", give_up_s=1.0)
    proxy.black_hole = True
    writer.mark_start(0)
    writer.put_lines("stdout", ["a", "b"])
    await wait_until(lambda: writer.lines_dropped == 3, timeout_s=30, message="given up")
    proxy.black_hole = False
    proxy.drop_all()  # the silent connections: the client opens fresh ones
    await asyncio.wait_for(writer.close(0), 60)
    entries = await _entries(admin, "t")
    lines = [f[b"line"] for _, f in entries if b"line" in f]
    assert lines == [b"[aqsh] 3 log lines lost: Redis unreachable"]


@pytest.mark.parametrize("writing", TRANSPORTS, indirect=True)
async def test_slow_replies_slow_the_writer_and_nothing_else(
    writing: Callable[..., Writing], admin: aioredis.Redis, proxy: FaultProxy,
) -> None:
    """Replies held 0.1 s each (a congested link): the batches queue up behind the one in
    flight and still arrive whole, in order, once."""
    proxy.reply_delay_s = 0.1
    writer = writing(proxy.url).writer("t", batch_lines=10)
    writer.mark_start(0)
    for start in range(0, 100, 10):
        writer.put_lines("stdout", [f"n {i}" for i in range(start, start + 10)])
        await asyncio.sleep(0.05)  # pacing the output, as a script would
    await asyncio.wait_for(writer.close(0), 60)
    assert writer.write_retries == 0
    _assert_exactly_once(await _entries(admin, "t"), [f"n {i}" for i in range(100)])


def _unused_port() -> int:
    from aqsh.redis_process import free_port

    return free_port()


# --------------------------------------------------------------------------- SSE
async def _raw_stream(port: int, path: str, headers: dict[str, str] | None = None
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n".encode())
    await writer.drain()
    return reader, writer


async def _read_until(reader: asyncio.StreamReader, buffer: bytearray,
                      done: Callable[[bytes], bool], timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while not done(bytes(buffer)):
            chunk = await reader.read(65536)
            if not chunk:
                return
            buffer += chunk


@pytest.fixture(params=["hub", "alone"])
async def outage_service(request: pytest.FixtureRequest, make_service: ServiceFactory,
                         private_redis: RedisProcess
                         ) -> AsyncIterator[tuple[Any, str, LogWriter, aioredis.Redis]]:
    """An API (no worker) on the private Redis, a task that stays scheduled (so its followers
    follow until they are stopped) and a writer of its log, driven by the test. ``alone``:
    followers read with XREAD BLOCK of their own, as on a Cluster (no shared hub)."""
    service = await make_service(worker=False, url=private_redis.url)
    if request.param == "alone":
        service.state.log_hub = None
    status, body, _ = await service.request("POST", "/tasks/slow?process_in=1h")
    assert status == 202
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=5,
                                     socket_connect_timeout=1)
    writer = LogWriter(client, body["id"], retention_s=600, linger_s=0)
    yield service, body["id"], writer, client
    with contextlib.suppress(Exception):
        await writer.abort()
    await client.aclose()


async def _write(writer: LogWriter, admin_url: str, task_id: str, lines: list[str]) -> None:
    check = aioredis.Redis.from_url(admin_url)
    try:
        before = await check.xlen(log_key(task_id))
        writer.put_lines("stdout", lines)
        await wait_until(lambda: _xlen_reaches(check, task_id, before + len(lines)),
                         timeout_s=30, message="lines written")
    finally:
        await check.aclose()


async def _xlen_reaches(client: aioredis.Redis, task_id: str, count: int) -> bool:
    return bool(await client.xlen(log_key(task_id)) >= count)


async def test_a_long_outage_ends_the_stream_with_an_error_event_then_resume_has_no_gap(
    outage_service: tuple[Any, str, LogWriter, aioredis.Redis], private_redis: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Used to: ~10 s after Redis went away, ``HTTP/1.1 503`` written inside the open chunked
    stream, then silence. Now: one response, ``event: error`` with a retry hint, the chunked
    stream's proper end; and a reconnect with Last-Event-ID gets exactly what came after."""
    monkeypatch.setattr(sse, "OUTAGE_GRACE_S", 1.0)
    service, task_id, writer, _ = outage_service
    writer.mark_start(0)
    await _write(writer, private_redis.url, task_id, ["one", "two", "three"])
    port = int(service.url.rsplit(":", 1)[1])
    reader, conn = await _raw_stream(port, f"/tasks/{task_id}/logs")
    raw = bytearray()
    try:
        await _read_until(reader, raw, lambda b: b"data: three" in b)
        private_redis.stop_keep_data()
        await _read_until(reader, raw, lambda b: False)  # to the end of the stream
    finally:
        conn.close()
    text = bytes(raw)
    assert text.count(b"HTTP/1.1 ") == 1
    assert text.startswith(b"HTTP/1.1 200 ")
    assert b"event: error\r\ndata: {\"code\":\"redis_unavailable\"" in text
    assert b"retry: 5000" in text
    assert text.endswith(b"0\r\n\r\n")  # the chunked stream ended properly
    last_id = _ids_of(text)[-1]

    private_redis.start()
    await wait_until(lambda: redis_answers(service.state.redis), timeout_s=30, interval_s=0.1,
                     message="Redis back")
    await _write(writer, private_redis.url, task_id, ["four", "five"])
    events = await sse_events(service, task_id, last_event_id=last_id, limit=2)
    assert [(e.get("event"), e["data"]) for e in events] == [(None, "four"), (None, "five")]


async def test_a_short_outage_is_ridden_out_inside_the_open_stream(
    outage_service: tuple[Any, str, LogWriter, aioredis.Redis], private_redis: RedisProcess,
) -> None:
    service, task_id, writer, _ = outage_service
    writer.mark_start(0)
    await _write(writer, private_redis.url, task_id, ["one", "two"])
    port = int(service.url.rsplit(":", 1)[1])
    reader, conn = await _raw_stream(port, f"/tasks/{task_id}/logs")
    raw = bytearray()
    try:
        await _read_until(reader, raw, lambda b: b"data: two" in b)
        with structlog.testing.capture_logs() as logs:
            private_redis.stop_keep_data()
            await wait_until(lambda: _noticed(logs), timeout_s=30,
                             message="the follower (or its hub) noticing the outage")
        private_redis.start()
        await wait_until(lambda: redis_answers(service.state.redis), timeout_s=30,
                         interval_s=0.1, message="Redis back")
        await _write(writer, private_redis.url, task_id, ["three", "four"])
        await _read_until(reader, raw, lambda b: b"data: four" in b)
    finally:
        conn.close()
    text = bytes(raw)
    assert text.count(b"HTTP/1.1 ") == 1
    assert b"event: error" not in text
    assert [line for line in text.split(b"\r\n") if line.startswith(b"data: ")] == [
        b"data: one", b"data: two", b"data: three", b"data: four"]


def _noticed(logs: list[dict[str, Any]]) -> bool:
    return any(e["event"] in ("sse.redis_failed", "loop.failed") for e in logs)


def _ids_of(text: bytes) -> list[str]:
    return [line[4:].decode() for line in text.split(b"\r\n") if line.startswith(b"id: ")]


async def test_a_follower_through_a_proxy_that_drops_everything_misses_nothing(
    make_service: ServiceFactory, private_redis: RedisProcess, proxy: FaultProxy,
    admin: aioredis.Redis,
) -> None:
    """Every connection of the API (its lookups, the hub's blocking read) dropped again and
    again while a log is written: the follower gets every line once, in order."""
    service = await make_service(worker=False, url=proxy.url)
    _, body, _ = await service.request("POST", "/tasks/slow?process_in=1h")
    writer = LogWriter(admin, body["id"], retention_s=600, linger_s=0)
    writer.mark_start(0)
    follower = asyncio.create_task(sse_events(service, body["id"], limit=2000))
    for start in range(0, 2000, 100):
        await _write(writer, private_redis.url, body["id"],
                     [f"n {i}" for i in range(start, start + 100)])
        proxy.drop_all()
    events = await asyncio.wait_for(follower, 60)
    assert [e["data"] for e in events] == [f"n {i}" for i in range(2000)]
    assert proxy.accepted > 1
    await writer.close(0)

