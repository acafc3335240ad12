"""``aqsh serve --processes N`` (AQSH_WORKER_PROCESSES): N real worker processes under one
supervisor, on a real Redis, running real scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import redis as sync_redis
import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.errors import ConfigError
from aqsh.redis_process import free_port
from aqsh.settings import load_settings
from tests.support import wait_until_sync

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0  # a loaded 2-core machine starts Python processes slowly


def test_processes_setting_parses_auto_and_rejects_zero() -> None:
    assert load_settings({"AQSH_LOG_FORMAT": "json"}).worker_processes == 1
    auto = load_settings({"AQSH_WORKER_PROCESSES": "auto", "AQSH_LOG_FORMAT": "json"})
    assert auto.worker_processes == len(os.sched_getaffinity(0))
    assert load_settings({"AQSH_WORKER_PROCESSES": "3"}).worker_processes == 3
    with pytest.raises(ConfigError, match="a positive integer or auto"):
        load_settings({"AQSH_WORKER_PROCESSES": "0"})


class Pod:
    """One ``aqsh serve --mode worker --processes 2`` and what it wrote."""

    def __init__(self, tmp: Path, redis_url: str, processes: int = 2) -> None:
        self.tmp = tmp
        self.url = redis_url
        self.redis = sync_redis.Redis.from_url(redis_url)
        self.redis.flushall()
        self.ran = tmp / "ran"
        (tmp / "tasks.yaml").write_text(
            "tasks:\n"
            "  who:\n    script: who.sh\n"
            "  slow:\n    script: slow.sh\n    timeout: 60s\n")
        # $PPID of the script is the worker child that spawned it.
        (tmp / "who.sh").write_text(f"#!/bin/sh\nsleep 0.3\necho $PPID >> {self.ran}\n")
        (tmp / "slow.sh").write_text(
            f"#!/bin/sh\necho start >> {tmp / 'slow'}\nsleep 3\necho done >> {tmp / 'slow'}\n")
        for script in ("who.sh", "slow.sh"):
            (tmp / script).chmod(0o755)
        env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_MODE": "worker",
               "AQSH_TASKS_CONFIG": str(tmp / "tasks.yaml"), "AQSH_TASKS_DIR": str(tmp),
               "AQSH_RESULTS_DIR": str(tmp / "work"), "AQSH_BIND": f"127.0.0.1:{free_port()}",
               "AQSH_WORKER_CONCURRENCY": "1", "AQSH_LOG_FORMAT": "json",
               "AQSH_SHUTDOWN_TIMEOUT": "30s", "PYTHONPATH": str(ROOT)}
        self.log = tmp / "stderr.log"
        with self.log.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aqsh", "serve", "--processes", str(processes)],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
        self.supervisor = psutil.Process(self.proc.pid)

    def children(self) -> set[int]:
        return {c.pid for c in alive(self.supervisor.children())}

    def server_pids(self) -> set[int]:
        """Pids of the live asynq servers registered in Redis (one per worker process)."""
        members = self.redis.zrange(keys.ALL_SERVERS, 0, -1)
        return {int(m.decode().rsplit("{", 1)[1].split(":")[1]) for m in members}

    def wait_serving(self, count: int) -> set[int]:
        def ready() -> set[int] | None:
            kids = self.children()
            return kids if len(kids) == count and self.server_pids() == kids else None

        return wait_until_sync(ready, DEADLINE_S, 0.05, f"{count} children heartbeating")

    def enqueue(self, name: str, n: int) -> None:
        async def go() -> None:
            client = aioredis.Redis.from_url(self.url)
            await Client(client).enqueue_many(
                [EnqueueRequest(type=name, payload=b"{}", queue="default") for _ in range(n)])
            await client.aclose()

        asyncio.run(go())

    def lines(self, name: str) -> list[str]:
        path = self.tmp / name
        return path.read_text().split() if path.exists() else []

    def descendants(self) -> list[psutil.Process]:
        return self.supervisor.children(recursive=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.redis.close()


@pytest.fixture
def pod(tmp_path: Path, redis_url: str) -> Iterator[Pod]:
    started = Pod(tmp_path, redis_url)
    leftovers: list[psutil.Process] = []
    try:
        yield started
    finally:
        if started.proc.poll() is None:
            leftovers = started.descendants()
        started.close()
        for proc in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_each_child_is_a_worker_with_its_own_server_and_serves_tasks(pod: Pod) -> None:
    children = pod.wait_serving(2)
    pod.enqueue("who", 20)
    wait_until_sync(lambda: len(pod.lines("ran")) == 20, DEADLINE_S, 0.05, "20 tasks run")
    ran_by = {int(pid) for pid in pod.lines("ran")}
    assert ran_by <= children
    # Both are woken by the enqueue; and one child at concurrency 1 would need 20 × 0.3 s,
    # while the other polls at least every 1.25 s when idle: both take part.
    assert ran_by == children


def test_a_killed_child_is_replaced(pod: Pod) -> None:
    children = pod.wait_serving(2)
    victim = min(children)
    os.kill(victim, signal.SIGKILL)

    def replacement() -> set[int] | None:
        kids = pod.children()
        return kids if len(kids) == 2 and victim not in kids else None

    replaced = wait_until_sync(replacement, DEADLINE_S, 0.05, "a replacement child")
    assert len(replaced & children) == 1
    # The replacement is a full worker: it heartbeats as a server of its own and runs tasks.
    wait_until_sync(lambda: replaced <= pod.server_pids(), DEADLINE_S, 0.05, "its heartbeat")
    pod.enqueue("who", 4)
    wait_until_sync(lambda: len(pod.lines("ran")) == 4, DEADLINE_S, 0.05, "tasks run")
    assert pod.proc.poll() is None


def test_sigterm_drains_every_child_and_leaves_no_orphan(pod: Pod) -> None:
    pod.wait_serving(2)
    pod.enqueue("slow", 2)
    # Concurrency 1 per child: both scripts running means one in each child.
    wait_until_sync(lambda: len(pod.lines("slow")) == 2, DEADLINE_S, 0.05, "2 scripts started")
    everyone = pod.descendants()  # the children, their keepers and the scripts
    assert len(everyone) >= 4
    pod.proc.send_signal(signal.SIGTERM)
    assert pod.proc.wait(timeout=DEADLINE_S) == 0, pod.log.read_text()
    # Drained, not killed: both scripts finished before their workers exited.
    assert pod.lines("slow").count("done") == 2
    wait_until_sync(lambda: not alive(everyone), DEADLINE_S, 0.05, "no process left")
    assert pod.server_pids() == set()  # every child unregistered its server


def test_children_follow_a_supervisor_killed_outright(pod: Pod) -> None:
    children = pod.wait_serving(2)
    procs = [psutil.Process(pid) for pid in children]
    pod.proc.kill()
    pod.proc.wait(timeout=30)
    # PR_SET_PDEATHSIG: each child got SIGTERM and stopped as in a normal drain.
    wait_until_sync(lambda: not alive(procs), DEADLINE_S, 0.05, "children gone")
