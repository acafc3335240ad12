"""Worker server benchmark: aqsh vs a Go asynq v0.26 server on the same private Redis, same run,
every side repeated ``--rounds`` times (at least 5), interleaved.

    .venv/bin/python benchmarks/server.py [--tasks 20000] [--rounds 5] [--pin-redis CORE]

Needs the Go harness (``make interop`` builds .venv/bin/aqsh-interop; built here if missing).
Measures:
- no-op throughput draining pre-enqueued tasks at concurrency 10 and 100: Go's ``bench-process``
  (one Go process, all cores) against the worker a user would write (benchmarks/_noop_worker.py:
  a ``Server`` with a ``ServeMux`` handler, fast-lane broker, logging as ``aqsh serve``
  configures it) as its own process, with ``--processes 1`` and with one process per core
  (aqsh's supervisor). The aqsh side is started against a paused queue, waits until every
  process heartbeats, and is timed from the unpause (with the wake-up an aqsh client would
  publish) to the last acknowledgement (pending and active empty), as Go times start → last ack;
- CPU seconds per 1,000 tasks for each side during that drain;
- pick-up latency p50/p99 on an idle server (enqueue → handler start);
- idle Redis commands/s and RSS of one idle worker (each in its own process).
Every ``*_ratio`` is aqsh divided by Go (ratio of medians): above 1 is a win for throughput,
below 1 is a win for latency, CPU, RSS and idle commands.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import _common
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
HERE = Path(__file__).resolve().parent
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


async def go_throughput(
    redis: aioredis.Redis, url: str, n: int, concurrency: int
) -> dict[str, float]:
    await redis.flushall()
    await preload(redis, "bench-go", n)
    cpu0 = children_cpu_s()
    result = await asyncio.to_thread(_common.go, "bench-process", url, "-queue", "bench-go",
                                     "-n", str(n), "-concurrency", str(concurrency))
    return {"tasks_per_s": float(result["tasks_per_s"]),
            "cpu_s_per_1000": (children_cpu_s() - cpu0) / n * 1000}


def tree_cpu_s(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def aqsh_throughput(redis: aioredis.Redis, url: str, n: int, concurrency: int,
                          processes: int) -> dict[str, float]:
    """The user's worker as its own process(es), timed from outside (see the module doc)."""
    await redis.flushall()
    queue = keys.queue_keys("bench-py")
    await redis.set(queue.paused, "1")
    await preload(redis, queue.name, n)
    proc = subprocess.Popen(  # noqa: ASYNC220 - a fork, before the timed span
        [sys.executable, str(HERE / "_noop_worker.py"), "--redis", url, "--queue", queue.name,
         "--concurrency", str(concurrency), "--processes", str(processes)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while await redis.zcard(keys.ALL_SERVERS) < processes:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("aqsh worker did not start")
            await asyncio.sleep(0.02)
        tree = psutil.Process(proc.pid)
        cpu0 = tree_cpu_s(tree)
        start = time.perf_counter()
        await redis.delete(queue.paused)
        await redis.publish(keys.WAKE_CHANNEL, queue.name)
        # Polling Redis state (no event exists for it): the span covers the acks landing, as
        # Go's bench-process does.
        while await redis.llen(queue.pending) or await redis.llen(queue.active):  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        elapsed_s = time.perf_counter() - start
        cpu_s = tree_cpu_s(tree) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 60)
    processed = int(await redis.get(queue.processed_total) or 0)
    if processed != n:
        raise RuntimeError(f"aqsh processed {processed} of {n}")
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
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--pickups", type=int, default=20, help="per round")
    parser.add_argument("--idle-window-s", type=float, default=5.0)
    parser.add_argument("--concurrency", default="10,100")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="the multi-process side (default: the cores this may use)")
    parser.add_argument("--pin-redis", type=int, default=None, metavar="CORE",
                        help="pin Redis to this core (taskset)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    _common.go_binary()
    samples = _common.Samples()
    figures: dict[str, object] = {"tasks": args.tasks, "rounds": args.rounds,
                                  "processes_multi": args.processes}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with RedisProcess() as server:
        if args.pin_redis is not None:
            _common.pin(_common.redis_pid(server), args.pin_redis)
        redis = aioredis.Redis.from_url(server.url)
        for round_no in range(args.rounds):
            print(f"# round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for c in concurrencies:
                sides: list[tuple[str, int]] = [("go", 0), ("aqsh_p1", 1)]
                if args.processes > 1:
                    sides.append((f"aqsh_p{args.processes}", args.processes))
                if round_no % 2:
                    sides.reverse()  # drift favours no side
                for side, processes in sides:
                    if side == "go":
                        r = await go_throughput(redis, server.url, args.tasks, c)
                    else:
                        r = await aqsh_throughput(redis, server.url, args.tasks, c, processes)
                    samples.add(f"{side}_c{c}_tasks_per_s", r["tasks_per_s"])
                    samples.add(f"{side}_c{c}_cpu_s_per_1000", r["cpu_s_per_1000"])
            await redis.flushall()
            go_pick = await asyncio.to_thread(_common.go, "bench-pickup", server.url,
                                              "-n", str(args.pickups))
            py_pick = await aqsh_pickup(redis, args.pickups)
            for name in ("p50_ms", "p99_ms"):
                samples.add(f"aqsh_pickup_{name}", py_pick[name])
                samples.add(f"go_pickup_{name}", float(go_pick[name]))
            py_idle = await idle_profile(redis, [
                sys.executable, "-m", "aqsh.engine.server_demo", "--redis", server.url,
                "--queues", IDLE_QUEUES, "--concurrency", "10"], args.idle_window_s)
            go_idle = await idle_profile(redis, [
                _common.go_binary(), "serve", "-redis", server.url, "-queues", IDLE_QUEUES,
                "-concurrency", "10", "-duration", f"{int(args.idle_window_s) + 30}s"],
                args.idle_window_s)
            samples.add("aqsh_idle_commands_per_s", py_idle["commands_per_s"])
            samples.add("go_idle_commands_per_s", go_idle["commands_per_s"])
            samples.add("aqsh_idle_rss_mb", py_idle["rss_mb"])
            samples.add("go_idle_rss_mb", go_idle["rss_mb"])
        figures.update(_common.placement(_common.redis_pid(server), args.pin_redis))
        await redis.aclose()
    for c in concurrencies:
        figures[f"throughput_c{c}_ratio"] = round(
            samples.ratio(f"aqsh_p1_c{c}_tasks_per_s", f"go_c{c}_tasks_per_s"), 3)
        figures[f"cpu_c{c}_ratio"] = round(
            samples.ratio(f"aqsh_p1_c{c}_cpu_s_per_1000", f"go_c{c}_cpu_s_per_1000"), 3)
        if args.processes > 1:
            multi = f"aqsh_p{args.processes}_c{c}_tasks_per_s"
            figures[f"throughput_p{args.processes}_c{c}_ratio"] = round(
                samples.ratio(multi, f"go_c{c}_tasks_per_s"), 3)
            figures[f"processes_scaling_c{c}_ratio"] = round(
                samples.ratio(multi, f"aqsh_p1_c{c}_tasks_per_s"), 3)
    for name in ("p50", "p99"):
        figures[f"pickup_{name}_ratio"] = round(
            samples.ratio(f"aqsh_pickup_{name}_ms", f"go_pickup_{name}_ms"), 4)
    figures["idle_commands_ratio"] = round(
        samples.ratio("aqsh_idle_commands_per_s", "go_idle_commands_per_s"), 2)
    figures["idle_rss_ratio"] = round(samples.ratio("aqsh_idle_rss_mb", "go_idle_rss_mb"), 2)
    _common.report("server", figures, samples)


if __name__ == "__main__":
    asyncio.run(main())
