"""The worker a user would write for no-op tasks: a ``Server`` with a ``ServeMux`` handler, its
broker's script calls over the fast lane and logging configured as ``aqsh serve`` configures it
(JSON, info). ``--processes N`` runs N of them under aqsh's supervisor, as
``aqsh serve --processes N`` does. benchmarks/server.py times it from outside.

    _noop_worker.py --redis URL --queue Q --concurrency C [--processes N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import _common  # noqa: F401 - puts the checkout on sys.path
import redis.asyncio as aioredis

from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import ServeMux, Server
from aqsh.engine.task import Task, TaskContext
from aqsh.logging import configure_logging
from aqsh.supervisor import Supervisor, supervised_child


async def noop(task: Task, ctx: TaskContext) -> bytes | None:
    return None


async def serve(url: str, queue: str, concurrency: int) -> None:
    redis = aioredis.Redis.from_url(url)
    broker = RedisBroker(redis, fast_lane=True)
    mux = ServeMux()
    mux.handle("bench:noop", noop)
    server = Server(broker, mux, concurrency=concurrency, queues={queue: 1})
    try:
        await server.run()
    finally:
        await broker.close_fast_lane()
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    configure_logging("json", "info")
    if args.processes > 1:
        child = [sys.executable, __file__, "--redis", args.redis, "--queue", args.queue,
                 "--concurrency", str(args.concurrency)]
        return Supervisor(child, args.processes).run()
    supervised_child()
    asyncio.run(serve(args.redis, args.queue, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
