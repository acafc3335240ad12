"""HTTP API: ``POST /tasks/echo`` (validated input) and ``GET /tasks/{id}`` under ``wrk``, next to
the framework floor (benchmarks/_floor.py: a minimal aiohttp app on the same loop doing the same
JSON parse and 202 answer) in the same run, rounds interleaved; and SSE latency from a script's
echo to the line arriving, with 1 and 500 followers of one task.

    .venv/bin/python benchmarks/api.py [--seconds 5] [--rounds 5] [--pin-redis CORE]

The API process runs as deployed: ``aqsh serve --mode api`` (uvloop, fast-lane enqueues and
lookups), JSON logs at info level (one access log line per request, a submission's task on it)
to /dev/null. ``wrk`` (one thread, so it holds at most one core) is the load generator; a
Python client on the same two cores would measure itself. SSE followers are a Python client
(wrk cannot follow streams).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common
import psutil  # type: ignore[import-untyped]

from aqsh.redis_process import RedisProcess, free_port

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


def wait_live(proc: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{url} did not start")


def start_service(tmp: Path, redis_url: str, mode: str, root: Path = _common.ROOT,
                  **extra_env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_MODE": mode,
           "AQSH_TASKS_CONFIG": str(tmp / "tasks.yaml"), "AQSH_TASKS_DIR": str(tmp),
           "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_LOG_LEVEL": "info",
           "AQSH_LOG_FORMAT": "json", "AQSH_WORKER_CONCURRENCY": "4",
           "PYTHONPATH": str(root), **extra_env}
    proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_live(proc, url + "/health/live")
    return proc, url


def start_floor() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "_floor.py"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_live(proc, url + "/tasks/x")
    return proc, url


def wrk(wrk_bin: str, url: str, connections: int, seconds: float,
        method: str = "POST") -> dict[str, float]:
    out = subprocess.run(
        [wrk_bin, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s",
         "-s", str(HERE / "post.lua"), url],
        env={**os.environ, "WRK_METHOD": method}, check=True, capture_output=True, text=True,
        timeout=seconds + 60)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """CPU seconds of a server process and its children (a supervisor's processes)."""
    root = psutil.Process(proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


#: Lines of the SSE script (one each 50 ms). 120, not 40: one follower's p99 over 40 lines was
#: its second-slowest line, and the 500-over-1 p99 ratio moved by a fifth between runs with it.
SSE_LINES = 120


def sse_load(url: str, task_id: str, clients: int) -> dict[str, float]:
    """``clients`` followers of one task's logs from benchmarks/ssefollow (Go; built on first
    use, or by `make ssefollow`): 500 asyncio followers on the same two cores measured
    mostly themselves."""
    source = HERE / "ssefollow"
    binary = _common.ROOT / ".venv" / "bin" / "aqsh-ssefollow"
    newest = max(p.stat().st_mtime for p in source.iterdir())
    if not binary.exists() or binary.stat().st_mtime < newest:
        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=source, check=True)
    out = subprocess.run([str(binary), "-url", url, "-task", task_id, "-clients", str(clients)],
                         check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def submit(url: str, name: str, body: bytes = b"{}") -> str:
    request = urllib.request.Request(url + f"/tasks/{name}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return str(json.loads(resp.read())["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=_common.MIN_ROUNDS)
    parser.add_argument("--connections", default="1,50")
    parser.add_argument("--pin-redis", type=int, default=None, metavar="CORE",
                        help="pin Redis to this core (taskset)")
    parser.add_argument("--no-sse", action="store_true")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="also load the API served by N processes on one port "
                             "(AQSH_WORKER_PROCESSES; default: the cores; 1 = skip)")
    parser.add_argument("--before", type=Path, default=None, metavar="CHECKOUT",
                        help="also load the API of another checkout (e.g. `git worktree add "
                             "/tmp/before HEAD~1`), interleaved: a before/after in one run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aqsh-api-bench-") as tmp_dir:
        run(Path(tmp_dir), args)


def run(tmp: Path, args: argparse.Namespace) -> None:
    wrk_bin = _common.ensure_wrk()
    (tmp / "tasks.yaml").write_text(TASKS)
    (tmp / "echo.sh").write_text("#!/bin/sh\necho hi\n")
    # Each line is the send time in ns; the first lines wait for followers to attach.
    (tmp / "ticks.sh").write_text(
        f"#!/bin/sh\nsleep 3\nfor i in $(seq 1 {SSE_LINES}); do date +%s%N; sleep 0.05; done\n")
    for script in ("echo.sh", "ticks.sh"):
        (tmp / script).chmod(0o755)
    samples = _common.Samples()
    figures: dict[str, object] = {"seconds": args.seconds, "rounds": args.rounds,
                                  "load_generator": "wrk -t1"}
    errors = 0
    connections = [int(c) for c in args.connections.split(",")]
    with RedisProcess() as redis_proc:
        if args.pin_redis is not None:
            _common.pin(_common.redis_pid(redis_proc), args.pin_redis)
        api, url = start_service(tmp, redis_proc.url, "api")
        floor, floor_url = start_floor()
        servers = [("api", api, url), ("floor", floor, floor_url)]
        if args.processes > 1:
            multi, multi_url = start_service(tmp, redis_proc.url, "api",
                                             AQSH_WORKER_PROCESSES=str(args.processes))
            servers.append((f"api_p{args.processes}", multi, multi_url))
        if args.before is not None:
            before, before_url = start_service(tmp, redis_proc.url, "api", args.before.resolve())
            servers.append(("before", before, before_url))
        try:
            task_id = submit(url, "echo", b'{"name":"bench"}')
            for round_no in range(args.rounds):
                print(f"# round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for c in connections:
                    # Alternate which side goes first so drift favours neither.
                    sides = list(servers)
                    if round_no % 2:
                        sides.reverse()
                    for side, proc, base in sides:
                        cpu0 = cpu_s(proc)
                        r = wrk(wrk_bin, base + "/tasks/echo", c, args.seconds)
                        errors += int(r["errors"])
                        samples.add(f"{side}_post_c{c}_req_per_s", r["req_per_s"])
                        samples.add(f"{side}_post_c{c}_p99_ms", r["p99_ms"])
                        # CPU per request of the server process: steadier than req/s on a
                        # shared machine, and what the request path costs.
                        samples.add(f"{side}_post_c{c}_cpu_us_per_request",
                                    (cpu_s(proc) - cpu0) / r["requests"] * 1e6)
                for side, proc, base in servers:
                    cpu0 = cpu_s(proc)
                    r = wrk(wrk_bin, f"{base}/tasks/{task_id}", 50, args.seconds, "GET")
                    errors += int(r["errors"])
                    samples.add(f"{side}_get_c50_req_per_s", r["req_per_s"])
                    samples.add(f"{side}_get_c50_p99_ms", r["p99_ms"])
                    samples.add(f"{side}_get_c50_cpu_us_per_request",
                                (cpu_s(proc) - cpu0) / r["requests"] * 1e6)
            figures.update(_common.placement(_common.redis_pid(redis_proc), args.pin_redis))
        finally:
            for _, proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)
    figures["http_errors"] = errors
    for c in connections:
        figures[f"post_c{c}_vs_floor_ratio"] = round(
            samples.ratio(f"api_post_c{c}_req_per_s", f"floor_post_c{c}_req_per_s"), 3)
        figures[f"post_c{c}_cpu_vs_floor_ratio"] = round(samples.ratio(
            f"api_post_c{c}_cpu_us_per_request", f"floor_post_c{c}_cpu_us_per_request"), 3)
    figures["get_c50_vs_floor_ratio"] = round(
        samples.ratio("api_get_c50_req_per_s", "floor_get_c50_req_per_s"), 3)
    figures["get_c50_cpu_vs_floor_ratio"] = round(samples.ratio(
        "api_get_c50_cpu_us_per_request", "floor_get_c50_cpu_us_per_request"), 3)
    if args.processes > 1:
        for c in connections:
            figures[f"post_p{args.processes}_c{c}_vs_floor_ratio"] = round(samples.ratio(
                f"api_p{args.processes}_post_c{c}_req_per_s", f"floor_post_c{c}_req_per_s"), 3)
            figures[f"post_p{args.processes}_c{c}_vs_p1_ratio"] = round(samples.ratio(
                f"api_p{args.processes}_post_c{c}_req_per_s", f"api_post_c{c}_req_per_s"), 3)
    if args.before is not None:
        figures["before_checkout"] = str(args.before)
        for c in connections:
            figures[f"post_c{c}_vs_before_ratio"] = round(samples.ratio(
                f"api_post_c{c}_req_per_s", f"before_post_c{c}_req_per_s"), 3)
            figures[f"before_post_c{c}_vs_floor_ratio"] = round(samples.ratio(
                f"before_post_c{c}_req_per_s", f"floor_post_c{c}_req_per_s"), 3)
        figures["get_c50_vs_before_ratio"] = round(
            samples.ratio("api_get_c50_req_per_s", "before_get_c50_req_per_s"), 3)
    if not args.no_sse:
        with RedisProcess() as redis_proc:
            both, url = start_service(tmp, redis_proc.url, "both",
                                      AQSH_LOG_LEVEL="warning")
            try:
                for _ in range(args.rounds):
                    for clients in (1, 500):
                        cpu0 = cpu_s(both)
                        result = sse_load(url, submit(url, "ticks"), clients)
                        # The server's CPU for the whole run (connects, the lines, eof; the
                        # worker's script too): steadier than latency on a shared machine.
                        samples.add(f"sse_{clients}_followers_server_cpu_ms",
                                    (cpu_s(both) - cpu0) * 1000)
                        samples.add(f"sse_{clients}_followers_p50_ms", result["p50_ms"])
                        samples.add(f"sse_{clients}_followers_p99_ms", result["p99_ms"])
                        if result["events"] != clients * SSE_LINES:
                            figures["sse_lost_events"] = int(figures.get(  # type: ignore[call-overload]
                                "sse_lost_events", 0)) + clients * SSE_LINES - int(result["events"])
            finally:
                both.terminate()
                both.wait(timeout=30)
        figures["sse_p99_500_vs_1_ratio"] = round(
            samples.ratio("sse_500_followers_p99_ms", "sse_1_followers_p99_ms"), 2)
    _common.report("api", figures, samples)


if __name__ == "__main__":
    main()
