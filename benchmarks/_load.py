"""Load generator for benchmarks/api.py, run as its own process so it does not share the API's
event loop. Prints one JSON line.

  _load.py post URL CONCURRENCY SECONDS   # POST /tasks/echo with valid input
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def post(url: str, concurrency: int, seconds: float) -> None:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url + "/tasks/echo",
                                        json={"name": "bench", "times": 1}) as resp:
                    await resp.read()
                    if resp.status != 202:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    print(json.dumps({
        "requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }))


if __name__ == "__main__":
    if sys.argv[1] != "post":  # SSE followers: benchmarks/ssefollow (Go)
        sys.exit(f"unknown mode {sys.argv[1]!r}: _load.py post URL CONCURRENCY SECONDS")
    asyncio.run(post(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
