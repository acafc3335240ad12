"""Worker server benchmark: aqsh vs a Go asynq v0.26 server on the same private Redis, same run.

    .venv/bin/python benchmarks/server.py [--tasks 20000] [--pickups 50] [--idle-window-s 10]

Needs the Go harness (``make interop`` builds .venv/bin/aqsh-interop). Measures:
- no-op throughput draining pre-enqueued tasks at concurrency 10 and 100 (start → last ack);
- CPU seconds per 1,000 tasks for each side during that drain;
- pick-up latency p50/p99 on an idle server (enqueue → handler start);
- idle Redis commands/s and RSS of one idle worker (each in its own process).
Prints one JSON line. Every ``*_ratio`` is aqsh divided by Go: above 1 is a win for throughput,
below 1 is a win for latency, CPU, RSS and idle commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis
import structlog

from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from aqsh.redis_process import RedisProcess

ROOT = Path(__file__).resolve().parent.parent
GO_BIN = ROOT / ".venv" / "bin" / "aqsh-interop"
IDLE_QUEUES = "critical:6,default:3"


async def preload(redis: aioredis.Redis, queue: str, n: int) -> None:
    client = Client(redis, wake_workers=False)
    for start in range(0, n, 1000):
        batch = [EnqueueRequest(type="bench:noop", payload=b"x", queue=queue)
                 for _ in range(min(1000, n - start))]
        await client.enqueue_many(batch)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_go(*args: str) -> dict[str, float]:
    out = subprocess.run([str(GO_BIN), *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def go_throughput(
    redis: aioredis.Redis, url: str, n: int, concurrency: int
) -> dict[str, float]:
    await redis.flushall()
    await preload(redis, "bench-go", n)
    cpu0 = children_cpu_s()
    result = await asyncio.to_thread(run_go, "bench-process", "-redis", url, "-queue", "bench-go",
                                     "-n", str(n), "-concurrency", str(concurrency))
    return {"tasks_per_s": result["tasks_per_s"],
            "cpu_s_per_1000": (children_cpu_s() - cpu0) / n * 1000}


async def aqsh_throughput(redis: aioredis.Redis, n: int, concurrency: int, *,
                          fast_lane: bool) -> dict[str, float]:
    await redis.flushall()
    await preload(redis, "bench-py", n)
    done = 0
    finished = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        nonlocal done
        done += 1
        if done == n:
            finished.set()
        return None

    broker = RedisBroker(redis, fast_lane=fast_lane)
    server = Server(broker, handler, concurrency=concurrency, queues={"bench-py": 1})
    cpu0, start = time.process_time(), time.perf_counter()
    await server.start()
    await asyncio.wait_for(finished.wait(), 600)
    active = keys.queue_keys("bench-py").active
    # Polling Redis state (no event exists for it): the span covers the acks landing, as Go's.
    while await redis.llen(active):  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    elapsed_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    await server.stop()
    await broker.close_fast_lane()
    return {"tasks_per_s": n / elapsed_s, "cpu_s_per_1000": cpu_s / n * 1000}


async def aqsh_pickup(redis: aioredis.Redis, n: int) -> dict[str, float]:
    await redis.flushall()
    latencies_ms: asyncio.Queue[float] = asyncio.Queue()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        latencies_ms.put_nowait((time.time_ns() - int(task.payload)) / 1e6)
        return None

    server = Server(RedisBroker(redis), handler, concurrency=4, queues={"pickup-py": 1})
    await server.start()
    await asyncio.sleep(2)  # let the server go idle, as the Go side does
    client = Client(redis)
    got: list[float] = []
    for i in range(n):
        await client.enqueue("pickup", str(time.time_ns()).encode(), queue="pickup-py")
        got.append(await asyncio.wait_for(latencies_ms.get(), 30))
        await asyncio.sleep((100 + i % 7 * 37) / 1000)  # idle gap, same shape as the Go side
    await server.stop()
    return percentiles(got)


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50_ms": values[len(values) // 2], "p99_ms": values[len(values) * 99 // 100]}


async def idle_profile(redis: aioredis.Redis, argv: list[str], window_s: float) -> dict[str, float]:
    """Redis commands/s caused by one idle worker process, and its RSS, after it settled."""
    await redis.flushall()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(3)  # startup, first heartbeat, backoff reaching its idle interval
        before = int((await redis.info("stats"))["total_commands_processed"])
        await asyncio.sleep(window_s)
        after = int((await redis.info("stats"))["total_commands_processed"])
        rss_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    # The second INFO itself is counted once; nothing else talks to this Redis meanwhile.
    return {"commands_per_s": (after - before - 1) / window_s, "rss_mb": rss_mb}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--pickups", type=int, default=50)
    parser.add_argument("--idle-window-s", type=float, default=10.0)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not GO_BIN.exists():
        sys.exit(f"{GO_BIN} missing: run `make interop` first")
    figures: dict[str, float] = {"tasks": args.tasks, "cpus": os.cpu_count() or 0}
    with RedisProcess() as server:
        redis = aioredis.Redis.from_url(server.url)
        for concurrency in (10, 100):
            go = await go_throughput(redis, server.url, args.tasks, concurrency)
            py = await aqsh_throughput(redis, args.tasks, concurrency, fast_lane=True)
            py_redis_py = await aqsh_throughput(redis, args.tasks, concurrency, fast_lane=False)
            tag = f"c{concurrency}"
            # The broker's script calls over redis-py instead of its fast lane.
            figures[f"aqsh_redis_py_{tag}_tasks_per_s"] = round(py_redis_py["tasks_per_s"])
            figures[f"aqsh_redis_py_{tag}_cpu_s_per_1000"] = round(
                py_redis_py["cpu_s_per_1000"], 3)
            figures[f"lane_vs_redis_py_{tag}_ratio"] = round(
                py["tasks_per_s"] / py_redis_py["tasks_per_s"], 2)
            figures[f"aqsh_{tag}_tasks_per_s"] = round(py["tasks_per_s"])
            figures[f"go_{tag}_tasks_per_s"] = round(go["tasks_per_s"])
            figures[f"throughput_{tag}_ratio"] = round(py["tasks_per_s"] / go["tasks_per_s"], 2)
            figures[f"aqsh_{tag}_cpu_s_per_1000"] = round(py["cpu_s_per_1000"], 3)
            figures[f"go_{tag}_cpu_s_per_1000"] = round(go["cpu_s_per_1000"], 3)
            figures[f"cpu_{tag}_ratio"] = round(py["cpu_s_per_1000"] / go["cpu_s_per_1000"], 2)
        await redis.flushall()
        go_pick = await asyncio.to_thread(run_go, "bench-pickup", "-redis", server.url,
                                          "-n", str(args.pickups))
        py_pick = await aqsh_pickup(redis, args.pickups)
        for name in ("p50_ms", "p99_ms"):
            figures[f"aqsh_pickup_{name}"] = round(py_pick[name], 2)
            figures[f"go_pickup_{name}"] = round(go_pick[name], 2)
            figures[f"pickup_{name.removesuffix('_ms')}_ratio"] = round(
                py_pick[name] / go_pick[name], 3)
        py_idle = await idle_profile(redis, [
            sys.executable, "-m", "aqsh.engine.server_demo", "--redis", server.url,
            "--queues", IDLE_QUEUES, "--concurrency", "10"], args.idle_window_s)
        go_idle = await idle_profile(redis, [
            str(GO_BIN), "serve", "-redis", server.url, "-queues", IDLE_QUEUES,
            "-concurrency", "10", "-duration", f"{int(args.idle_window_s) + 30}s"],
            args.idle_window_s)
        figures["aqsh_idle_commands_per_s"] = round(py_idle["commands_per_s"], 2)
        figures["go_idle_commands_per_s"] = round(go_idle["commands_per_s"], 2)
        figures["idle_commands_ratio"] = round(
            py_idle["commands_per_s"] / go_idle["commands_per_s"], 2)
        figures["aqsh_idle_rss_mb"] = round(py_idle["rss_mb"], 1)
        figures["go_idle_rss_mb"] = round(go_idle["rss_mb"], 1)
        figures["idle_rss_ratio"] = round(py_idle["rss_mb"] / go_idle["rss_mb"], 2)
        await redis.aclose()
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
