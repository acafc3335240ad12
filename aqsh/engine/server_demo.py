"""A small standalone aqsh worker, so interop tests and benchmarks can run the real Server as
its own process (own CPU, RSS and Redis connections) without writing a script.

    python -m aqsh.engine.server_demo --redis redis://127.0.0.1:6379/0 \\
        --queues critical:6,default:3 --concurrency 10

Task types it understands: ``noop`` (and anything unknown under ``noop:``) succeeds, ``echo``
returns the payload as the result, ``fail`` raises (retried), ``skip`` raises SkipRetry,
``sleep:<ms>`` sleeps that long (cancellable). SIGTERM drains; a second SIGTERM forces.
"""

from __future__ import annotations

import argparse
import asyncio

import redis.asyncio as aioredis

from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import ServeMux, Server
from aqsh.engine.task import SkipRetry, Task, TaskContext


async def _noop(task: Task, ctx: TaskContext) -> bytes | None:
    return None


async def _echo(task: Task, ctx: TaskContext) -> bytes | None:
    return task.payload


async def _fail(task: Task, ctx: TaskContext) -> bytes | None:
    raise RuntimeError(f"demo failure: {task.payload.decode(errors='replace')}")


async def _skip(task: Task, ctx: TaskContext) -> bytes | None:
    raise SkipRetry("demo: not retryable")


async def _sleep(task: Task, ctx: TaskContext) -> bytes | None:
    await asyncio.sleep(int(task.type.removeprefix("sleep:")) / 1000)
    return None


def demo_mux() -> ServeMux:
    mux = ServeMux()
    mux.handle("noop", _noop)
    mux.handle("echo", _echo)
    mux.handle("fail", _fail)
    mux.handle("skip", _skip)
    mux.handle("sleep:", _sleep)
    return mux


def parse_queues(spec: str) -> dict[str, int]:
    """``name:weight,name:weight`` — the same form as the Go interop binary's ``-queues``."""
    queues: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = item.partition(":")
        queues[name] = int(weight or 1)
    return queues


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aqsh.engine.server_demo")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--queues", default="critical:6,default:3")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--strict", action="store_true", help="strict queue priority")
    parser.add_argument("--shutdown-timeout-s", type=float, default=8.0)
    args = parser.parse_args(argv)
    client = aioredis.Redis.from_url(args.redis)
    server = Server(
        RedisBroker(client), demo_mux(), concurrency=args.concurrency,
        queues=parse_queues(args.queues), strict_priority=args.strict,
        shutdown_timeout_s=args.shutdown_timeout_s,
    )
    try:
        await server.run()
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
