"""Worker server benchmark: aqsh vs a Go asynq v0.26 server on the same private Redis, same run,
every side repeated ``--rounds`` times (at least 5), interleaved.

    .venv/bin/python benchmarks/server.py [--tasks 60000] [--rounds 5] [--pin-redis CORE]
        [--backlog 10000] [--backlog-pending 1000000] [--backlog-only]

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
- idle Redis commands/s and RSS of one idle worker (each in its own process);
- processing cost against the backlog (``--backlog``, issue 15: "1,000,000 pending within 10%
  of 1,000 pending"): the same worker draining ``--backlog`` (10,000) tasks from the head of a
  queue holding ``--backlog-pending`` (1,000,000) against one holding ``--backlog`` + 1,000,
  each in its own database of one private Redis (so one keyspace holds the million and the
  other does not, and both share one Redis process and its placement). One worker process
  per side, kept paused between rounds; a round unpauses it, times the first ``--backlog``
  acknowledgements, pauses it again and refills what it drained. ``backlog_1m_vs_1k_ratio``
  is tasks/s with the million ÷ without (target ≥ 0.9), ``backlog_cpu_1m_vs_1k_ratio`` the
  worker's CPU per task likewise, ``backlog_redis_cpu_1m_vs_1k_ratio`` Redis's.
  ``--backlog-only`` runs just this phase (~2 minutes).
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


async def preload(redis: aioredis.Redis, queue: str, n: int, *, per_call: int = 1000) -> None:
    async with Client(redis, wake_workers=False, fast_lane=True) as client:
        for start in range(0, n, per_call):
            batch = [EnqueueRequest(type="bench:noop", payload=b"x", queue=queue)
                     for _ in range(min(per_call, n - start))]
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


async def redis_cpu_s(redis: aioredis.Redis) -> float:
    """CPU time Redis has used (its own getrusage, microsecond resolution)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class BacklogSide:
    """One side of the backlog phase: a queue in a database of its own, kept at ``pending``
    tasks, and the user's worker on it as its own process, paused between rounds."""

    def __init__(self, url: str, queue: str, pending: int, concurrency: int) -> None:
        self.url, self.pending, self.concurrency = url, pending, concurrency
        self.q = keys.queue_keys(queue)
        self.redis = aioredis.Redis.from_url(url)
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> float:
        """Fill the queue (paused) and start the worker; returns the fill's tasks/s."""
        await self.redis.flushdb()
        await self.redis.set(self.q.paused, "1")
        started = time.perf_counter()
        await preload(self.redis, self.q.name, self.pending, per_call=10_000)
        fill_per_s = self.pending / (time.perf_counter() - started)
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a fork, before any timed span
            [sys.executable, str(HERE / "_noop_worker.py"), "--redis", self.url,
             "--queue", self.q.name, "--concurrency", str(self.concurrency)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not await self.redis.zcard(keys.ALL_SERVERS):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("aqsh worker did not start")
            await asyncio.sleep(0.02)
        return fill_per_s

    async def drain(self, n: int) -> dict[str, float]:
        """Time the first ``n`` acknowledgements from the unpause, pause, and refill what was
        drained (the overshoot of the tasks in flight at the pause included)."""
        assert self.proc is not None
        tree = psutil.Process(self.proc.pid)
        done0 = int(await self.redis.get(self.q.processed_total) or 0)
        cpu0, redis_cpu0 = tree_cpu_s(tree), await redis_cpu_s(self.redis)
        start = time.perf_counter()
        await self.redis.delete(self.q.paused)
        await self.redis.publish(keys.WAKE_CHANNEL, self.q.name)
        # The acks are counted in Redis: no event to wait on.
        while int(await self.redis.get(self.q.processed_total) or 0) - done0 < n:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        elapsed_s = time.perf_counter() - start
        cpu_s = tree_cpu_s(tree) - cpu0
        redis_cpu = await redis_cpu_s(self.redis) - redis_cpu0
        await self.redis.set(self.q.paused, "1")
        while await self.redis.llen(self.q.active):  # noqa: ASYNC110 - Redis state again
            await asyncio.sleep(0.01)
        missing = self.pending - int(await self.redis.llen(self.q.pending))
        await preload(self.redis, self.q.name, missing, per_call=10_000)
        return {"tasks_per_s": n / elapsed_s, "cpu_us_per_task": cpu_s / n * 1e6,
                "redis_cpu_us_per_task": redis_cpu / n * 1e6}

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 60)
        await self.redis.flushdb(asynchronous=True)  # a million keys: freed in the background
        await self.redis.aclose()


async def backlog_phase(args: argparse.Namespace, samples: _common.Samples,
                        figures: dict[str, object]) -> None:
    """Throughput with a huge backlog against a small one (see the module doc)."""
    n, big = args.backlog, args.backlog_pending
    with RedisProcess() as server:
        if args.pin_redis is not None:
            _common.pin(_common.redis_pid(server), args.pin_redis)
        base = server.url.rsplit("/", 1)[0]
        sides = {"backlog_1m": BacklogSide(f"{base}/1", "backlog-1m", big, args.backlog_c),
                 "backlog_1k": BacklogSide(f"{base}/2", "backlog-1k", n + 1000,
                                           args.backlog_c)}
        try:
            for name, side in sides.items():
                print(f"# backlog: filling {side.pending:,}", file=sys.stderr, flush=True)
                figures[f"{name}_fill_tasks_per_s"] = round(await side.start())
            info = await sides["backlog_1m"].redis.info("memory")
            figures["backlog_redis_used_memory_mb"] = round(info["used_memory"] / 2**20)
            for round_no in range(args.rounds):
                print(f"# backlog round {round_no + 1}/{args.rounds}", file=sys.stderr,
                      flush=True)
                order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
                for name in order:
                    r = await sides[name].drain(n)
                    samples.add(f"{name}_tasks_per_s", r["tasks_per_s"])
                    samples.add(f"{name}_cpu_us_per_task", r["cpu_us_per_task"])
                    samples.add(f"{name}_redis_cpu_us_per_task", r["redis_cpu_us_per_task"])
            for key, value in _common.placement(_common.redis_pid(server),
                                                args.pin_redis).items():
                figures.setdefault(key, value)  # the phase against Go reported its own
        finally:
            for side in sides.values():
                await side.stop()
    figures.update({
        "backlog_tasks": n, "backlog_pending_big": big, "backlog_pending_small": n + 1000,
        "backlog_concurrency": args.backlog_c,
        "backlog_1m_vs_1k_ratio": round(
            samples.ratio("backlog_1m_tasks_per_s", "backlog_1k_tasks_per_s"), 3),
        "backlog_cpu_1m_vs_1k_ratio": round(
            samples.ratio("backlog_1m_cpu_us_per_task", "backlog_1k_cpu_us_per_task"), 3),
        "backlog_redis_cpu_1m_vs_1k_ratio": round(
            samples.ratio("backlog_1m_redis_cpu_us_per_task",
                          "backlog_1k_redis_cpu_us_per_task"), 3),
    })


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


async def against_go(args: argparse.Namespace, samples: _common.Samples,
                     figures: dict[str, object]) -> None:
    """Throughput, CPU, pick-up latency and idle cost, aqsh against Go (see the module doc)."""
    _common.go_binary()
    figures.update({"tasks": args.tasks, "processes_multi": args.processes})
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    # 60,000 tasks drain in 2-5 s a side: 20,000 drained in about one second, short enough for one
    # scheduler placement of the worker, Redis and the poller to decide a round (single rounds
    # spanned 2.7x, medians of 5 moved 25-33% between runs).
    parser.add_argument("--tasks", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--pickups", type=int, default=20, help="per round")
    parser.add_argument("--idle-window-s", type=float, default=5.0)
    parser.add_argument("--concurrency", default="10,100")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="the multi-process side (default: the cores this may use)")
    parser.add_argument("--pin-redis", type=int, default=None, metavar="CORE",
                        help="pin Redis to this core (taskset)")
    parser.add_argument("--backlog", type=int, default=10_000,
                        help="tasks drained per backlog round (0: skip the phase)")
    parser.add_argument("--backlog-pending", type=int, default=1_000_000,
                        help="pending tasks of the big-backlog side")
    parser.add_argument("--backlog-c", type=int, default=10,
                        help="worker concurrency in the backlog phase")
    parser.add_argument("--backlog-only", action="store_true",
                        help="run only the backlog phase")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    samples = _common.Samples()
    figures: dict[str, object] = {"rounds": args.rounds}
    if not args.backlog_only:
        await against_go(args, samples, figures)
    if args.backlog > 0:
        await backlog_phase(args, samples, figures)
    _common.report("server", figures, samples)


if __name__ == "__main__":
    asyncio.run(main())
