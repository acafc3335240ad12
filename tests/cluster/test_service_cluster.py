"""``aqsh serve`` (mode both) on a real Redis Cluster, as an operator runs it: the settings, then
shell tasks on queues that live on three different nodes submitted over HTTP, their logs
followed over SSE, results read back, idempotent submits, cancellation, health and metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.cluster import RedisCluster

from aqsh.errors import ConfigError
from aqsh.redis_process import RedisClusterProcess, free_port
from aqsh.settings import load_settings
from tests.cluster.conftest import PASSWORD
from tests.support import json_log_events, wait_until, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_setting_parses_and_excludes_sentinel() -> None:
    settings = load_settings({"AQSH_REDIS_CLUSTER_ADDRS": "10.0.0.1:7000, redis-b:7001"})
    assert settings.redis_cluster_addrs == ("10.0.0.1:7000", "redis-b:7001")
    with pytest.raises(ConfigError, match="AQSH_REDIS_CLUSTER_ADDRS='redis-a'"):
        load_settings({"AQSH_REDIS_CLUSTER_ADDRS": "redis-a"})
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_settings({"AQSH_REDIS_CLUSTER_ADDRS": "a:7000",
                       "AQSH_REDIS_SENTINEL_ADDRS": "s:26379"})


def test_serve_refuses_cluster_with_sentinel_in_one_line() -> None:
    env = {**os.environ, "AQSH_REDIS_CLUSTER_ADDRS": "127.0.0.1:7000",
           "AQSH_REDIS_SENTINEL_ADDRS": "127.0.0.1:26379"}
    result = subprocess.run([sys.executable, "-m", "aqsh", "serve"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "aqsh: AQSH_REDIS_CLUSTER_ADDRS and AQSH_REDIS_SENTINEL_ADDRS are mutually exclusive: "
        "set one of them")


def test_local_cluster_command_serves_until_sigterm_then_stops_its_nodes() -> None:
    """``python -m aqsh.redis_process cluster``, as the README suggests for trying aqsh."""
    proc = subprocess.Popen([sys.executable, "-m", "aqsh.redis_process", "cluster"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        name, _, value = proc.stdout.readline().strip().partition("=")
        settings = load_settings({name: value})
        assert len(settings.redis_cluster_addrs) == 3
        host, _, port = settings.redis_cluster_addrs[-1].rpartition(":")
        with RedisCluster(host=host, port=int(port)) as client:
            assert client.set("k", "v")
            assert client.get("k") == b"v"
            assert len(client.get_primaries()) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
    for addr in settings.redis_cluster_addrs:
        host, _, port = addr.rpartition(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=1).close()


def tasks_yaml(queues: list[str]) -> str:
    q0, q1, q2 = queues
    return textwrap.dedent(f"""\
        defaults: {{timeout: 1m, max_retry: 0, retry_delay: 1s}}
        tasks:
          echo:
            script: echo.sh
            queue: {q0}
            input:
              - {{name: name, env: NAME, required: true}}
              - {{name: times, env: TIMES, type: int, default: 1}}
          result:
            script: result.sh
            queue: {q1}
          slow:
            script: slow.sh
            queue: {q2}
        """)


SCRIPTS = {
    "echo.sh": 'i=0\nwhile [ $i -lt "$TIMES" ]; do echo "hello $NAME"; i=$((i+1)); done\n',
    "result.sh": 'echo working\nprintf \'{"ok":true}\' > "$AQSH_RESULT_FILE"\n',
    "slow.sh": 'echo started\nexec sleep 300\n',
}


@pytest.fixture(scope="module")
def service(
    redis_cluster: RedisClusterProcess, queues: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cluster-service")
    scripts = root / "scripts"
    scripts.mkdir()
    for name, body in SCRIPTS.items():
        (scripts / name).write_text("#!/bin/sh\n" + body)
        (scripts / name).chmod(0o755)
    (root / "tasks.yaml").write_text(tasks_yaml(queues))
    with RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port,
                      password=PASSWORD) as flusher:
        flusher.flushall()  # what earlier modules left behind
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_CLUSTER_ADDRS": ",".join(redis_cluster.addrs),
           "AQSH_REDIS_PASSWORD": PASSWORD, "AQSH_TASKS_CONFIG": str(root / "tasks.yaml"),
           "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{port}",
           "AQSH_RESULTS_DIR": str(root / "work"), "AQSH_LOG_FORMAT": "json",
           "AQSH_KILL_GRACE": "1s", "AQSH_SHUTDOWN_TIMEOUT": "2s", "AQSH_MODE": "both"}
    log_path = root / "aqsh.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_sync(lambda: _ready(url) or proc.poll() is not None, timeout_s=30,
                            interval_s=0.05, message="aqsh serve up")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "aqsh.stopped" in log
    events = json_log_events(log)
    assert events, log[-3000:]
    assert [e for e in events if e.get("level") == "error"] == [], log[-3000:]


def _ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture
async def http(service: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=service) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, path: str,
               **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, path, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def follow(http: aiohttp.ClientSession, task_id: str) -> list[tuple[str, str]]:
    """SSE events (event, data) of a task's log, up to and including eof."""
    events: list[tuple[str, str]] = []
    event, data = "message", ""
    async with http.get(f"/tasks/{task_id}/logs",
                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif not line and (data or event != "message"):
                events.append((event, data))
                if event == "eof":
                    break
                event, data = "message", ""
    return events


async def state(http: aiohttp.ClientSession, task_id: str) -> str:
    status, body = await call(http, "GET", f"/tasks/{task_id}")
    assert status == 200, body
    return str(body["state"])


async def test_health_says_the_cluster_is_reachable(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "GET", "/health")
    assert status == 200, body
    assert body["redis"]["reachable"] is True


async def test_shell_task_runs_and_its_log_is_followed_over_sse(
    http: aiohttp.ClientSession, queues: list[str]
) -> None:
    status, accepted = await call(http, "POST", "/tasks/echo", json={"name": "ada", "times": 3})
    assert status == 202, accepted
    assert accepted["queue"] == queues[0]
    events = await follow(http, accepted["id"])
    assert events == [("message", "hello ada")] * 3 + [("eof", "0")]
    await wait_until(lambda: _is(http, accepted["id"], "completed"), message="completed")
    _, task = await call(http, "GET", f"/tasks/{accepted['id']}")
    assert task["result"] == {"exit_code": 0}
    assert task["started_at"] is not None
    assert task["finished_at"] is not None
    async with http.get(f"/tasks/{accepted['id']}/logs?follow=false") as resp:
        assert await resp.text() == "hello ada\n" * 3


async def test_idempotent_submit_and_result_on_another_node(
    http: aiohttp.ClientSession, queues: list[str]
) -> None:
    headers = {"Idempotency-Key": "cluster-once"}
    status, first = await call(http, "POST", "/tasks/result", json={}, headers=headers)
    assert status == 202, first
    status, again = await call(http, "POST", "/tasks/result", json={}, headers=headers)
    assert (status, again["id"], again["queue"]) == (202, first["id"], queues[1])
    status, conflict = await call(http, "POST", "/tasks/result?process_in=1h", json={},
                                  headers=headers)
    assert (status, conflict["error"]["code"]) == (409, "idempotency_conflict")
    await wait_until(lambda: _is(http, first["id"], "completed"), message="completed")
    _, task = await call(http, "GET", f"/tasks/{first['id']}")
    assert task["result"] == {"exit_code": 0, "data": '{"ok":true}'}


async def blocked_readers(redis_cluster: RedisClusterProcess) -> int:
    """Clients blocked in XREAD on any node: an SSE follower waiting for new lines."""
    count = 0
    for node in redis_cluster.nodes:
        async with aioredis.Redis(port=node.port, password=PASSWORD) as plain:
            for client in await plain.client_list():
                count += client["cmd"] == "xread" and "b" in client["flags"]
    return count


async def test_cancel_a_running_task_while_its_log_is_followed_live(
    http: aiohttp.ClientSession, queues: list[str], redis_cluster: RedisClusterProcess
) -> None:
    status, running = await call(http, "POST", "/tasks/slow", json={})
    assert (status, running["queue"]) == (202, queues[2])
    await wait_until(lambda: _is(http, running["id"], "active"), message="running")
    follower = asyncio.create_task(follow(http, running["id"]))
    # The follower has replayed what exists and now blocks on the log stream's node.
    await wait_until(lambda: blocked_readers(redis_cluster), message="follower blocked")
    status, body = await call(http, "DELETE", f"/tasks/{running['id']}")
    assert (status, body["state"]) in ((200, "canceled"), (202, "canceling"))
    events = await asyncio.wait_for(follower, 20)
    assert events == [("message", "started"), ("eof", f"-{signal.SIGTERM.value}")]
    await wait_until(lambda: _is(http, running["id"], "canceled"), message="canceled")


async def test_cancel_a_scheduled_task(
    http: aiohttp.ClientSession, queues: list[str]
) -> None:
    status, later = await call(http, "POST", "/tasks/slow?process_in=1h", json={})
    assert (status, later["state"]) == (202, "scheduled")
    status, body = await call(http, "DELETE", f"/tasks/{later['id']}")
    assert (status, body["state"]) == (200, "canceled")
    assert await state(http, later["id"]) == "canceled"


async def test_metrics_report_every_queue_on_every_node(
    http: aiohttp.ClientSession, queues: list[str]
) -> None:
    await call(http, "POST", "/tasks/echo?process_in=1h", json={"name": "later"})
    async with http.get("/metrics") as resp:
        text = await resp.text()
    assert f'asynq_tasks_enqueued_total{{queue="{queues[0]}",state="scheduled"}} 1.0' in text
    for q in queues:
        assert f'asynq_queue_size{{queue="{q}"}}' in text


async def _is(http: aiohttp.ClientSession, task_id: str, wanted: str) -> bool:
    return await state(http, task_id) == wanted
