"""HTTP API: POST /tasks/{name} with validation at 1 and 50 concurrent connections for 20 s from
a separate load-generator process, next to the same number of direct Client.enqueue calls in
the same run (API overhead ratio) and the same API process on the standard asyncio loop instead
of uvloop (``AQSH_EVENT_LOOP=asyncio``); and SSE latency from a script's echo to the line
arriving at 1 and 500 clients following the same task.

Usage: python benchmarks/api.py [seconds]
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common
import redis.asyncio as aioredis

from aqsh.engine.client import Client
from aqsh.redis_process import RedisProcess, free_port

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
HERE = Path(__file__).resolve().parent

TASKS = """\
tasks:
  echo:
    script: echo.sh
    input:
      - {name: name, env: NAME, required: true, pattern: '[a-z]+'}
      - {name: times, env: TIMES, type: int, min: 1, max: 5, default: 1}
  ticks:
    script: ticks.sh
"""


def start_service(tmp: Path, redis_url: str, mode: str,
                  event_loop: str = "auto") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_MODE": mode,
           "AQSH_EVENT_LOOP": event_loop,
           "AQSH_TASKS_CONFIG": str(tmp / "tasks.yaml"), "AQSH_TASKS_DIR": str(tmp),
           "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_LOG_LEVEL": "warning",
           "AQSH_WORKER_CONCURRENCY": "4", "PYTHONPATH": str(_common.ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health/live", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("service did not start")


def load(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(HERE / "_load.py"), *args], check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def direct_rate(redis_url: str, count: int, concurrency: int) -> float:
    redis = aioredis.Redis.from_url(redis_url, max_connections=64)
    client = Client(redis, fast_lane=True)  # as the API process's client
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.enqueue("echo", b'{"name":"bench","times":1}', timeout=60,
                                 retention=3600)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.aclose()
    await redis.aclose()
    return count / elapsed


def submit(url: str, name: str) -> str:
    request = urllib.request.Request(url + f"/tasks/{name}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return str(json.loads(resp.read())["id"])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="aqsh-api-bench-") as tmp_dir:
        run(Path(tmp_dir))


def run(tmp: Path) -> None:
    (tmp / "tasks.yaml").write_text(TASKS)
    (tmp / "echo.sh").write_text("#!/bin/sh\necho hi\n")
    # Each line is the send time in ns; the first lines wait for followers to attach.
    (tmp / "ticks.sh").write_text(
        "#!/bin/sh\nsleep 3\nfor i in $(seq 1 40); do date +%s%N; sleep 0.05; done\n")
    for script in ("echo.sh", "ticks.sh"):
        (tmp / script).chmod(0o755)
    figures: dict[str, float] = {}
    with RedisProcess() as redis_proc:
        # The API process as deployed (mode api: uvloop) and the same process on the standard
        # loop, loaded one after the other in the same run.
        api, url = start_service(tmp, redis_proc.url, "api")
        api_std, url_std = start_service(tmp, redis_proc.url, "api", event_loop="asyncio")
        try:
            for concurrency in (1, 50):
                result = load("post", url, str(concurrency), str(SECONDS))
                std = load("post", url_std, str(concurrency), str(SECONDS))
                direct = asyncio.run(direct_rate(redis_proc.url, int(result["requests"]),
                                                 concurrency))
                figures[f"api_c{concurrency}_req_per_s"] = result["req_per_s"]
                figures[f"api_c{concurrency}_p50_ms"] = result["p50_ms"]
                figures[f"api_c{concurrency}_p99_ms"] = result["p99_ms"]
                figures[f"api_c{concurrency}_errors"] = result["errors"] + std["errors"]
                figures[f"api_asyncio_c{concurrency}_req_per_s"] = std["req_per_s"]
                figures[f"api_asyncio_c{concurrency}_p50_ms"] = std["p50_ms"]
                figures[f"direct_c{concurrency}_enqueue_per_s"] = direct
                figures[f"api_vs_direct_c{concurrency}_ratio"] = result["req_per_s"] / direct
                figures[f"uvloop_vs_asyncio_c{concurrency}_ratio"] = (
                    result["req_per_s"] / std["req_per_s"])
        finally:
            for proc in (api, api_std):
                proc.terminate()
                proc.wait(timeout=30)
    with RedisProcess() as redis_proc:
        both, url = start_service(tmp, redis_proc.url, "both")
        try:
            for clients in (1, 500):
                task_id = submit(url, "ticks")
                result = load("sse", url, task_id, str(clients))
                figures[f"sse_{clients}_clients_p50_ms"] = result["p50_ms"]
                figures[f"sse_{clients}_clients_p99_ms"] = result["p99_ms"]
                figures[f"sse_{clients}_clients_events"] = result["events"]
            figures["sse_p99_500_vs_1_ratio"] = (figures["sse_500_clients_p99_ms"]
                                                 / figures["sse_1_clients_p99_ms"])
        finally:
            both.terminate()
            both.wait(timeout=30)
    _common.report("api", {"seconds": SECONDS, **{k: round(v, 3) for k, v in figures.items()}})


if __name__ == "__main__":
    main()
