"""Enqueue throughput: aqsh Client vs the Go asynq client into the same Redis, same run.

Sequential, 50 concurrent and batched (``enqueue_many``, one pipeline per 1,000 tasks), against
the floor: raw EVALSHA of a no-op script through redis-py.
"""

from __future__ import annotations

import asyncio
import time

import _common
import redis.asyncio as aioredis

from aqsh.engine.client import Client, EnqueueRequest
from aqsh.redis_process import RedisProcess

N_SEQ = 5000
N_CONC = 20000
N_BATCH = 20000


async def floor(redis: aioredis.Redis) -> float:
    sha = await redis.script_load("return 1")
    started = time.perf_counter()
    for _ in range(N_SEQ):
        await redis.execute_command("EVALSHA", sha, 0)
    return N_SEQ / (time.perf_counter() - started)


async def aqsh_sequential(client: Client) -> float:
    started = time.perf_counter()
    for _ in range(N_SEQ):
        await client.enqueue("bench:noop", b"x", queue="bench-aqsh")
    return N_SEQ / (time.perf_counter() - started)


async def aqsh_concurrent(client: Client, concurrency: int) -> float:
    remaining = N_CONC

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.enqueue("bench:noop", b"x", queue="bench-aqsh")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return N_CONC / (time.perf_counter() - started)


async def aqsh_batched(client: Client, batch: int = 1000) -> float:
    requests = [EnqueueRequest(type="bench:noop", payload=b"x", queue="bench-aqsh")
                for _ in range(batch)]
    started = time.perf_counter()
    for _ in range(N_BATCH // batch):
        await client.enqueue_many(requests)
    return N_BATCH / (time.perf_counter() - started)


async def main() -> None:
    with RedisProcess() as server:
        redis = aioredis.Redis.from_url(server.url, max_connections=64)
        client = Client(redis)
        figures: dict[str, float] = {}
        figures["floor_evalsha_per_s"] = await floor(redis)
        figures["aqsh_sequential_per_s"] = await aqsh_sequential(client)
        await redis.flushall()
        figures["go_sequential_per_s"] = _common.go(
            "bench-enqueue", server.url, "-n", str(N_SEQ), "-concurrency", "1")["tasks_per_s"]
        await redis.flushall()
        figures["aqsh_concurrent50_per_s"] = await aqsh_concurrent(client, 50)
        await redis.flushall()
        figures["go_concurrent50_per_s"] = _common.go(
            "bench-enqueue", server.url, "-n", str(N_CONC), "-concurrency", "50")["tasks_per_s"]
        await redis.flushall()
        figures["aqsh_batched_per_s"] = await aqsh_batched(client)
        await redis.aclose()
    figures = {k: round(v, 1) for k, v in figures.items()}
    figures["sequential_ratio"] = round(
        figures["aqsh_sequential_per_s"] / figures["go_sequential_per_s"], 3)
    figures["concurrent50_ratio"] = round(
        figures["aqsh_concurrent50_per_s"] / figures["go_concurrent50_per_s"], 3)
    figures["batched_vs_go_concurrent50_ratio"] = round(
        figures["aqsh_batched_per_s"] / figures["go_concurrent50_per_s"], 3)
    figures["sequential_vs_floor_ratio"] = round(
        figures["aqsh_sequential_per_s"] / figures["floor_evalsha_per_s"], 3)
    _common.report("enqueue", figures)


if __name__ == "__main__":
    asyncio.run(main())
