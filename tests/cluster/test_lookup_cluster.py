"""GET /tasks/{id}'s lookup on a real Cluster: one inspect_get_task call per queue (queues on
three nodes) with the attempt-times script riding along, scripts loaded on demand."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from aqsh import errors
from aqsh.clock import ManualClock, unix_s
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.keys import log_key, log_meta_key
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scripts import Batch

TIMES = "log_attempt_times"


async def test_lookup_with_attempt_times_across_nodes(
    cluster: RedisCluster, queues: list[str], clock: ManualClock
) -> None:
    client, broker = Client(cluster, clock=clock), RedisBroker(cluster)
    inspector = Inspector(cluster, clock=clock)
    q0, q1, q2 = queues
    now = unix_s(clock)
    await client.enqueue("i", b"p", queue=q0)
    scheduled = await client.enqueue("i", b"s", queue=q1, process_in=60)
    await client.enqueue("i", b"a", queue=q2)
    active = await broker.dequeue([q2], now_s=now)
    assert active is not None
    task_id = active.message.id
    await cluster.hset(log_meta_key(task_id), mapping={"started_ms": 7})
    extra = Batch()
    extra.script(TIMES, [log_meta_key(task_id), log_key(task_id)], [])
    found, replies = await inspector.find_task_with(task_id, extra, [TIMES])
    assert (found.queue, found.state, found.is_orphaned) == (q2, TaskState.ACTIVE, False)
    assert replies == [[b"7", None]]
    found = await inspector.find_task(scheduled.id)
    assert (found.queue, found.next_process_at_s) == (q1, now + 60)
    with pytest.raises(errors.TaskNotFound):
        await inspector.find_task_with("no-such-task", extra, [TIMES])
