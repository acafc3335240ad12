"""Shell scripts through the queue vs raw process spawning, same run; and a 1,000,000-line log.

- ``--runs`` (2,000) runs of ``#!/bin/sh\\necho hi`` at concurrency 1, 10, 50 through the queue
  (Client → Redis → Server → ShellRunner with its log stream and result) against the raw rate
  of ``asyncio.create_subprocess_exec`` of the same script at the same concurrency; ``--rounds``
  (5) of each, raw and queue interleaved.
- The raw rate with Python 3.11's default (thread-per-child) watcher vs the pidfd watcher the
  worker installs, to show why it is chosen (5 of each; not interleaved: the watcher is
  process-wide and installed once).
- What each run through the queue costs the worker: its CPU per run, and its Redis script calls
  (round trips) and commands per run, from Redis's ``INFO commandstats`` around each round.
- A script printing 1,000,000 lines: every line in the stream, in order; lines/s (once).

Usage: python benchmarks/scripts.py [--runs 2000] [--rounds 5] [--pin-redis CORE]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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


class QueueRound(NamedTuple):
    """One timed round through the queue: the rate, and what each run cost the worker."""

    per_s: float
    #: CPU of this process (the worker; the enqueues happen before the clock starts) per run.
    cpu_us_per_run: float
    #: Script calls (EVALSHA/EVAL) per run: the worker's Redis round trips, since all its
    #: per-run work is scripts (at c1 nothing shares a call; above, dequeues and acks do).
    script_calls_per_run: float
    #: Every command Redis executed per run, those inside scripts included.
    redis_commands_per_run: float


async def _command_calls(redis: aioredis.Redis) -> tuple[int, int]:
    """(script calls, all commands) so far; the benchmark's own polls are a few per second."""
    stats = await redis.info("commandstats")
    scripts = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    return scripts, sum(v["calls"] for v in stats.values())


async def queue_rate(redis: aioredis.Redis, config: TasksConfig, work: str,
                     concurrency: int, runs: int) -> QueueRound:
    await redis.flushall()
    client = Client(redis, wake_workers=False)
    batch = [EnqueueRequest(type="hi", payload=b"{}", queue="bench") for _ in range(500)]
    for start in range(0, runs, 500):
        await client.enqueue_many(batch[: min(500, runs - start)])
    # Wired as `aqsh serve` wires its worker (aqsh/service.py: _worker).
    runner = ShellRunner(lambda: config, redis, RunnerSettings(work_root=work), fast_lane=True)
    broker = RedisBroker(redis, fast_lane=True)
    server = Server(broker, runner, concurrency=concurrency, queues={"bench": 1})
    calls_before = await _command_calls(redis)
    cpu_before = time.process_time()
    started = time.perf_counter()
    await server.start()
    while int(await redis.get("asynq:{bench}:processed") or 0) < runs:  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # the counter lives in Redis: nothing to await but a poll
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_before
    calls_after = await _command_calls(redis)
    await server.stop()
    await runner.aclose()
    await broker.close_fast_lane()
    return QueueRound(runs / elapsed, cpu_s / runs * 1e6,
                      (calls_after[0] - calls_before[0]) / runs,
                      (calls_after[1] - calls_before[1]) / runs)


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


async def main(args: argparse.Namespace) -> None:
    runs, rounds = args.runs, args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="aqsh-bench-"))
    hi = tmp / "hi.sh"
    hi.write_text("#!/bin/sh\necho hi\n")
    hi.chmod(0o755)
    many = tmp / "million.sh"
    many.write_text(f"#!/bin/sh\nseq 1 {LINES}\n")
    many.chmod(0o755)
    config = TasksConfig(path="bench", tasks={"hi": TaskSpec(name="hi", script=str(hi),
                                                            max_retry=0)})
    samples = _common.Samples()
    figures: dict[str, object] = {"runs": runs, "rounds": rounds}
    for _ in range(rounds):
        samples.add("raw_threaded_watcher_c10_per_s", await raw_spawn_rate(str(hi), 10, runs))
    watcher = install_child_watcher()
    for _ in range(rounds):
        samples.add("raw_pidfd_watcher_c10_per_s", await raw_spawn_rate(str(hi), 10, runs))
    figures["pidfd_vs_threaded_ratio"] = round(samples.ratio(
        "raw_pidfd_watcher_c10_per_s", "raw_threaded_watcher_c10_per_s"), 3)
    with RedisProcess() as server:
        if args.pin_redis is not None:
            _common.pin(_common.redis_pid(server), args.pin_redis)
        redis = aioredis.Redis.from_url(server.url, max_connections=128)
        for round_no in range(rounds):
            print(f"# round {round_no + 1}/{rounds}", file=sys.stderr, flush=True)
            for concurrency in (1, 10, 50):
                sides = ["raw", "queue"] if round_no % 2 == 0 else ["queue", "raw"]
                for side in sides:
                    if side == "raw":
                        samples.add(f"raw_c{concurrency}_per_s",
                                    await raw_spawn_rate(str(hi), concurrency, runs))
                        continue
                    measured = await queue_rate(redis, config, str(tmp / "work"),
                                                concurrency, runs)
                    samples.add(f"queue_c{concurrency}_per_s", measured.per_s)
                    samples.add(f"queue_c{concurrency}_cpu_us_per_run", measured.cpu_us_per_run)
                    samples.add(f"queue_c{concurrency}_script_calls_per_run",
                                measured.script_calls_per_run)
                    samples.add(f"queue_c{concurrency}_redis_commands_per_run",
                                measured.redis_commands_per_run)
        for concurrency in (1, 10, 50):
            figures[f"queue_vs_raw_c{concurrency}_ratio"] = round(samples.ratio(
                f"queue_c{concurrency}_per_s", f"raw_c{concurrency}_per_s"), 3)
        figures.update(_common.placement(_common.redis_pid(server), args.pin_redis))
        await redis.flushall()
        rate, ordered = await million_lines(redis, str(many), str(tmp / "work"))
        figures["million_lines_per_s"] = round(rate)
        figures["million_lines_all_in_order"] = ordered
        await redis.aclose()
    figures["child_watcher"] = watcher
    _common.report("scripts", figures, samples)


if __name__ == "__main__":
    from aqsh.api.app import settle_heap
    from aqsh.logging import configure_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--pin-redis", type=int, default=None, metavar="CORE",
                        help="pin Redis to this core (taskset)")
    configure_logging("json", "info")  # as `aqsh serve` runs its worker
    settle_heap()  # as `aqsh serve` does once its app has started
    asyncio.run(main(parser.parse_args()))
