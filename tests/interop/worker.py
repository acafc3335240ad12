"""A standalone aqsh worker process for the interop tests (killed with SIGKILL in one of them).

Usage: python -m tests.interop.worker REDIS_URL QUEUE
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis

from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from tests.interop.harness import InteropHandler


async def main(url: str, queue: str) -> None:
    client = aioredis.Redis.from_url(url)
    server = Server(RedisBroker(client), InteropHandler(client), concurrency=4,
                    queues={queue: 1}, heartbeat_interval_s=1.0)
    await server.run()
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
