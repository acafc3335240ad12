"""Held-run overhead: throughput of a task with a concurrency limit that never binds against the
same task without one, on one private Redis, same run, interleaved rounds (A B A B …).

    .venv/bin/python benchmarks/held.py [--tasks 5000] [--rounds 5] [--concurrency 10]

Each round preloads ``--tasks`` no-op tasks into a fresh paused queue, starts an aqsh worker
(fast-lane broker, in this process) on it, and times the drain from the unpause (with the
wake-up an aqsh client publishes) until pending and active are empty. The limited side's tasks
all share one concurrency key whose limit is the number of tasks, so every run takes a slot
(acquire after dequeue, release inside the finishing transition) and none ever waits: what is
measured is the mechanism's cost, not waiting. Ends with one JSON line whose
``limit_vs_plain_ratio`` is limited ÷ plain throughput (ratio of medians; issue 14: ≥ 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import _common
import redis.asyncio as aioredis

from aqsh.engine import flow, keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import ServeMux, Server
from aqsh.engine.task import Task, TaskContext
from aqsh.redis_process import RedisProcess


async def noop(task: Task, ctx: TaskContext) -> bytes | None:
    return None


async def preload(redis: aioredis.Redis, queue: str, n: int,
                  headers: dict[str, str] | None) -> None:
    client = Client(redis, wake_workers=False)
    for start in range(0, n, 1000):
        await client.enqueue_many([
            EnqueueRequest(type="bench:noop", payload=b"x", queue=queue, headers=headers)
            for _ in range(min(1000, n - start))])


async def drain(url: str, queue: str, n: int, concurrency: int, limited: bool) -> float:
    """Tasks per second for one round."""
    redis = aioredis.Redis.from_url(url)
    q = keys.queue_keys(queue)
    headers = (flow.headers(concurrency=flow.Concurrency(f"bench:{queue}", n))
               if limited else None)
    await redis.set(q.paused, int(time.time()))
    await preload(redis, queue, n, headers)
    broker = RedisBroker(redis, fast_lane=True)
    mux = ServeMux()
    mux.handle("bench:noop", noop)
    server = Server(broker, mux, concurrency=concurrency, queues={queue: 1})
    await server.start()
    try:
        started = time.perf_counter()
        await redis.delete(q.paused)
        await redis.publish(keys.WAKE_CHANNEL, queue)
        while await redis.llen(q.pending) or await redis.llen(q.active):  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # the state is in Redis: no local event to wait on
        elapsed = time.perf_counter() - started
    finally:
        await server.stop(shutdown_timeout_s=5)
        await broker.close_fast_lane()
        await redis.aclose()
    if limited:  # the limit never bound: nothing waited, every slot was given back
        check = aioredis.Redis.from_url(url)
        try:
            assert await check.zcard(keys.flow_slots_key(queue, f"bench:{queue}")) == 0
            assert await check.zcard(q.scheduled) == 0
        finally:
            await check.aclose()
    return n / elapsed


async def main_async(args: argparse.Namespace) -> None:
    samples = _common.Samples()
    with RedisProcess() as server:
        for round_no in range(args.rounds):
            for side in ("plain", "limit") if round_no % 2 == 0 else ("limit", "plain"):
                await samples.measure(
                    f"{side}_tasks_per_s",
                    lambda side=side, n=round_no: drain(
                        server.url, f"held-{side}-{n}", args.tasks, args.concurrency,
                        side == "limit"))
    _common.report("held", {
        "tasks": args.tasks, "rounds": args.rounds, "concurrency": args.concurrency,
        "limit_vs_plain_ratio": round(
            samples.ratio("limit_tasks_per_s", "plain_tasks_per_s"), 3),
    }, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
