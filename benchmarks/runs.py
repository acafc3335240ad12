"""GET /runs: the cost of a page of 50 from a history of 1,000,000 runs next to one from 1,000,
same run, same machine.

Two private redis-servers, each with its own ``aqsh serve --mode api``: one holds 1,000 runs,
the other 1,000,000 (stored by aqsh's client, ``enqueue_many`` over the fast lane, so each has
its task hash and its run-index entry as a submission would leave them). Against both, the same
requests, interleaved: the newest page (every type merged), the newest page of one type, and
the tenth page of one type (nine ``next`` cursors followed first). Figures are median
latencies over ``ROUNDS`` requests each; ratios are 1,000,000-run ÷ 1,000-run.

Usage: python benchmarks/runs.py [big_history]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common
import redis.asyncio as aioredis

from aqsh.engine.client import Client, EnqueueRequest
from aqsh.redis_process import RedisProcess, free_port

BIG = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
SMALL = 1_000
ROUNDS = 200
PAGE = 50
TASKS = """\
tasks:
  echo:
    script: echo.sh
    input:
      - {name: name, env: NAME, required: true}
  other:
    script: echo.sh
"""
HEADERS = {"aqsh-allowed-groups": "[]", "aqsh-submitted-by": "bench"}


async def fill(url: str, runs: int) -> None:
    """``runs`` tasks, 9 in 10 of type echo, stored 1,000 per round trip."""
    redis = aioredis.Redis.from_url(url)
    async with Client(redis, fast_lane=True, wake_workers=False) as client:
        for start in range(0, runs, 1000):
            batch = [EnqueueRequest(type="echo" if i % 10 else "other",
                                    payload=b'{"name": "bench"}', headers=HEADERS,
                                    retention=3600)
                     for i in range(start, min(runs, start + 1000))]
            await client.enqueue_many(batch)
    await redis.aclose()


def start_api(tmp: Path, redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_MODE": "api",
           "AQSH_TASKS_CONFIG": str(tmp / "tasks.yaml"), "AQSH_TASKS_DIR": str(tmp),
           "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_LOG_LEVEL": "warning",
           "PYTHONPATH": str(_common.ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health/live", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("aqsh serve did not start")


def get(url: str) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.loads(resp.read())
    return time.perf_counter() - started, body


def tenth_page_cursor(base: str) -> str:
    cursor = ""
    for _ in range(9):
        _, body = get(f"{base}/runs?task=echo&limit={PAGE}" + (f"&cursor={cursor}" if cursor
                                                              else ""))
        cursor = str(body["next"])
    return cursor


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name, RedisProcess() as small_redis, \
            RedisProcess() as big_redis:
        tmp = Path(tmp_name)
        (tmp / "tasks.yaml").write_text(TASKS)
        (tmp / "echo.sh").write_text("#!/bin/sh\necho hi\n")
        (tmp / "echo.sh").chmod(0o755)
        fill_started = time.perf_counter()
        asyncio.run(fill(small_redis.url, SMALL))
        asyncio.run(fill(big_redis.url, BIG))
        fill_s = time.perf_counter() - fill_started
        services = {"small": start_api(tmp, small_redis.url),
                    "big": start_api(tmp, big_redis.url)}
        try:
            cursors = {name: tenth_page_cursor(url) for name, (_, url) in services.items()}
            requests = {
                "newest": lambda url, name: f"{url}/runs?limit={PAGE}",
                "one_type": lambda url, name: f"{url}/runs?task=echo&limit={PAGE}",
                "tenth_page": lambda url, name:
                    f"{url}/runs?task=echo&limit={PAGE}&cursor={cursors[name]}",
            }
            latencies: dict[str, dict[str, list[float]]] = {
                kind: {"small": [], "big": []} for kind in requests}
            for name, (_, url) in services.items():  # warm both up
                for build in requests.values():
                    for _ in range(10):
                        get(build(url, name))
            for _ in range(ROUNDS):
                for kind, build in requests.items():
                    for name, (_, url) in services.items():
                        seconds, body = get(build(url, name))
                        runs = body["runs"]
                        assert isinstance(runs, list), body
                        assert len(runs) == PAGE, body
                        latencies[kind][name].append(seconds)
        finally:
            for proc, _ in services.values():
                proc.terminate()
                proc.wait(timeout=30)
    figures: dict[str, object] = {"small_history": SMALL, "big_history": BIG, "page": PAGE,
                                  "rounds": ROUNDS, "fill_s": round(fill_s, 1)}
    for kind, by_size in latencies.items():
        small_ms = statistics.median(by_size["small"]) * 1000
        big_ms = statistics.median(by_size["big"]) * 1000
        figures[f"{kind}_small_ms"] = round(small_ms, 2)
        figures[f"{kind}_big_ms"] = round(big_ms, 2)
        figures[f"{kind}_ratio"] = round(big_ms / small_ms, 2)
        print(f"{kind:>10}: page of {PAGE} from {SMALL:,} runs {small_ms:6.2f} ms, "
              f"from {BIG:,} runs {big_ms:6.2f} ms, ratio {big_ms / small_ms:.2f} "
              f"(target <= 2)")
    _common.report("runs", figures)


if __name__ == "__main__":
    main()
