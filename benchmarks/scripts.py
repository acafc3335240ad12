"""Shell scripts through the queue vs raw process spawning, same run; and a 1,000,000-line log.

- 5,000 runs of ``#!/bin/sh\\necho hi`` at concurrency 1, 10, 50 through the queue (Client →
  Redis → Server → ShellRunner with its log stream and result) against the raw rate of
  ``asyncio.create_subprocess_exec`` of the same script at the same concurrency.
- The raw rate with Python 3.11's default (thread-per-child) watcher vs the pidfd watcher the
  worker installs, to show why it is chosen.
- A script printing 1,000,000 lines: every line in the stream, in order; lines/s.

Usage: python benchmarks/scripts.py [runs]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import _common
import redis.asyncio as aioredis

from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.redis_process import RedisProcess
from aqsh.runner.handler import RunnerSettings, ShellRunner
from aqsh.runner.logs import log_key
from aqsh.runner.process import install_child_watcher
from aqsh.runner.spec import TasksConfig, TaskSpec

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
LINES = 1_000_000


async def raw_spawn_rate(script: str, concurrency: int, runs: int) -> float:
    remaining = runs

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            proc = await asyncio.create_subprocess_exec(
                script, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
            await proc.communicate()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return runs / (time.perf_counter() - started)


async def queue_rate(redis: aioredis.Redis, config: TasksConfig, work: str,
                     concurrency: int, runs: int) -> float:
    await redis.flushall()
    client = Client(redis, wake_workers=False)
    batch = [EnqueueRequest(type="hi", payload=b"{}", queue="bench") for _ in range(500)]
    for start in range(0, runs, 500):
        await client.enqueue_many(batch[: min(500, runs - start)])
    # Wired as `aqsh serve` wires its worker (aqsh/__main__.py: _worker).
    runner = ShellRunner(lambda: config, redis, RunnerSettings(work_root=work), fast_lane=True)
    broker = RedisBroker(redis, fast_lane=True)
    server = Server(broker, runner, concurrency=concurrency, queues={"bench": 1})
    started = time.perf_counter()
    await server.start()
    while int(await redis.get("asynq:{bench}:processed") or 0) < runs:  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # the counter lives in Redis: nothing to await but a poll
    elapsed = time.perf_counter() - started
    await server.stop()
    await runner.aclose()
    await broker.close_fast_lane()
    return runs / elapsed


async def million_lines(redis: aioredis.Redis, script: str, work: str) -> tuple[float, bool]:
    from aqsh.engine.task import Task

    class Ctx:
        task_id = "million"
        queue = "bench"
        retry_count = 0
        max_retry = 0
        deadline_s = 1e12
        cancel_reason = None

        class result_writer:
            @staticmethod
            async def write(data: bytes) -> int:
                return len(data)

    spec = TaskSpec(name="million", script=script, timeout_s=600)
    config = TasksConfig(path="bench", tasks={"million": spec})
    runner = ShellRunner(lambda: config, redis,
                         RunnerSettings(work_root=work, max_stream_len=LINES + 10), fast_lane=True)
    started = time.perf_counter()
    await runner(Task(id="million", type="million", payload=b"{}", queue="bench"), Ctx())  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    await runner.aclose()
    expected = 1
    in_order = True
    cursor = "-"
    while True:
        entries = await redis.xrange(log_key("million"), min=cursor, count=50000)
        for _, fields in entries:
            if b"line" in fields:
                in_order = in_order and int(fields[b"line"]) == expected
                expected += 1
        if len(entries) < 50000:
            break
        cursor = "(" + entries[-1][0].decode()
    return LINES / elapsed, in_order and expected == LINES + 1


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="aqsh-bench-"))
    hi = tmp / "hi.sh"
    hi.write_text("#!/bin/sh\necho hi\n")
    hi.chmod(0o755)
    many = tmp / "million.sh"
    many.write_text(f"#!/bin/sh\nseq 1 {LINES}\n")
    many.chmod(0o755)
    config = TasksConfig(path="bench", tasks={"hi": TaskSpec(name="hi", script=str(hi),
                                                            max_retry=0)})
    figures: dict[str, float] = {}
    figures["raw_threaded_watcher_c10_per_s"] = await raw_spawn_rate(str(hi), 10, RUNS // 5)
    watcher = install_child_watcher()
    figures["raw_pidfd_watcher_c10_per_s"] = await raw_spawn_rate(str(hi), 10, RUNS // 5)
    figures["pidfd_vs_threaded_ratio"] = (figures["raw_pidfd_watcher_c10_per_s"]
                                          / figures["raw_threaded_watcher_c10_per_s"])
    with RedisProcess() as server:
        redis = aioredis.Redis.from_url(server.url, max_connections=128)
        for concurrency in (1, 10, 50):
            raw = await raw_spawn_rate(str(hi), concurrency, RUNS)
            queued = await queue_rate(redis, config, str(tmp / "work"), concurrency, RUNS)
            figures[f"raw_c{concurrency}_per_s"] = raw
            figures[f"queue_c{concurrency}_per_s"] = queued
            figures[f"queue_vs_raw_c{concurrency}_ratio"] = queued / raw
        await redis.flushall()
        rate, ordered = await million_lines(redis, str(many), str(tmp / "work"))
        figures["million_lines_per_s"] = rate
        figures["million_lines_all_in_order"] = float(ordered)
        await redis.aclose()
    _common.report("scripts", {"runs": RUNS, "child_watcher": watcher,
                               **{k: round(v, 3) for k, v in figures.items()}})


if __name__ == "__main__":
    from aqsh.logging import configure_logging

    configure_logging("json", "warning")  # per-task info logs would be measured too
    asyncio.run(main())
