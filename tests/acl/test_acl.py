"""Least privilege: real ``aqsh serve`` processes as Redis ACL users with exactly the rights the
README documents (``DEPLOYMENT_ACL``), on whichever server the run uses (6.2, 7.x, Valkey).

Every feature must work under that ACL with Redis refusing nothing (its ACL LOG stays empty but
for redis-py's optional CLIENT SETINFO); a Go-compatible ACL without aqsh's wake-up channel must
cost latency only; and a user missing one right must show it where an operator looks —
``/health/ready`` naming ``noperm`` — and get 503s, never a 500, from the API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from aqsh.redis_process import RedisProcess, free_port
from tests.api.conftest import write_tasks
from tests.api.test_service import http, sse_to_eof
from tests.support import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]

#: The README's ACL for aqsh (API and workers alike): aqsh's key prefixes (asynq's layout, the
#: log streams and their ``{logs:<id>}:meta`` hashes, the API's ``aqsh:idem:`` records), the
#: two channels, and the commands aqsh sends or its Lua scripts call.
DEPLOYMENT_ACL = (
    "resetkeys ~asynq:* ~aqsh:* ~logs:* ~{logs:* "
    "resetchannels &asynq:cancel &aqsh:wake "
    "-@all +ping +time +evalsha +script|load +publish +subscribe +unsubscribe "
    "+exists +get +set +setex +setnx +del +incr +expire +expireat "
    "+hget +hmget +hgetall +hset +hsetnx +hdel "
    "+lpush +rpush +lrange +llen +lpos +lrem +rpoplpush "
    "+sadd +srem +smembers +sismember "
    "+zadd +zrem +zcard +zscore +zrange +zrevrange +zrangebyscore +zremrangebyscore "
    "+zremrangebyrank "
    "+xadd +xread +xrange +xrevrange +memory|usage"
)
#: What a Go asynq deployment's ACL grants: asynq's channel only.
GO_COMPATIBLE_ACL = DEPLOYMENT_ACL.replace(" &aqsh:wake", "")
#: redis-py announces itself with CLIENT SETINFO and ignores a refusal; Redis 7.0 has no such
#: command, so the ACL cannot name it everywhere. Nothing else may appear in the ACL LOG.
IGNORED_REFUSALS = {b"client|setinfo", b"client"}


@dataclass
class Deployment:
    redis: RedisProcess
    admin: redis.Redis
    tmp: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def user(self, name: str, acl: str) -> str:
        """A Redis user with ``acl``; returns the URL aqsh connects with."""
        self.admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *acl.split())
        return self.redis.url.replace("redis://", f"redis://{name}:pw@")

    def serve(self, mode: str, url: str) -> str:
        config, scripts = write_tasks(self.tmp)
        port = free_port()
        env = {**os.environ, "AQSH_REDIS_ADDR": url, "AQSH_TASKS_CONFIG": str(config),
               "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{port}",
               "AQSH_MODE": mode, "AQSH_LOG_FORMAT": "json",
               "AQSH_RESULTS_DIR": str(self.tmp / "work")}
        self.logs[mode] = self.tmp / f"{mode}.log"
        with self.logs[mode].open("w") as log_file:
            self.procs[mode] = subprocess.Popen(
                [sys.executable, "-m", "aqsh", "serve"], cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        self.urls[mode] = f"http://127.0.0.1:{port}"
        wait_until_sync(lambda: http("GET", self.urls[mode] + "/health/live")[0] == 200,
                        timeout_s=30, interval_s=0.1, message=f"{mode} up")
        return self.urls[mode]

    def events(self, mode: str, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.logs[mode].read_text().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found

    def refusals(self) -> list[dict[bytes, Any]]:
        entries: list[dict[bytes, Any]] = self.admin.execute_command("ACL", "LOG")
        return [e for e in entries if e[b"object"] not in IGNORED_REFUSALS]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for mode, proc in self.procs.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.returncode == 0, self.logs[mode].read_text()[-2000:]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A private Redis: ACL users and the ACL LOG are server-wide state."""
    with RedisProcess() as server:
        admin = redis.Redis(port=server.port, socket_timeout=10)
        found = Deployment(server, admin, tmp_path)
        try:
            yield found
        finally:
            found.stop()
            admin.close()


def ready(url: str) -> tuple[int, Any]:
    return http("GET", url + "/health/ready")


def run_echo(api: str, name: str) -> dict[str, Any]:
    status, accepted = http("POST", api + "/tasks/echo", {"name": name, "times": 2})
    assert status == 202, accepted
    assert sse_to_eof(f"{api}/tasks/{accepted['id']}/logs") == [f"hello {name}"] * 2 + ["eof:0"]
    _, task = http("GET", f"{api}/tasks/{accepted['id']}")
    assert (task["state"], task["result"]["exit_code"]) == ("completed", 0), task
    return task


def test_every_feature_works_under_the_documented_acl(deployment: Deployment) -> None:
    """The split deployment (API and worker as separate users, the same ACL): submit, follow
    logs live, read state and result, list, cancel a running script, health, metrics, the
    scheduler's loops — and Redis refused nothing."""
    api = deployment.serve("api", deployment.user("aqsh-api", DEPLOYMENT_ACL))
    worker = deployment.serve("worker", deployment.user("aqsh-worker", DEPLOYMENT_ACL))
    for url in (api, worker):
        wait_until_sync(lambda u=url: ready(u)[0] == 200, timeout_s=30, interval_s=0.1,
                        message="ready")
    run_echo(api, "acl")
    status, accepted = http("POST", api + "/tasks/result", {})
    assert status == 202, accepted

    def finished() -> Any:
        _, task = http("GET", f"{api}/tasks/{accepted['id']}")
        return task if task and task["state"] == "completed" else None

    task = wait_until_sync(finished, timeout_s=30, interval_s=0.1, message="result")
    assert json.loads(task["result"]["data"]) == {"ok": True}
    status, listing = http("GET", api + "/tasks?state=completed")
    assert status == 200, listing
    _, slow = http("POST", api + "/tasks/slow", {})

    def cancel_once_started(lines: list[str]) -> None:
        if lines == ["started"]:
            assert http("DELETE", f"{api}/tasks/{slow['id']}")[0] in (200, 202)

    assert sse_to_eof(f"{api}/tasks/{slow['id']}/logs", cancel_once_started) == [
        "started", "eof:-15"]
    with urllib.request.urlopen(api + "/metrics", timeout=10) as resp:
        assert resp.status == 200
    for url in (api, worker):
        status, body = ready(url)
        assert status == 200, body
    assert "scheduler" in ready(worker)[1]["loops"]
    assert deployment.refusals() == []
    assert deployment.events("api", "wakeup.refused") == []


def test_an_acl_without_the_wake_channel_costs_latency_not_service(
    deployment: Deployment,
) -> None:
    """A Go asynq deployment's ACL has ``&asynq:cancel`` only. Enqueues succeed anyway (the
    refused wake-up is told once, then not sent again), the worker polls, and stays ready."""
    url = deployment.user("aqsh", GO_COMPATIBLE_ACL)
    both = deployment.serve("both", url)
    for name in ("one", "two", "three"):
        run_echo(both, name)
    status, body = ready(both)
    assert status == 200, body
    assert "wake-subscriber" not in body["loops"]
    refused = deployment.events("both", "wakeup.refused")
    assert len(refused) == 1, refused
    assert "aqsh:wake" in refused[0]["hint"]
    # Once per engine server in the process (the script worker and the webhook deliverer),
    # not once per resubscription attempt.
    assert len(deployment.events("both", "wakeup.subscribe_refused")) in (1, 2)
    # The one refused PUBLISH (inside the first enqueue) and the refused SUBSCRIBE(s): no more.
    channels = [e for e in deployment.refusals() if e[b"reason"] == b"channel"]
    assert {e[b"object"] for e in channels} == {b"aqsh:wake"}
    assert all(e[b"reason"] == b"channel" for e in deployment.refusals())


@pytest.mark.parametrize(("missing", "acl", "loop"), [
    ("the cancel channel", DEPLOYMENT_ACL.replace(" &asynq:cancel", ""), "cancel-subscriber"),
    ("EVALSHA", DEPLOYMENT_ACL.replace(" +evalsha", ""), "fetcher"),
    ("asynq's keys", DEPLOYMENT_ACL.replace(" ~asynq:*", ""), "fetcher"),
])
def test_a_missing_right_shows_in_readiness_and_as_503s(
    deployment: Deployment, missing: str, acl: str, loop: str,
) -> None:
    both = deployment.serve("both", deployment.user("aqsh", acl))

    def failing() -> Any:
        status, body = ready(both)
        entry = body["loops"].get(loop, {}) if status == 503 else {}
        return entry.get("not_ready", "").startswith("failing: noperm") and body

    body = wait_until_sync(failing, timeout_s=30, interval_s=0.1, message=f"{loop} noperm")
    assert body["status"] == "loops failing", body
    if loop == "fetcher":  # the API refuses submissions as unavailable, with an error id
        status, refused = http("POST", both + "/tasks/echo", {"name": "x"})
        assert (status, refused["error"]["code"]) == (503, "redis_error"), refused
