"""The shell runner with real processes and a real Redis: environment isolation, logs, results,
timeouts and cancellation that reach grandchildren, and retry-then-archive through the engine."""

from __future__ import annotations

import asyncio
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from aqsh.clock import ManualClock
from aqsh.engine import keys, wire
from aqsh.engine.client import Client
from aqsh.engine.keys import log_key
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import CancelReason, SkipRetry, Task
from aqsh.runner.handler import RunnerSettings, ScriptFailed, ShellRunner, shell_retry_delay
from aqsh.runner.inputs import InputSpec
from aqsh.runner.result import decode_result
from aqsh.runner.spec import TasksConfig, TaskSpec
from tests.support import wait_until


@dataclass
class Writer:
    written: list[bytes] = field(default_factory=list)

    async def write(self, data: bytes) -> int:
        self.written.append(data)
        return len(data)


@dataclass
class Ctx:
    """The TaskContext the processor would pass; a plain value holder."""

    task_id: str
    queue: str = "default"
    retry_count: int = 0
    max_retry: int = 3
    deadline_s: float = 1e12
    result_writer: Writer = field(default_factory=Writer)
    cancel_reason: CancelReason | None = None


def make_script(tmp_path: Path, body: str, name: str = "s.sh") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def runner_for(redis: aioredis.Redis, tmp_path: Path, *specs: TaskSpec) -> ShellRunner:
    config = TasksConfig(path="test", tasks={s.name: s for s in specs})
    return ShellRunner(lambda: config, redis,
                       RunnerSettings(work_root=str(tmp_path / "work"), kill_grace_s=1.0))


def task(name: str, payload: dict[str, object] | None = None, task_id: str = "t1") -> Task:
    return Task(id=task_id, type=name, payload=msgspec.json.encode(payload or {}),
                queue="default")


async def stream(redis: aioredis.Redis, task_id: str = "t1") -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await redis.xrange(log_key(task_id))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_environment_is_explicit_and_secrets_do_not_leak(
    redis: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AQSH_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("API_TOKEN", "tok-123")
    spec = TaskSpec(name="env", script=make_script(tmp_path, "env | sort\n"),
                    inputs=(InputSpec(name="who", env="WHO"),))
    runner = runner_for(redis, tmp_path, spec)
    raw = await runner(task("env", {"who": "$(id) `x` ; rm -rf /"}), Ctx("t1"))
    lines = [f[b"line"].decode() for f in await stream(redis) if b"line" in f]
    env = dict(line.split("=", 1) for line in lines)
    assert "hunter2" not in "\n".join(lines)
    assert "API_TOKEN" not in env
    assert env["WHO"] == "$(id) `x` ; rm -rf /"  # a value, never shell text
    assert env["AQSH_TASK_ID"] == "t1"
    assert env["AQSH_TASK_NAME"] == "env"
    assert env["AQSH_QUEUE"] == "default"
    assert env["AQSH_RETRY"] == "0"
    assert env["AQSH_RESULT_FILE"].startswith(env["AQSH_WORK_DIR"])
    assert env["PATH"] == os.environ["PATH"]
    allowed = {"PATH", "LANG", "HOME", "TZ", "WHO", "PWD", "SHLVL", "_"} | {
        k for k in env if k.startswith("AQSH_") and k not in ("AQSH_REDIS_PASSWORD",)}
    assert set(env) <= allowed
    assert decode_result(raw).exit_code == 0
    assert not os.path.exists(env["AQSH_WORK_DIR"])  # removed afterwards


async def test_logs_keep_order_per_stream_and_end_with_eof(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    body = """\
    i=0
    while [ $i -lt 3000 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done
    printf 'no newline at end'
    """
    spec = TaskSpec(name="spam", script=make_script(tmp_path, body), log_retention_s=120)
    await runner_for(redis, tmp_path, spec)(task("spam"), Ctx("t1"))
    entries = await stream(redis)
    out = [e[b"line"] for e in entries if e.get(b"stream") == b"stdout"]
    err = [e[b"line"] for e in entries if e.get(b"stream") == b"stderr"]
    assert out == [f"out {i}".encode() for i in range(3000)] + [b"no newline at end"]
    assert err == [f"err {i}".encode() for i in range(3000)]
    assert entries[-1] == {b"eof": b"1", b"exit_code": b"0"}
    assert 100 < await redis.ttl(log_key("t1")) <= 120


async def test_long_lines_are_truncated_with_a_marker_and_bad_utf8_replaced(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    body = """\
    head -c 40000 /dev/zero | tr '\\0' 'a'; echo
    printf 'caf\\351\\n'
    echo after
    """
    spec = TaskSpec(name="long", script=make_script(tmp_path, body))
    runner = runner_for(redis, tmp_path, spec)
    await runner(task("long"), Ctx("t1"))
    lines = [e[b"line"].decode() for e in await stream(redis) if b"line" in e]
    assert lines[0].startswith("a" * 16384)
    assert "line truncated" in lines[0]
    assert len(lines[0]) < 16500
    assert lines[1:] == ["caf\ufffd", "after"]


@pytest.mark.parametrize(("body", "expected"), [
    ("true\n", {"exit_code": 0}),
    (": > \"$AQSH_RESULT_FILE\"\n", {"exit_code": 0, "data": ""}),
    ("printf '{\"ok\": 1}' > \"$AQSH_RESULT_FILE\"\n", {"exit_code": 0, "data": '{"ok": 1}'}),
    ("printf 'bad\\377' > \"$AQSH_RESULT_FILE\"\n", {"exit_code": 0, "data": "bad\ufffd"}),
])
async def test_result_file_semantics(
    redis: aioredis.Redis, tmp_path: Path, body: str, expected: dict[str, object]
) -> None:
    spec = TaskSpec(name="r", script=make_script(tmp_path, body))
    raw = await runner_for(redis, tmp_path, spec)(task("r"), Ctx("t1"))
    assert msgspec.json.decode(raw) == expected


async def test_oversized_result_and_nonzero_exit_fail_with_stored_result(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    big = TaskSpec(name="big", script=make_script(
        tmp_path, "head -c 1048577 /dev/zero > \"$AQSH_RESULT_FILE\"\n", "big.sh"))
    bad = TaskSpec(name="bad", script=make_script(
        tmp_path, "echo partial > \"$AQSH_RESULT_FILE\"; exit 3\n", "bad.sh"))
    runner = runner_for(redis, tmp_path, big, bad)
    ctx = Ctx("t1")
    with pytest.raises(ScriptFailed, match="over the 1048576 byte limit"):
        await runner(task("big"), ctx)
    stored = msgspec.json.decode(ctx.result_writer.written[-1])
    assert stored["exit_code"] == 0
    assert "data" not in stored
    ctx2 = Ctx("t2")
    with pytest.raises(ScriptFailed, match="exit code 3"):
        await runner(task("bad", task_id="t2"), ctx2)
    assert msgspec.json.decode(ctx2.result_writer.written[-1]) == {
        "exit_code": 3, "data": "partial\n", "error": "exit code 3"}


GRANDCHILD = """\
sleep 300 &
echo $! > "{pidfile}"
trap '' TERM
echo started
sleep 300
"""


async def test_timeout_kills_the_group_including_grandchildren(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    spec = TaskSpec(name="slow", script=make_script(tmp_path, GRANDCHILD.format(pidfile=pidfile)),
                    timeout_s=0.5)
    ctx = Ctx("t1")
    with pytest.raises(ScriptFailed, match=r"timed out after 0\.5s"):
        await runner_for(redis, tmp_path, spec)(task("slow"), ctx)
    child = int(pidfile.read_text())
    await wait_until(lambda: not alive(child), message="grandchild gone")
    # The script ignores SIGTERM: what ended it was the SIGKILL after the grace period, and
    # that is what is reported (not the SIGTERM that was sent first).
    assert msgspec.json.decode(ctx.result_writer.written[-1]) == {
        "exit_code": -9, "error": "timed out after 0.5s; process group stopped: killed by signal "
                                  "SIGKILL after the grace period"}
    assert (await stream(redis))[-1][b"exit_code"] == b"-9"
    assert (await stream(redis))[-1][b"eof"] == b"1"


async def test_cancel_kills_grandchildren_and_ends_the_task(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    spec = TaskSpec(name="slow", script=make_script(tmp_path, GRANDCHILD.format(pidfile=pidfile)))
    ctx = Ctx("t1")
    running = asyncio.create_task(runner_for(redis, tmp_path, spec)(task("slow"), ctx))
    await wait_until(pidfile.exists, message="script started")
    await wait_until(lambda: _has_line(redis, b"started"), message="output")
    ctx.cancel_reason = CancelReason.CANCELED
    running.cancel()
    with pytest.raises(SkipRetry, match="canceled"):
        await running
    await wait_until(lambda: not alive(int(pidfile.read_text())), message="grandchild gone")
    # It ignores SIGTERM, so the SIGKILL after the grace period ended it.
    assert msgspec.json.decode(ctx.result_writer.written[-1]) == {
        "exit_code": -9, "error": "canceled"}


async def _has_line(redis: aioredis.Redis, line: bytes) -> bool:
    return any(e.get(b"line") == line for e in await stream(redis))


async def test_children_left_behind_after_exit_are_cleaned_up(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    body = f'sleep 300 &\necho $! > "{pidfile}"\nexit 0\n'
    spec = TaskSpec(name="fork", script=make_script(tmp_path, body))
    await runner_for(redis, tmp_path, spec)(task("fork"), Ctx("t1"))
    await wait_until(lambda: not alive(int(pidfile.read_text())), message="orphan killed")


async def test_invalid_payload_never_runs(redis: aioredis.Redis, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    spec = TaskSpec(name="guarded", script=make_script(tmp_path, f'touch "{marker}"\n'),
                    inputs=(InputSpec(name="n", env="N", required=True),))
    ctx = Ctx("t1")
    with pytest.raises(SkipRetry, match="invalid payload"):
        await runner_for(redis, tmp_path, spec)(task("guarded", {"n": 1, "x": 2}), ctx)
    assert not marker.exists()
    assert "unknown_field" in decode_result(ctx.result_writer.written[-1]).error  # type: ignore[operator]


async def test_failing_script_retries_with_fixed_delay_then_archives(
    redis: aioredis.Redis, tmp_path: Path, clock: ManualClock
) -> None:
    spec = TaskSpec(name="flaky", script=make_script(tmp_path, "echo try $AQSH_RETRY; exit 4\n"),
                    max_retry=1, retry_delay_s=7)
    config = TasksConfig(path="t", tasks={"flaky": spec})
    runner = ShellRunner(lambda: config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    server = Server(RedisBroker(redis), runner, clock=clock, queues={"default": 1},
                    retry_delay=shell_retry_delay(lambda: config), forward_interval_s=3600,
                    recover_interval_s=3600, heartbeat_interval_s=3600)
    await server.start()
    try:
        info = await Client(redis, clock=clock).enqueue("flaky", b"{}", max_retry=1)
        q = keys.queue_keys("default")
        await wait_until(lambda: redis.zscore(q.retry, info.id), message="retry")
        assert await redis.zscore(q.retry, info.id) == int(clock.now_s()) + 7
        clock.advance(7)
        await server.forwarder.run_once()
        await wait_until(lambda: redis.zscore(q.archived, info.id), message="archived")
        h = await redis.hgetall(q.task(info.id))
        assert wire.decode_task(h[b"msg"]).error_msg == "exit code 4"
        assert decode_result(h[b"result"]).exit_code == 4
        lines = [e[b"line"] for e in await stream(redis, info.id) if b"line" in e]
        assert lines == [b"try 0", b"try 1"]  # both attempts append to one stream
    finally:
        await server.stop(shutdown_timeout_s=0)
