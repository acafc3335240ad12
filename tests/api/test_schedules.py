"""Schedules end to end: ``aqsh serve`` (two replicas on one Redis) runs a tasks.yaml schedule
once per fire, the task reads like a submitted one, the catalogue shows the schedule, and a
SIGHUP reload that drops the schedule withdraws it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from aqsh.engine import keys, wire
from aqsh.redis_process import free_port
from tests.api.conftest import SCRIPTS, TASKS_YAML, write_tasks
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
SCHEDULED = TASKS_YAML + """\
  tick:
    script: echo.sh
    input:
      - {name: name, env: NAME, required: true}
      - {name: times, env: TIMES, type: int, default: 1}
    schedules:
      - cron: "@every 1s"
        input: {name: cron}
"""


async def start(tmp_path: Path, redis_url: str, config: Path, scripts: Path,
                replica: int) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_TASKS_CONFIG": str(config),
           "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{port}",
           "AQSH_MODE": "both", "AQSH_LOG_FORMAT": "json",
           "AQSH_RESULTS_DIR": str(tmp_path / f"work{replica}")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aqsh", "serve", cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


async def test_a_schedule_runs_once_per_fire_across_replicas(
    tmp_path: Path, redis: aioredis.Redis, redis_url: str
) -> None:
    config, scripts = write_tasks(tmp_path)
    assert set(SCRIPTS) <= {p.name for p in scripts.iterdir()}
    config.write_text(SCHEDULED)
    replicas = [await start(tmp_path, redis_url, config, scripts, n) for n in range(2)]
    base = replicas[0][1]
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str, url: str = base) -> Any:
                try:
                    async with session.get(url + path) as resp:
                        return await resp.json(content_type=None)
                except aiohttp.ClientConnectionError:
                    return None

            async def all_up() -> bool:
                return all([await get("/health/live", url) for _, url in replicas])

            await wait_until(all_up, timeout_s=30, interval_s=0.1, message="replicas up")
            catalogue = await get("/tasks")
            [tick] = [t for t in catalogue["tasks"] if t["name"] == "tick"]
            [schedule] = tick["schedules"]
            assert (schedule["cron"], schedule["input"]) == ("@every 1s",
                                                            {"name": "cron", "times": 1})
            assert schedule["next_run_at"].endswith("Z")

            history_ids: set[str] = set()

            async def three_fires() -> bool:
                for key in await redis.keys("asynq:scheduler_history:*"):
                    for raw in await redis.zrange(key, 0, -1):
                        history_ids.add(wire.decode_enqueue_event(raw).task_id)
                return len(history_ids) >= 3

            await wait_until(three_fires, timeout_s=20, interval_s=0.1, message="3 fires")
            # Both replicas announce the entry, but each fire was stored once.
            assert await redis.zcard(keys.ALL_SCHEDULERS) == 2
            fire_times = [task_id.rsplit("-", 1)[1] for task_id in history_ids]
            assert len(fire_times) == len(set(fire_times))
            task_id = sorted(history_ids)[0]

            async def completed() -> Any:
                task = await get(f"/tasks/{task_id}")
                return task if task and task.get("state") == "completed" else None

            task = await wait_until(completed, timeout_s=15, interval_s=0.1, message="done")
            assert (task["name"], task["input"], task["submitted_by"]) == (
                "tick", {"name": "cron", "times": 1}, "aqsh-scheduler")
            assert task["enqueued_at"] is not None
            async with session.get(f"{base}/tasks/{task_id}/logs") as resp:
                assert "hello cron" in await resp.text()
            stored = 0.0
            for _, url in replicas:  # every fire stored by exactly one replica, and counted
                async with session.get(url + "/metrics") as resp:
                    for line in (await resp.text()).splitlines():
                        if line.startswith('aqsh_schedule_fires_total{outcome="stored"'):
                            stored += float(line.rsplit(" ", 1)[1])
            assert stored >= 3

            # Reload without the schedule: both replicas withdraw the entry.
            config.write_text(TASKS_YAML)
            for proc, _ in replicas:
                proc.send_signal(signal.SIGHUP)

            async def withdrawn() -> bool:
                keys_ = await redis.zrange(keys.ALL_SCHEDULERS, 0, -1)
                lengths = [await redis.llen(k) for k in keys_]
                return len(keys_) == 2 and lengths == [0, 0]

            await wait_until(withdrawn, timeout_s=15, interval_s=0.1, message="withdrawn")
    finally:
        for proc, _ in replicas:
            proc.send_signal(signal.SIGTERM)
        outputs = [await asyncio.wait_for(proc.communicate(), 30) for proc, _ in replicas]
    for (proc, _), (_, stderr) in zip(replicas, outputs, strict=True):
        assert proc.returncode == 0, stderr[-2000:]
        assert b'"scheduler.enqueue_failed"' not in stderr
    # Stopped schedulers take their announcements with them.
    assert await redis.zcard(keys.ALL_SCHEDULERS) == 0
