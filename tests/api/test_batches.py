"""Batches (tasks.yaml ``aggregate:``): runs submitted with ``?group=`` wait, and the script runs
once per group with their inputs as JSON lines in ``$AQSH_BATCH_FILE``. A real service: API,
worker, aggregator and Redis, wired as ``aqsh serve`` wires them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.errors import ConfigError
from aqsh.runner.batches import group_name
from aqsh.runner.spec import AggregateSpec, load_tasks
from tests.api.conftest import TASKS_YAML, Service, ServiceFactory
from tests.support import wait_until

Q = keys.queue_keys("default")
BATCH_YAML = TASKS_YAML + """\
  notify:
    script: batch.sh
    aggregate: {grace: 1s, max_size: 3, max_delay: 1m}
    input:
      - {name: who, env: WHO, required: true, pattern: '[a-z]+'}
      - {name: loud, env: LOUD, type: bool, default: false}
"""
BATCH_SH = """#!/bin/sh
echo "size=$AQSH_BATCH_SIZE group=$AQSH_BATCH_GROUP who=${WHO:-unset}"
cat "$AQSH_BATCH_FILE"
"""


@pytest.fixture
async def service(make_service: ServiceFactory, tmp_path: Path) -> Service:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "batch.sh").write_text(BATCH_SH)
    (scripts / "batch.sh").chmod(0o755)
    return await make_service(tasks_yaml=BATCH_YAML)


async def submit(service: Service, who: str, group: str | None) -> dict[str, Any]:
    path = "/tasks/notify" + (f"?group={group}" if group is not None else "")
    status, body, _ = await service.request("POST", path, json={"who": who})
    assert status == 202, body
    return dict(body)


async def batch_logs(service: Service, redis: aioredis.Redis, count: int) -> dict[str, list[str]]:
    """The logs of the ``count`` finished batches, by their group."""
    ids = await wait_until(lambda: _completed(redis, count), timeout_s=30,
                           message=f"{count} batches completed")
    out: dict[str, list[str]] = {}
    for task_id in ids:
        status, body, _ = await service.request("GET", f"/tasks/{task_id}")
        assert status == 200, body
        assert (body["name"], body["state"], body["submitted_by"]) == (
            "notify", "completed", "aqsh-aggregator")
        status, text, _ = await service.request("GET", f"/tasks/{task_id}/logs?follow=false")
        assert status == 200
        lines = text.splitlines()
        out[lines[0].split("group=")[1].split()[0]] = lines
    return out


async def _completed(redis: aioredis.Redis, count: int) -> list[str] | None:
    ids = [i.decode() for i in await redis.zrange(Q.completed, 0, -1)]
    return ids if len(ids) >= count else None


async def test_runs_of_a_group_run_once_with_their_inputs_in_the_batch_file(
    service: Service, redis: aioredis.Redis
) -> None:
    first = await submit(service, "ada", "eu")
    assert first["state"] == "aggregating"
    status, body, _ = await service.request("GET", f"/tasks/{first['id']}")
    assert (status, body["state"]) == (200, "aggregating")
    for who in ("bob", "cy"):  # max_size 3: this group is due at once
        await submit(service, who, "eu")
    await submit(service, "dee", None)  # the default group, due after the 1 s grace
    logs = await batch_logs(service, redis, 2)
    assert logs["eu"][0] == "size=3 group=eu who=unset"  # no per-run variables in a batch
    assert sorted(json.loads(line)["who"] for line in logs["eu"][1:]) == ["ada", "bob", "cy"]
    assert all(json.loads(line)["loud"] is False for line in logs["eu"][1:])  # defaults in
    assert logs["default"][0] == "size=1 group=default who=unset"
    assert [json.loads(line) for line in logs["default"][1:]] == [{"who": "dee", "loud": False}]
    # The runs themselves are gone, as in asynq once their aggregate is enqueued.
    status, _, _ = await service.request("GET", f"/tasks/{first['id']}")
    assert status == 404
    assert await redis.scard(Q.groups) == 0


async def test_a_batch_with_an_invalid_run_is_archived_without_running(
    service: Service, redis: aioredis.Redis
) -> None:
    """aqsh checks its own submissions; a foreign enqueuer's bad run fails its whole batch."""
    group = group_name("notify", "eu")
    await service.state.client.enqueue("notify", b'{"who": "ada"}', group=group)
    await service.state.client.enqueue("notify", b'{"who": "BAD; rm -rf /"}', group=group)
    ids = await wait_until(lambda: _archived(redis), timeout_s=30, message="batch archived")
    status, body, _ = await service.request("GET", f"/tasks/{ids[0]}")
    assert status == 200, body
    assert body["state"] == "archived"
    assert body["result"]["exit_code"] == -1
    # Which run: both joined in one second, and asynq orders a second's tasks by their ids.
    assert re.search(r"run [12] of 2: .*who: must match", body["result"]["error"])
    status, text, _ = await service.request("GET", f"/tasks/{ids[0]}/logs?follow=false")
    assert not text  # the script never started


async def _archived(redis: aioredis.Redis) -> list[str] | None:
    ids = [i.decode() for i in await redis.zrange(Q.archived, 0, -1)]
    return ids or None


@pytest.mark.parametrize(("path", "problem"), [
    ("/tasks/echo?group=eu", "does not batch"),
    ("/tasks/notify?group=a%2Fb", "group must be"),
    ("/tasks/notify?group=", "group must be"),
    ("/tasks/notify?group=a&group=b", "once"),
    ("/tasks/notify?group=eu&process_in=1m", "cannot be scheduled"),
])
async def test_bad_group_submissions_are_refused(
    service: Service, redis: aioredis.Redis, path: str, problem: str
) -> None:
    body = {"name": "ada"} if path.startswith("/tasks/echo") else {"who": "ada"}
    status, reply, _ = await service.request("POST", path, json=body)
    assert status == 400, reply
    assert reply["error"]["code"] == "invalid_group"
    assert problem in reply["error"]["message"]
    assert await redis.exists(Q.groups, Q.pending, Q.scheduled) == 0


def test_aggregate_is_read_and_checked_from_tasks_yaml(tmp_path: Path) -> None:
    (tmp_path / "b.sh").write_text("#!/bin/sh\n")
    (tmp_path / "b.sh").chmod(0o755)
    good = tmp_path / "good.yaml"
    good.write_text("tasks:\n  a: {script: b.sh, aggregate: {grace: 30s, max_size: 100, "
                    "max_delay: 5m}}\n  b: {script: b.sh, aggregate: {}}\n  c: {script: b.sh}\n")
    tasks = load_tasks(good, tmp_path).tasks
    assert tasks["a"].aggregate == AggregateSpec(grace_s=30, max_size=100, max_delay_s=300)
    assert tasks["b"].aggregate == AggregateSpec()
    assert tasks["c"].aggregate is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  a: {script: b.sh, aggregate: {grace: 500ms}}\n"
                   "  b: {script: b.sh, aggregate: {max_size: -1, every: 1s}}\n"
                   "  c: {script: b.sh, aggregate: 5}\n")
    with pytest.raises(ConfigError) as caught:
        load_tasks(bad, tmp_path)
    text = str(caught.value)
    assert "'aggregate.grace': must be at least 1s" in text
    assert "'aggregate.max_size': must be a non-negative integer" in text
    assert "'aggregate.every': unknown key" in text
    assert "'aggregate': must be a mapping" in text


async def test_an_idempotency_key_names_one_batch(service: Service) -> None:
    headers = {"Idempotency-Key": "k1"}
    status, first, _ = await service.request("POST", "/tasks/notify?group=eu",
                                             json={"who": "ada"}, headers=headers)
    assert status == 202, first
    status, again, _ = await service.request("POST", "/tasks/notify?group=eu",
                                             json={"who": "ada"}, headers=headers)
    assert (status, again["id"]) == (202, first["id"])
    status, other, _ = await service.request("POST", "/tasks/notify?group=us",
                                             json={"who": "ada"}, headers=headers)
    assert status == 409, other
    assert other["error"]["code"] == "idempotency_conflict"
