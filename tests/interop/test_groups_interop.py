"""Issue-14 interop: asynq group aggregation between aqsh and the real Go asynq library, both
ways, plus a Go task's own timeout reported as such by a shell worker."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.config_holder import ConfigHolder
from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task
from aqsh.runner.batches import check_interval_s, shell_aggregator, shell_group_settings
from aqsh.runner.handler import RunnerSettings, ShellRunner, shell_retry_delay
from tests.api.conftest import write_tasks
from tests.interop.harness import InteropHandler, go, go_background, seen
from tests.support import wait_until

Q = keys.queue_keys("default")


def joined(group: str, tasks: list[Task]) -> EnqueueRequest:
    """The aqsh twin of the Go harness's aggregator."""
    return EnqueueRequest(type=f"batch:{group}", payload=b",".join(t.payload for t in tasks),
                          max_retry=0)


@pytest.fixture
def go_servers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
async def aqsh_client(redis: aioredis.Redis) -> AsyncIterator[Client]:
    async with Client(redis) as client:
        yield client


async def batches(redis: aioredis.Redis, server: str) -> list[dict[str, Any]]:
    return [r for r in await seen(redis) if r["type"].startswith("batch:")
            and r["server"] == server]


async def test_go_grouped_tasks_are_aggregated_by_an_aqsh_server(
    redis: aioredis.Redis, redis_url: str
) -> None:
    specs = [{"type": "email", "payload": p, "group": "daily"} for p in ("a", "b", "c")]
    specs.append({"type": "email", "payload": "z", "group": "weekly"})
    ids = [r["id"] for r in go("enqueue", redis_url, stdin=specs)]
    assert go("groups", redis_url, "-queue", "default") == {"daily": 3, "weekly": 1}
    assert {go("inspect", redis_url, "-queue", "default", "-id", i)["state"]
            for i in ids} == {"aggregating"}

    server = Server(RedisBroker(redis), InteropHandler(redis), queues={"default": 1},
                    group_aggregator=joined, group_grace_period_s=1,
                    aggregation_interval_s=0.2)
    await server.start()
    try:
        await wait_until(lambda: _count(batches(redis, "aqsh"), 2), timeout_s=30,
                         message="both groups aggregated and run by aqsh")
    finally:
        await server.stop()
    done = {r["type"]: sorted(r["payload"].split(",")) for r in await batches(redis, "aqsh")}
    assert done == {"batch:daily": ["a", "b", "c"], "batch:weekly": ["z"]}
    assert go("groups", redis_url, "-queue", "default") == {}
    for task_id in ids:  # the grouped tasks are gone, as after a Go aggregation
        assert "error" in go("inspect", redis_url, "-queue", "default", "-id", task_id)
    info = go("queue-info", redis_url, "-queue", "default")
    assert (info["aggregating"], info["groups"], info["processed"]) == (0, 0, 2)


async def test_aqsh_grouped_tasks_are_aggregated_by_a_go_server(
    redis: aioredis.Redis, redis_url: str, aqsh_client: Client,
    go_servers: list[subprocess.Popen[str]],
) -> None:
    ids = [(await aqsh_client.enqueue("email", p, group="nightly")).id for p in (b"1", b"2")]
    ids.append((await aqsh_client.enqueue("email", b"3", group="nightly", unique_ttl=600)).id)
    for task_id in ids:
        theirs = go("inspect", redis_url, "-queue", "default", "-id", task_id)
        assert (theirs["state"], theirs["group"]) == ("aggregating", "nightly")
    assert go("groups", redis_url, "-queue", "default") == {"nightly": 3}

    go_servers.append(go_background("serve", redis_url, "-group-grace", "1s",
                                    "-duration", "60s"))
    await wait_until(lambda: _count(batches(redis, "go"), 1), timeout_s=30,
                     message="the Go server aggregated and ran the group")
    [record] = await batches(redis, "go")
    assert record["type"] == "batch:nightly"
    assert sorted(record["payload"].split(",")) == ["1", "2", "3"]
    assert await redis.exists(*[Q.task(i) for i in ids]) == 0
    assert await redis.scard(Q.groups) == 0


async def test_a_stale_aqsh_aggregation_set_is_reclaimed_by_a_go_recoverer(
    redis: aioredis.Redis, redis_url: str, aqsh_client: Client,
    go_servers: list[subprocess.Popen[str]],
) -> None:
    """The set's key is what Go's reclaim script parses to find the group again."""
    broker = RedisBroker(redis)
    for payload in (b"x", b"y"):
        await aqsh_client.enqueue("email", payload, group="g")
    # A set made (full at max size 2) long ago by an aggregator that died: its deadline has
    # passed.
    set_id = await broker.aggregation_check("default", "g", now_s=int(time.time()) - 300,
                                            grace_period_s=3600, max_delay_s=0, max_size=2)
    assert set_id is not None
    assert await redis.zcard(Q.group("g")) == 0

    go_servers.append(go_background("serve", redis_url, "-group-grace", "1s",
                                    "-duration", "60s"))
    await wait_until(lambda: _zero(redis.zcard(Q.aggregation_sets)), timeout_s=30,
                     message="the Go recoverer reclaimed the set")
    assert await redis.zcard(Q.group("g")) == 2
    # asynq quirk Q5: the group is seen again once another task joins it.
    await aqsh_client.enqueue("email", b"z", group="g")
    await wait_until(lambda: _count(batches(redis, "go"), 1), timeout_s=30,
                     message="the Go server aggregated all three")
    [record] = await batches(redis, "go")
    assert sorted(record["payload"].split(",")) == ["x", "y", "z"]


async def test_a_go_timeout_that_fires_is_reported_as_the_tasks_own(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config_path, scripts = write_tasks(tmp_path)  # "slow" sleeps 300 s; tasks.yaml: 1 min
    config = ConfigHolder(str(config_path), str(scripts))
    runner = ShellRunner(config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    server = Server(RedisBroker(redis), runner, queues={"default": 1},
                    retry_delay=shell_retry_delay(config))
    [enqueued] = go("enqueue", redis_url, stdin=[
        {"type": "slow", "payload": json.dumps({}), "timeout_s": 2, "max_retry": 0}])
    await server.start()
    try:
        await wait_until(lambda: redis.zscore(Q.archived, enqueued["id"]), timeout_s=30,
                         message="timed out and archived")
    finally:
        await server.stop()
    theirs = go("inspect", redis_url, "-queue", "default", "-id", enqueued["id"])
    assert theirs["last_err"].startswith("context deadline exceeded: the task's own timeout")
    assert "1m" not in theirs["last_err"]
    assert "60s" not in theirs["last_err"]


async def test_go_grouped_runs_of_a_shell_batch_task_run_as_one_batch(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> None:
    yaml = ("tasks:\n  notify:\n    script: batch.sh\n    aggregate: {grace: 1s}\n"
            "    input:\n      - {name: who, env: WHO, required: true}\n")
    config_path, scripts = write_tasks(tmp_path, yaml)
    out = tmp_path / "batch.out"
    (scripts / "batch.sh").write_text(f'#!/bin/sh\ncat "$AQSH_BATCH_FILE" > "{out}"\n')
    (scripts / "batch.sh").chmod(0o755)
    config = ConfigHolder(str(config_path), str(scripts))
    runner = ShellRunner(config, redis, RunnerSettings(work_root=str(tmp_path / "w")))
    server = Server(RedisBroker(redis), runner, queues={"default": 1},
                    retry_delay=shell_retry_delay(config),
                    group_aggregator=shell_aggregator(config, result_retention_s=600),
                    group_settings=shell_group_settings(config),
                    aggregation_interval_s=check_interval_s(config.current))
    specs = [{"type": "notify", "payload": json.dumps({"who": w}), "group": "notify/eu"}
             for w in ("ann", "bo")]
    go("enqueue", redis_url, stdin=specs)
    await server.start()
    try:
        await wait_until(lambda: _count(_completed(redis), 1), timeout_s=30,
                         message="the batch ran")
    finally:
        await server.stop()
    assert sorted(json.loads(line)["who"] for line in out.read_text().splitlines()) == [
        "ann", "bo"]
    [batch_id] = await _completed(redis)
    theirs = go("inspect", redis_url, "-queue", "default", "-id", batch_id)
    assert (theirs["type"], theirs["state"]) == ("notify", "completed")
    assert theirs["headers"]["aqsh-batch-group"] == "eu"


async def _completed(redis: aioredis.Redis) -> list[str]:
    return [i.decode() for i in await redis.zrange(Q.completed, 0, -1)]


async def _count(records: Any, n: int) -> bool:
    return len(await records) >= n


async def _zero(value: Any) -> bool:
    return int(await value) == 0
