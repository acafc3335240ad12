"""The process layer and the log writer on their own, with real processes and a real Redis:
back-pressure that blocks the script, pipes that never leak, and a short script's whole log in
one Redis call."""

from __future__ import annotations

import asyncio
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from aqsh.engine.keys import log_key
from aqsh.runner.handler import RunnerSettings, ShellRunner
from aqsh.runner.logs import LogWriter
from aqsh.runner.process import run_process
from aqsh.runner.spec import TasksConfig, TaskSpec
from tests.runner.test_runner import Ctx, task
from tests.support import wait_until


def script(tmp_path: Path, body: str, name: str = "s.sh") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@dataclass
class GatedSink:
    """A sink that reports itself full until the test opens the gate."""

    limit: int
    lines: list[tuple[str, str]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def put_lines(self, stream: str, lines: list[str]) -> None:
        self.lines.extend((stream, line) for line in lines)

    @property
    def full(self) -> bool:
        return not self.gate.is_set() and len(self.lines) >= self.limit

    async def wait_for_room(self) -> None:
        await self.gate.wait()


def _blocked_on_pipe(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as handle:
            return handle.read().strip().endswith("pipe_write")  # anon_pipe_write on 6.x
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/wchan"), reason="needs /proc/<pid>/wchan")
async def test_a_full_sink_stops_reading_and_the_script_blocks_until_there_is_room(
    tmp_path: Path,
) -> None:
    done = tmp_path / "done"
    pidfile = tmp_path / "pid"
    body = f"""\
    echo $$ > "{pidfile}"
    i=0
    while [ $i -lt 40000 ]; do echo "line $i"; i=$((i+1)); done
    touch "{done}"
    """
    sink = GatedSink(limit=10)
    running = asyncio.create_task(run_process(
        [script(tmp_path, body)], env={"PATH": os.environ["PATH"]}, cwd=str(tmp_path),
        sink=sink))
    await wait_until(pidfile.exists, message="script started")
    pid = int(pidfile.read_text())
    await wait_until(lambda: _blocked_on_pipe(pid), message="script blocked writing its pipe")
    assert not done.exists()
    taken = len(sink.lines)
    assert taken < 40000
    sink.gate.set()
    outcome = await asyncio.wait_for(running, 30)
    assert outcome.exit_code == 0
    assert done.exists()
    assert [line for _, line in sink.lines] == [f"line {i}" for i in range(40000)]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_a_script_that_cannot_be_executed_raises_and_leaks_no_pipe(
    tmp_path: Path,
) -> None:
    path = tmp_path / "not-executable.sh"
    path.write_text("#!/bin/sh\necho never\n")
    before = _open_fds()
    sink = GatedSink(limit=10**9)
    with pytest.raises(PermissionError):
        await run_process([str(path)], env={}, cwd=str(tmp_path), sink=sink)
    assert _open_fds() == before
    assert sink.lines == []


async def test_output_after_exit_from_a_grandchild_is_read_until_the_group_is_killed(
    tmp_path: Path,
) -> None:
    """The script exits while a child still writes to the inherited pipe; the group kill ends
    the child and the readers see end of file instead of waiting for the drain timeout."""
    marker = tmp_path / "child-spoke"
    body = f"""\
    (echo child; touch "{marker}"; sleep 300) &
    while [ ! -e "{marker}" ]; do sleep 0.01; done
    echo parent
    """
    sink = GatedSink(limit=10**9)
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await run_process([script(tmp_path, body)], env={"PATH": os.environ["PATH"]},
                                cwd=str(tmp_path), sink=sink)
    assert outcome.exit_code == 0
    assert loop.time() - started < 4.0  # well under the 5 s drain timeout
    assert sink.lines == [("stdout", "child"), ("stdout", "parent")]


async def test_a_signal_ends_the_script_with_a_negative_code(tmp_path: Path) -> None:
    sink = GatedSink(limit=10**9)
    outcome = await run_process([script(tmp_path, "kill -KILL $$\n")],
                                env={"PATH": os.environ["PATH"]}, cwd=str(tmp_path), sink=sink)
    assert outcome.exit_code == -9
    assert outcome.signal_name == "SIGKILL"


async def _evalsha_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_short_scripts_whole_log_is_one_redis_call(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A linger far longer than the script's run: however busy the machine, the script exits
    (and close() sends everything) before the first batch would have gone on its own."""
    spec = TaskSpec(name="hi", script=script(tmp_path, "echo hi\necho oops >&2\n"))
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"hi": spec}), redis,
                         RunnerSettings(work_root=str(tmp_path / "work"), log_linger_s=30.0))
    await runner(task("hi"), Ctx("t1"))  # loads the script into Redis
    await redis.config_resetstat()
    await runner(task("hi", task_id="t2"), Ctx("t2"))
    assert await _evalsha_calls(redis) == 1
    entries = [fields for _, fields in await redis.xrange(log_key("t2"))]
    assert entries[0] == {b"start": b"1", b"retry": b"0"}
    assert sorted(e[b"line"] for e in entries[1:-1]) == [b"hi", b"oops"]
    assert entries[-1] == {b"eof": b"1", b"exit_code": b"0"}


async def test_a_silent_running_script_has_its_start_marker_in_the_stream(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """The API dates an attempt's start from this marker: it must not wait for output."""
    release = tmp_path / "release"
    body = f'while [ ! -e "{release}" ]; do sleep 0.01; done\n'
    spec = TaskSpec(name="quiet", script=script(tmp_path, body))
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"quiet": spec}), redis,
                         RunnerSettings(work_root=str(tmp_path / "work")))
    running = asyncio.create_task(runner(task("quiet"), Ctx("t1")))
    try:
        first = await wait_until(lambda: redis.xrange(log_key("t1")), message="start marker")
        assert first[0][1] == {b"start": b"1", b"retry": b"0"}
        assert not running.done()
    finally:
        release.touch()
        await running
    entries = [fields for _, fields in await redis.xrange(log_key("t1"))]
    assert entries == [{b"start": b"1", b"retry": b"0"}, {b"eof": b"1", b"exit_code": b"0"}]


async def test_log_writer_keeps_every_line_in_order_through_a_small_buffer(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Back-pressure through the real writer: a buffer of 50 lines and batches of 7 must still
    deliver 20,000 lines in order."""
    body = 'i=0\nwhile [ $i -lt 20000 ]; do echo "n $i"; i=$((i+1)); done\n'
    writer = LogWriter(redis, "bp", retention_s=60, max_buffered=50, batch_lines=7)
    writer.mark_start(0)
    outcome = await run_process([script(tmp_path, body)], env={"PATH": os.environ["PATH"]},
                                cwd=str(tmp_path), sink=writer)
    await writer.close(outcome.exit_code)
    lines = [f[b"line"] for _, f in await redis.xrange(log_key("bp")) if b"line" in f]
    assert lines == [f"n {i}".encode() for i in range(20000)]
    assert writer.lines_written == 20000


async def test_logs_over_the_fast_lane_are_complete_and_survive_a_dropped_connection(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    body = 'i=0\nwhile [ $i -lt 3000 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done\n'
    spec = TaskSpec(name="spam", script=script(tmp_path, body))
    runner = ShellRunner(lambda: TasksConfig(path="t", tasks={"spam": spec}), redis,
                         RunnerSettings(work_root=str(tmp_path / "work")), fast_lane=True)
    try:
        for task_id in ("t1", "t2"):
            await runner(task("spam", task_id=task_id), Ctx(task_id))
            entries = [f for _, f in await redis.xrange(log_key(task_id))]
            out = [e[b"line"] for e in entries if e.get(b"stream") == b"stdout"]
            err = [e[b"line"] for e in entries if e.get(b"stream") == b"stderr"]
            assert out == [f"out {i}".encode() for i in range(3000)]
            assert err == [f"err {i}".encode() for i in range(3000)]
            assert entries[-1] == {b"eof": b"1", b"exit_code": b"0"}
            # Drop every other connection (the lane's among them) before the next run.
            await redis.client_kill_filter(_type="normal", skipme=True)
    finally:
        await runner.aclose()
    assert runner._lane is not None
    assert runner._lane._protocol is None


async def test_a_running_scripts_output_is_read_before_it_exits(tmp_path: Path) -> None:
    """The pipes are watched only once a script has run a few ms (a short one is read after its
    exit): a script that waits must still have its first line read while it waits."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    body = f"""\
    echo first
    read answer < "{fifo}"
    echo "second $answer"
    """
    sink = GatedSink(limit=10**9)
    run = asyncio.create_task(run_process([script(tmp_path, body)],
                                          env={"PATH": os.environ["PATH"]},
                                          cwd=str(tmp_path), sink=sink))
    await wait_until(lambda: sink.lines == [("stdout", "first")], message="first line, live")
    assert not run.done()
    writer = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)  # the script opened it
    os.write(writer, b"go\n")
    os.close(writer)
    outcome = await run
    assert outcome.exit_code == 0
    assert sink.lines == [("stdout", "first"), ("stdout", "second go")]


async def test_a_script_that_fills_its_pipe_at_once_loses_nothing(tmp_path: Path) -> None:
    """More than a pipe holds, written before the pipes are watched: the script waits for the
    readers to start and every line arrives, in order, with what it wrote to stderr."""
    body = """\
    seq 1 50000
    echo done >&2
    """
    sink = GatedSink(limit=10**9)
    outcome = await run_process([script(tmp_path, body)], env={"PATH": os.environ["PATH"]},
                                cwd=str(tmp_path), sink=sink)
    assert outcome.exit_code == 0
    assert [line for stream, line in sink.lines if stream == "stdout"] == [
        str(n) for n in range(1, 50001)]
    assert [line for stream, line in sink.lines if stream == "stderr"] == ["done"]


def test_a_process_that_ran_scripts_ends_its_keeper_at_exit(tmp_path: Path) -> None:
    """The keeper is a child of the worker: a normal exit must end and reap it, not leave its
    Popen to the garbage collector (Python then warns that it "is still running")."""
    import subprocess
    import sys

    program = textwrap.dedent("""
        import asyncio
        from aqsh.runner.process import group_keeper
        group_keeper().add(2**22 + 1)  # starts the keeper, as the first script does
        print("keeper", group_keeper().pid, flush=True)
    """)
    done = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", program],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr
    keeper_pid = int(done.stdout.split("keeper ")[-1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(keeper_pid, 0)  # reaped by its parent before it exited
