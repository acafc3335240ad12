"""Load generator for benchmarks/api.py, run as its own process so it does not share the API's
event loop. Prints one JSON line.

  _load.py post URL CONCURRENCY SECONDS   # POST /tasks/echo with valid input
  _load.py sse URL TASK_ID CLIENTS        # follow one task's logs; lines carry send times (ns)
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


async def sse(url: str, task_id: str, clients: int) -> None:
    latencies: list[float] = []
    failures: list[str] = []
    complete = 0
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def follow() -> None:
            nonlocal complete
            try:
                async with session.get(f"{url}/tasks/{task_id}/logs") as resp:
                    event = None
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            if event == "eof":
                                complete += 1
                                return
                            sent = int(line[5:].strip())
                            latencies.append((time.time_ns() - sent) / 1e6)
            except (aiohttp.ClientError, ValueError) as exc:
                failures.append(repr(exc))

        await asyncio.gather(*(follow() for _ in range(clients)))
    latencies.sort()
    print(json.dumps({"clients": clients, "events": len(latencies), "complete": complete,
                      "failures": len(failures), "first_failure": failures[:1],
                      "p50_ms": latencies[len(latencies) // 2],
                      "p99_ms": latencies[int(len(latencies) * 0.99)]}))


if __name__ == "__main__":
    if sys.argv[1] == "post":
        asyncio.run(post(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    else:
        asyncio.run(sse(sys.argv[2], sys.argv[3], int(sys.argv[4])))
