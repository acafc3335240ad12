"""Held-run overhead: throughput of a task with a concurrency limit that never binds against the
same task without one, on one private Redis, same run, interleaved rounds (A B A B …).

    .venv/bin/python benchmarks/held.py [--tasks 20000] [--rounds 7] [--concurrency 10]

Each round preloads ``--tasks`` no-op tasks into a fresh paused queue, starts an aqsh worker
(fast-lane broker, in this process) on it, and times the drain from the unpause (with the
wake-up an aqsh client publishes) until pending and active are empty. The limited side's tasks
all share one concurrency key whose limit is the number of tasks, so every run takes a slot
(inside the dequeue script, released inside the finishing transition) and none ever waits:
what is measured is the mechanism's cost, not waiting. Ends with one JSON line whose
``limit_vs_plain_ratio`` is limited ÷ plain throughput (ratio of medians; issue 14: ≥ 0.9);
``limit_cpu_vs_plain_ratio`` and ``limit_redis_cpu_vs_plain_ratio`` compare the CPU per task
of this process (the worker and the polling) and of Redis, which the machine's other load
moves less than it moves the rates; ``shell_limit_cpu_vs_plain_ratio`` the shell worker's.

The shell side is the same comparison as users run it: ``--shell-runs`` (1,000) runs of an
``echo hi`` script through the ShellRunner wired as ``aqsh serve`` wires its worker (fast-lane
runner and broker, logging at info), from a tasks.yaml loaded by aqsh's own loader, where
``hi_limited`` has ``concurrency: {limit: <runs>, key: "{x}"}`` and ``hi`` has none. The runs
are enqueued with the headers a ``POST /tasks/{name}`` gives them (``runner.spec.flow_headers``),
all with the same ``x`` (one key), then drained as above; ``shell_limit_vs_plain_ratio`` is
limited ÷ plain runs/s.

    .venv/bin/python benchmarks/held.py [--shell-runs 1000] [--shell-concurrency 10]
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

from aqsh.engine import flow, keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import ServeMux, Server
from aqsh.engine.task import Task, TaskContext
from aqsh.redis_process import RedisProcess
from aqsh.runner.handler import RunnerSettings, ShellRunner
from aqsh.runner.process import install_child_watcher
from aqsh.runner.spec import TasksConfig, flow_headers, load_tasks

SHELL_QUEUE = "held-shell"


async def noop(task: Task, ctx: TaskContext) -> bytes | None:
    return None


async def preload(redis: aioredis.Redis, queue: str, n: int,
                  headers: dict[str, str] | None) -> None:
    client = Client(redis, wake_workers=False)
    for start in range(0, n, 1000):
        await client.enqueue_many([
            EnqueueRequest(type="bench:noop", payload=b"x", queue=queue, headers=headers)
            for _ in range(min(1000, n - start))])


async def redis_cpu_s(redis: aioredis.Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def drain(url: str, queue: str, n: int, concurrency: int,
                limited: bool) -> dict[str, float]:
    """Tasks per second for one round, and the CPU per task of this process (the worker and
    the benchmark's polling) and of Redis: less moved by the machine's load than the rate."""
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
        cpu0, redis_cpu0 = time.process_time(), await redis_cpu_s(redis)
        started = time.perf_counter()
        await redis.delete(q.paused)
        await redis.publish(keys.WAKE_CHANNEL, queue)
        while await redis.llen(q.pending) or await redis.llen(q.active):  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # the state is in Redis: no local event to wait on
        elapsed = time.perf_counter() - started
        cpu_s, redis_s = time.process_time() - cpu0, await redis_cpu_s(redis) - redis_cpu0
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
    return {"tasks_per_s": n / elapsed, "cpu_us_per_task": cpu_s / n * 1e6,
            "redis_cpu_us_per_task": redis_s / n * 1e6}


def shell_config(tmp: Path, runs: int) -> TasksConfig:
    """A tasks.yaml as an operator writes it, through aqsh's loader (the checks included)."""
    scripts = tmp / "scripts"
    scripts.mkdir()
    hi = scripts / "hi.sh"
    hi.write_text("#!/bin/sh\necho hi\n")
    hi.chmod(0o755)
    task = f"""\
    script: hi.sh
    queue: {SHELL_QUEUE}
    max_retry: 0
    input:
      - {{name: x, env: X, required: true}}
"""
    path = tmp / "tasks.yaml"
    path.write_text(f"tasks:\n  hi:\n{task}  hi_limited:\n{task}"
                    f'    concurrency: {{limit: {runs}, key: "{{x}}"}}\n')
    return load_tasks(path, scripts)


async def shell_drain(url: str, config: TasksConfig, work: str, task: str, runs: int,
                      concurrency: int) -> dict[str, float]:
    """Runs per second for one round of ``task``, and the worker's CPU per run (this
    process: the scripts are its children, not counted)."""
    redis = aioredis.Redis.from_url(url, max_connections=128)
    q = keys.queue_keys(SHELL_QUEUE)
    try:
        await redis.flushall()
        await redis.set(q.paused, int(time.time()))
        values = {"x": "a"}
        headers = flow_headers(config.tasks[task], values)
        client = Client(redis, wake_workers=False)
        payload = b'{"x": "a"}'
        for start in range(0, runs, 500):
            await client.enqueue_many([
                EnqueueRequest(type=task, payload=payload, queue=SHELL_QUEUE,
                               headers=headers or None, max_retry=0)
                for _ in range(min(500, runs - start))])
        # Wired as `aqsh serve` wires its worker (aqsh/service.py: _worker).
        runner = ShellRunner(lambda: config, redis, RunnerSettings(work_root=work),
                             fast_lane=True)
        broker = RedisBroker(redis, fast_lane=True)
        server = Server(broker, runner, concurrency=concurrency, queues={SHELL_QUEUE: 1})
        await server.start()
        try:
            cpu0 = time.process_time()
            started = time.perf_counter()
            await redis.delete(q.paused)
            await redis.publish(keys.WAKE_CHANNEL, SHELL_QUEUE)
            while int(await redis.get(q.processed_total) or 0) < runs:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # the counter lives in Redis: nothing to await
            elapsed = time.perf_counter() - started
            cpu_s = time.process_time() - cpu0
        finally:
            await server.stop(shutdown_timeout_s=5)
            await runner.aclose()
            await broker.close_fast_lane()
        failed = int(await redis.get(q.failed_total) or 0)
        assert failed == 0, f"{failed} of the {task} runs failed"
        if headers:  # nothing waited, every slot was given back
            assert await redis.zcard(keys.flow_slots_key(SHELL_QUEUE, "hi_limited:a")) == 0
            assert await redis.zcard(q.scheduled) == 0
    finally:
        await redis.aclose()
    return {"runs_per_s": runs / elapsed, "cpu_us_per_run": cpu_s / runs * 1e6}


def record(samples: _common.Samples, prefix: str, figures: dict[str, float]) -> None:
    for name, value in figures.items():
        samples.add(prefix + name, value)


async def main_async(args: argparse.Namespace) -> None:
    samples = _common.Samples()
    tmp = Path(tempfile.mkdtemp(prefix="aqsh-held-"))
    config = shell_config(tmp, max(1, args.shell_runs))
    install_child_watcher()  # as the worker does, before its first spawn
    with RedisProcess() as server:
        for round_no in range(args.rounds):
            print(f"# round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
            # Each phase's sides alternate, the order flipping every round (drift favours
            # neither); the shell phase starts with the side the engine phase ended with.
            engine_sides = ("plain", "limit") if round_no % 2 == 0 else ("limit", "plain")
            for side in engine_sides:
                record(samples, f"{side}_", await drain(
                    server.url, f"held-{side}-{round_no}", args.tasks, args.concurrency,
                    side == "limit"))
            if args.shell_runs <= 0:
                continue
            for side in engine_sides[::-1]:
                record(samples, f"shell_{side}_", await shell_drain(
                    server.url, config, str(tmp / "work"),
                    "hi_limited" if side == "limit" else "hi", args.shell_runs,
                    args.shell_concurrency))
    figures: dict[str, object] = {
        "tasks": args.tasks, "rounds": args.rounds, "concurrency": args.concurrency,
        "limit_vs_plain_ratio": round(
            samples.ratio("limit_tasks_per_s", "plain_tasks_per_s"), 3),
        "limit_cpu_vs_plain_ratio": round(
            samples.ratio("limit_cpu_us_per_task", "plain_cpu_us_per_task"), 3),
        "limit_redis_cpu_vs_plain_ratio": round(
            samples.ratio("limit_redis_cpu_us_per_task", "plain_redis_cpu_us_per_task"), 3),
    }
    if args.shell_runs > 0:
        figures.update({
            "shell_runs": args.shell_runs, "shell_concurrency": args.shell_concurrency,
            "shell_limit_vs_plain_ratio": round(
                samples.ratio("shell_limit_runs_per_s", "shell_plain_runs_per_s"), 3),
            "shell_limit_cpu_vs_plain_ratio": round(
                samples.ratio("shell_limit_cpu_us_per_run", "shell_plain_cpu_us_per_run"), 3)})
    _common.report("held", figures, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 20,000 tasks drain in 1-2 s a side; 5,000 took under half a second, and the Redis CPU per
    # task of a round that short moved by a quarter between runs.
    parser.add_argument("--tasks", type=int, default=20000)
    # 7, not the usual 5: both ratios compare sides whose difference is a few percent of a
    # round, and a shared machine swings single rounds by more than that.
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--shell-runs", type=int, default=1000,
                        help="per shell round (0: the engine side only)")
    parser.add_argument("--shell-concurrency", type=int, default=10)
    args = parser.parse_args()
    from aqsh.api.app import settle_heap
    from aqsh.logging import configure_logging

    configure_logging("json", "info")  # as `aqsh serve` runs its worker
    settle_heap()  # as `aqsh serve` does once its app has started
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
