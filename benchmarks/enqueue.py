"""Enqueue throughput: aqsh Client vs the Go asynq client into the same Redis, same run.

Sequential, 50 concurrent and batched (``enqueue_many``, 1,000 tasks per call), for the Client
on redis-py and on its fast lane (``Client(fast_lane=True)``), against the Go client and the
floor: raw EVALSHA of a no-op script through redis-py and through the lane. The lane's
sequential figures are also taken with its spin-before-park turned off (``spin_us=0``), with the
CPU time each enqueue costs this process, so the price of spinning is on the record too.

Round-trip latency on a shared 2-core machine is bimodal (it depends on whether Redis and the
caller share a core at that moment), so every phase runs ``--rounds`` times, aqsh and Go
interleaved, and the median of each is reported with its min and max. ``--pin N`` puts this
process, Redis and the Go client on core N (inherited affinity, as ``taskset -c N`` would),
which fixes the regime where they share a core (CPU per enqueue decides).
``--loop uvloop`` runs the aqsh side on uvloop, as the API process (``aqsh serve --mode api``)
runs its client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import _common
import redis.asyncio as aioredis
import uvloop

from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.fastlane import FastLane
from aqsh.redis_process import RedisProcess

# 20,000 sequential enqueues take 1-2 s: 5,000 (a quarter of a second) left a round to whichever
# core Redis and the caller happened to share, and medians of 5 moved 20% between runs.
N_SEQ = int(os.environ.get("AQSH_BENCH_N_SEQ", "20000"))
N_CONC = int(os.environ.get("AQSH_BENCH_N_CONC", "20000"))
N_BATCH = 20000
BATCH = 1000


async def floor_redis_py(redis: aioredis.Redis, sha: str) -> float:
    started = time.perf_counter()
    for _ in range(N_SEQ):
        await redis.execute_command("EVALSHA", sha, 0)
    return N_SEQ / (time.perf_counter() - started)


async def floor_lane(lane: FastLane, sha: str) -> float:
    started = time.perf_counter()
    for _ in range(N_SEQ):
        await lane.execute("EVALSHA", sha, 0)
    return N_SEQ / (time.perf_counter() - started)


async def sequential(client: Client, cpu_us: list[float] | None = None) -> float:
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(N_SEQ):
        await client.enqueue("bench:noop", b"x", queue="bench-aqsh")
    if cpu_us is not None:
        cpu_us.append((time.process_time() - cpu_started) / N_SEQ * 1e6)
    return N_SEQ / (time.perf_counter() - started)


async def concurrent(client: Client, concurrency: int = 50) -> float:
    remaining = N_CONC

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.enqueue("bench:noop", b"x", queue="bench-aqsh")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return N_CONC / (time.perf_counter() - started)


async def batched(client: Client) -> float:
    requests = [EnqueueRequest(type="bench:noop", payload=b"x", queue="bench-aqsh")
                for _ in range(BATCH)]
    started = time.perf_counter()
    for _ in range(N_BATCH // BATCH):
        await client.enqueue_many(requests)
    return N_BATCH / (time.perf_counter() - started)


async def main(rounds: int, pin: int | None) -> None:
    samples = _common.Samples()

    async def measure(name: str, phase: Callable[[], Awaitable[float]]) -> None:
        await samples.measure(name, phase)
        await redis.flushall()

    def go(concurrency: int, n: int) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            flags = ("-n", str(n), "-concurrency", str(concurrency))
            return float(_common.go("bench-enqueue", server.url, *flags)["tasks_per_s"])
        return run

    with RedisProcess() as server:
        redis = aioredis.Redis.from_url(server.url, max_connections=64)
        slow = Client(redis)
        cpu: dict[str, list[float]] = {"spin": [], "nospin": []}
        async with Client(redis, fast_lane=True) as fast, Client(redis, fast_lane=True) as parked:
            assert parked._lane is not None
            parked._lane.spin_s = 0.0
            lane = FastLane.from_redis(redis)
            lane_parked = FastLane.from_redis(redis, spin_us=0)
            assert lane is not None
            assert lane_parked is not None
            sha = await redis.script_load("return 1")  # FLUSHALL keeps scripts
            for _ in range(rounds):
                await measure("floor_redis_py_evalsha_per_s", lambda: floor_redis_py(redis, sha))
                await measure("floor_lane_evalsha_per_s", lambda: floor_lane(lane, sha))
                await measure("floor_lane_nospin_evalsha_per_s",
                              lambda: floor_lane(lane_parked, sha))
                await measure("aqsh_sequential_per_s", lambda: sequential(slow))
                await measure("aqsh_fast_sequential_per_s", lambda: sequential(fast, cpu["spin"]))
                await measure("aqsh_fast_nospin_sequential_per_s",
                              lambda: sequential(parked, cpu["nospin"]))
                await measure("go_sequential_per_s", go(1, N_SEQ))
                await measure("aqsh_concurrent50_per_s", lambda: concurrent(slow))
                await measure("aqsh_fast_concurrent50_per_s", lambda: concurrent(fast))
                await measure("go_concurrent50_per_s", go(50, N_CONC))
                await measure("aqsh_batched_per_s", lambda: batched(slow))
                await measure("aqsh_fast_batched_per_s", lambda: batched(fast))
            await lane.aclose()
            await lane_parked.aclose()
        placement = _common.placement(_common.redis_pid(server), pin)
        await redis.aclose()
    figures: dict[str, object] = {
        name: round(samples.median(name), 1) for name in samples.values}
    figures.update(placement)
    figures["aqsh_fast_sequential_cpu_us_per_enqueue"] = round(statistics.median(cpu["spin"]), 1)
    figures["aqsh_fast_nospin_sequential_cpu_us_per_enqueue"] = round(
        statistics.median(cpu["nospin"]), 1)
    figures["rounds"] = rounds
    figures["pinned_core"] = -1 if pin is None else pin
    figures["event_loop"] = type(asyncio.get_running_loop()).__module__

    def ratio(name: str, a: str, b: str) -> None:
        figures[name] = round(samples.ratio(a, b), 3)

    ratio("sequential_ratio", "aqsh_sequential_per_s", "go_sequential_per_s")
    ratio("fast_sequential_ratio", "aqsh_fast_sequential_per_s", "go_sequential_per_s")
    ratio("fast_nospin_sequential_ratio", "aqsh_fast_nospin_sequential_per_s",
          "go_sequential_per_s")
    ratio("concurrent50_ratio", "aqsh_concurrent50_per_s", "go_concurrent50_per_s")
    ratio("fast_concurrent50_ratio", "aqsh_fast_concurrent50_per_s", "go_concurrent50_per_s")
    ratio("batched_vs_go_concurrent50_ratio", "aqsh_batched_per_s", "go_concurrent50_per_s")
    ratio("fast_batched_vs_go_concurrent50_ratio", "aqsh_fast_batched_per_s",
          "go_concurrent50_per_s")
    ratio("sequential_vs_floor_ratio", "aqsh_sequential_per_s", "floor_redis_py_evalsha_per_s")
    ratio("fast_sequential_vs_floor_ratio", "aqsh_fast_sequential_per_s",
          "floor_lane_evalsha_per_s")
    _common.report("enqueue", figures, samples)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--pin", type=int, default=None, metavar="CORE",
                        help="run everything (this process, Redis, Go) on this core")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # inherited by Redis and the Go client
    with asyncio.Runner(loop_factory=uvloop.new_event_loop if args.loop == "uvloop" else None
                        ) as runner:
        runner.run(main(args.rounds, args.pin))
