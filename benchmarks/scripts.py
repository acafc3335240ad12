"""Shell scripts through the queue vs raw process spawning, same run; and a 1,000,000-line log.

- ``--runs`` (2,000) runs of ``#!/bin/sh\\necho hi`` at concurrency 1, 10, 50 through the queue
  (Client → Redis → Server → ShellRunner with its log stream and result) against the raw rate
  of ``asyncio.create_subprocess_exec`` of the same script at the same concurrency; ``--rounds``
  (5) of each, raw and queue interleaved.
- The raw rate with Python 3.11's default (thread-per-child) watcher vs the pidfd watcher the
  worker installs, to show why it is chosen (5 of each; not interleaved: the watcher is
  process-wide and installed once).
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


async def queue_rate(redis: aioredis.Redis, config: TasksConfig, work: str,
                     concurrency: int, runs: int) -> float:
    await redis.flushall()
    client = Client(redis, wake_workers=False)
    batch = [EnqueueRequest(type="hi", payload=b"{}", queue="bench") for _ in range(500)]
    for start in range(0, runs, 500):
        await client.enqueue_many(batch[: min(500, runs - start)])
    # Wired as `aqsh serve` wires its worker (aqsh/service.py: _worker).
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
                    rate = (await raw_spawn_rate(str(hi), concurrency, runs) if side == "raw"
                            else await queue_rate(redis, config, str(tmp / "work"),
                                                  concurrency, runs))
                    samples.add(f"{side}_c{concurrency}_per_s", rate)
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
    from aqsh.logging import configure_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=2000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--pin-redis", type=int, default=None, metavar="CORE",
                        help="pin Redis to this core (taskset)")
    configure_logging("json", "info")  # as `aqsh serve` runs its worker
    asyncio.run(main(parser.parse_args()))
