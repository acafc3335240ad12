"""A delivery survives the worker dying between a task's end and the delivery's enqueue.

The window is microseconds long in real life, so the test widens it with Redis itself: the
first worker connects as a user whose ACL denies the delivery queue's keys (everything else is
allowed), so it ends the task but cannot enqueue the delivery. It is then SIGKILLed, and a
second worker (an ordinary user) must deliver the webhook from the intent left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from standardwebhooks.webhooks import Webhook

from aqsh.engine import flow, keys
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskMessage, TaskState
from aqsh.redis_process import free_port
from aqsh.webhooks import WEBHOOK_QUEUE
from aqsh.webhooks.store import INTENTS_KEY, deliveries_key
from tests.services import write_tasks
from tests.support import wait_until
from tests.webhooks.conftest import SCRIPTS, HookFactory, Received, Receiver
from tests.webhooks.test_webhooks import tasks_yaml

ROOT = Path(__file__).resolve().parents[2]
#: Every key and channel the worker uses, except the delivery queue's (asynq:{aqsh:webhooks}:*)
#: (aqsh/engine/keys.py lists them all; a key added there must be added here).
CRAMPED_ACL = ["on", ">cramped-pw", "resetkeys", "~asynq:{default}:*", "~asynq:queues",
               "~asynq:servers*", "~asynq:workers*", "~asynq:schedulers*",
               "~asynq:scheduler_history:*", "~logs:*", "~{logs:*", "~aqsh:*",
               "resetchannels", "&*", "+@all"]


def start_worker(redis_url: str, config: Path, scripts: Path, tmp_path: Path,
                 log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_TASKS_CONFIG": str(config),
           "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{free_port()}",
           "AQSH_RESULTS_DIR": str(tmp_path / "work"), "AQSH_LOG_FORMAT": "json",
           "AQSH_SCHEDULER": "false", "AQSH_WEBHOOK_SWEEP_INTERVAL": "1s"}
    with log_path.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "aqsh", "serve", "--mode", "worker"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


class Workers:
    """The two workers of a widened crash: ``first`` connects as the cramped user (it cannot
    enqueue deliveries), ``second`` as an ordinary one; both are killed and the user removed
    on the way out."""

    def __init__(self, redis: aioredis.Redis, redis_url: str, config: Path, scripts: Path,
                 tmp_path: Path) -> None:
        self.redis, self.redis_url, self.tmp_path = redis, redis_url, tmp_path
        self.config, self.scripts = config, scripts
        self.first_log = tmp_path / "first.log"
        self.first: subprocess.Popen[bytes] | None = None
        self.second: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Workers:
        await self.redis.execute_command("ACL", "SETUSER", "cramped", *CRAMPED_ACL)
        cramped_url = self.redis_url.replace("redis://", "redis://cramped:cramped-pw@", 1)
        self.first = start_worker(cramped_url, self.config, self.scripts, self.tmp_path,
                                  self.first_log)
        return self

    async def kill_first_after_its_refused_enqueue(self) -> None:
        """Once the first worker has tried (and failed) to enqueue the delivery, with the
        intent left behind, it is SIGKILLed; nothing has been delivered."""
        assert self.first is not None
        await wait_until(lambda: b"webhook.dispatch_failed" in self.first_log.read_bytes(),
                         timeout_s=30, interval_s=0.1, message="the refused enqueue")
        assert await self.redis.zcard(INTENTS_KEY) == 1
        self.first.send_signal(signal.SIGKILL)
        assert self.first.wait(timeout=30) == -signal.SIGKILL
        assert await self.redis.exists(keys.queue_keys(WEBHOOK_QUEUE).pending) == 0

    async def swept_delivery(self, receiver: Receiver, secret: str
                             ) -> tuple[dict[str, Any], Received]:
        """The second worker started; the one delivery it makes from the intent, verified."""
        self.second = start_worker(self.redis_url, self.config, self.scripts, self.tmp_path,
                                   self.tmp_path / "second.log")
        await wait_until(lambda: receiver.at("/hook"), timeout_s=60, interval_s=0.1,
                         message="the swept delivery")
        (received,) = receiver.at("/hook")
        body: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
        return body, received

    async def __aexit__(self, *exc: object) -> None:
        for proc in (self.first, self.second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        await self.redis.execute_command("ACL", "DELUSER", "cramped")


async def test_delivery_survives_a_worker_sigkill_after_the_task_ended(
        redis: aioredis.Redis, redis_url: str, tmp_path: Path, receiver: Receiver,
        secret: str) -> None:
    config, scripts = write_tasks(tmp_path, SCRIPTS, tasks_yaml(receiver))
    inspector = Inspector(redis)
    async with Workers(redis, redis_url, config, scripts, tmp_path) as workers:
        async with Client(redis) as client:
            info = await client.enqueue("ok", b"{}", queue="default", max_retry=0,
                                        retention=3600)
        task_id = info.id

        async def completed() -> bool:
            found = await inspector.find_task(task_id, ["default"])
            return found.state is TaskState.COMPLETED

        try:
            await wait_until(completed, timeout_s=60, interval_s=0.1, message="the task's end")
        except AssertionError:
            # A key the worker now uses is missing from CRAMPED_ACL: the log names it.
            raise AssertionError(workers.first_log.read_text()[-3000:]) from None
        await workers.kill_first_after_its_refused_enqueue()
        assert receiver.requests == []

        body, received = await workers.swept_delivery(receiver, secret)
        assert (body["event"], body["id"], body["state"]) == ("task.completed", task_id,
                                                              "completed")
        assert received.headers["webhook-id"] == f"msg_{task_id}_completed"
        await wait_until(lambda: _zero(redis), timeout_s=30, message="the intent settled")


async def test_a_dependency_cancel_is_delivered_when_the_worker_dies_after_it(
        redis: aioredis.Redis, redis_url: str, tmp_path: Path, receiver: Receiver,
        secret: str) -> None:
    """A run waiting on ``?after=`` that the dependency sweep cancels never reaches a
    handler, so no attempt stored an intent for it: the sweep stores one before it archives
    the run. Widened as above: the first worker archives the run but cannot enqueue the
    delivery, and dies; the second delivers task.canceled from the intent alone."""
    config, scripts = write_tasks(tmp_path, SCRIPTS, tasks_yaml(receiver))
    inspector = Inspector(redis)
    async with Workers(redis, redis_url, config, scripts, tmp_path) as workers:
        async with Client(redis) as client:
            # Its dependency does not exist: the first sweep cancels it.
            info = await client.enqueue(
                "ok", b"{}", queue="default", max_retry=0, retention=3600,
                process_at=datetime.fromtimestamp(flow.AFTER_SCORE_S, UTC),
                headers=flow.after_headers([("default", "no-such-task")]))

        async def archived() -> bool:
            found = await inspector.find_task(info.id, ["default"])
            return found.state is TaskState.ARCHIVED

        try:
            await wait_until(archived, timeout_s=60, interval_s=0.1,
                             message="the dependency sweep's cancel")
        except AssertionError:
            raise AssertionError(workers.first_log.read_text()[-3000:]) from None
        await workers.kill_first_after_its_refused_enqueue()
        assert receiver.requests == []

        body, received = await workers.swept_delivery(receiver, secret)
        # The same event, and webhook-id, the worker's own hook would have sent.
        assert (body["event"], body["id"]) == ("task.canceled", info.id)
        assert received.headers["webhook-id"] == f"msg_{info.id}_canceled"
        assert "no-such-task" in body["last_error"]
        assert body["started_at"] is None
        await wait_until(lambda: _zero(redis), timeout_s=30, message="the intent settled")


async def _zero(redis: aioredis.Redis) -> bool:
    return int(await redis.zcard(INTENTS_KEY)) == 0


async def test_failed_is_delivered_when_the_worker_dies_mid_script(
        redis: aioredis.Redis, redis_url: str, tmp_path: Path, receiver: Receiver,
        secret: str) -> None:
    """The engine's recoverer, not a worker's processor, ends this task (its lease lapses):
    the intent stored before the script started is what gets task.failed delivered."""
    config, scripts = write_tasks(tmp_path, SCRIPTS, tasks_yaml(receiver))
    first = start_worker(redis_url, config, scripts, tmp_path, tmp_path / "first.log")
    second = None
    inspector = Inspector(redis)
    try:
        async with Client(redis) as client:
            info = await client.enqueue("slow", b"{}", queue="default", max_retry=0,
                                        retention=3600)

        async def running() -> bool:
            found = await inspector.find_task(info.id, ["default"])
            return found.state is TaskState.ACTIVE and await redis.zcard(INTENTS_KEY) == 1

        await wait_until(running, timeout_s=60, interval_s=0.1, message="the script running")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        second = start_worker(redis_url, config, scripts, tmp_path, tmp_path / "second.log")
        # The lease (30 s, asynq's) must lapse before the recoverer archives the task.
        await wait_until(lambda: receiver.at("/hook"), timeout_s=90, interval_s=0.2,
                         message="task.failed after recovery")
        received = receiver.at("/hook")[0]
        body = Webhook(secret).verify(received.body, received.headers)
        assert (body["event"], body["id"], body["state"]) == ("task.failed", info.id,
                                                              "archived")
        assert "lease expired" in body["last_error"]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_the_delivery_its_index_and_the_intent_change_in_one_script_call(
        redis: aioredis.Redis, make_hooks: HookFactory, receiver: Receiver,
        secret: str) -> None:
    """The intent is what makes a delivery durable: it may go only together with the
    delivery task it stood for. MONITOR shows each command a script runs right after the
    EVALSHA that ran it, tagged ``lua``: every write of the dispatch must come from one call."""
    service = await make_hooks(tasks_yaml(receiver), worker=False)
    assert service.notifier is not None
    msg = TaskMessage(type="ok", payload=b"{}", id="t-atomic", queue="default")
    await service.notifier.register_intent(msg.queue, msg.id, msg.retried)
    async with redis.monitor() as monitor:
        await service.notifier.canceled(msg)
        seen: list[tuple[str, str]] = []

        async def zrem_seen() -> bool:
            command = await asyncio.wait_for(monitor.next_command(), 5)
            seen.append((command["client_type"], command["command"]))
            return command["command"].startswith(f"ZREM {INTENTS_KEY}")

        await wait_until(zrem_seen, timeout_s=10, interval_s=0, message="the intent's ZREM")
    call = max(i for i, (client, _) in enumerate(seen) if client != "lua")
    assert seen[call][1].startswith("EVALSHA"), seen
    ran = [command.split(" ", 2)[:2] for _, command in seen[call + 1:]]
    pending = keys.queue_keys(WEBHOOK_QUEUE).pending
    for command in (["LPUSH", pending], ["HSET", deliveries_key(msg.id)],
                    ["EXPIRE", deliveries_key(msg.id)], ["ZREM", INTENTS_KEY]):
        assert command in ran, (command, seen)
    assert await redis.zcard(INTENTS_KEY) == 0
    assert await redis.llen(pending) == 1
    assert len(await redis.hgetall(deliveries_key(msg.id))) == 1


async def test_the_slot_by_slot_path_of_a_cluster_leaves_the_same_keys(
        redis: aioredis.Redis, make_hooks: HookFactory, receiver: Receiver,
        secret: str) -> None:
    """A Cluster cannot take the one-call script (its keys are in three slots): the notifier
    writes slot by slot there. Both paths must leave the same delivery task, index entry and
    no intent."""
    service = await make_hooks(tasks_yaml(receiver), worker=False)
    notifier = service.notifier
    assert notifier is not None
    stored: list[tuple[list[bytes], str, list[str]]] = []
    for task_id, one_call in (("t-one-call", True), ("t-by-slot", False)):
        notifier._one_call = one_call
        msg = TaskMessage(type="ok", payload=b"{}", id=task_id, queue="default")
        await notifier.register_intent(msg.queue, msg.id, msg.retried)
        await notifier.canceled(msg)
        index = await redis.hgetall(deliveries_key(task_id))
        assert len(index) == 1
        ((delivery, meta),) = index.items()
        task = await redis.hgetall(keys.queue_keys(WEBHOOK_QUEUE).task(delivery.decode()))
        shown = json.loads(meta)
        stored.append((sorted(task), shown["event"], sorted(shown)))
        assert await redis.ttl(deliveries_key(task_id)) > 0  # expires with the results
    assert stored[0] == stored[1]
    assert await redis.zcard(INTENTS_KEY) == 0
    assert await redis.llen(keys.queue_keys(WEBHOOK_QUEUE).pending) == 2
