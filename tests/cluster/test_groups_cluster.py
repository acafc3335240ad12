"""Group aggregation on a real Redis Cluster: one queue per node, every group script's keys in
its queue's slot (a key of another slot would fail the script with CROSSSLOT, or with a
"non local key" error for the key the reclaim script derives from a set's name)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from aqsh.clock import ManualClock, unix_s
from aqsh.engine import keys
from aqsh.engine.broker import AGGREGATION_TIMEOUT_S
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from tests.support import wait_until


def joined(group: str, tasks: list[Task]) -> EnqueueRequest:
    return EnqueueRequest(type=f"batch:{group}",
                          payload=b",".join(sorted(t.payload for t in tasks)))


@pytest.fixture
async def server_factory(cluster: RedisCluster) -> AsyncIterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        await server.stop(shutdown_timeout_s=0)


async def test_groups_aggregate_on_every_node(
    cluster: RedisCluster, queues: list[str], clock: ManualClock, server_factory: list[Server]
) -> None:
    client = Client(cluster, clock=clock)
    for qname in queues:
        q = keys.queue_keys(qname)
        for key in (q.group("g"), q.aggregation_set("g", "some-id"), q.aggregation_sets,
                    q.groups):
            assert key_slot(key.encode()) == key_slot(q.pending.encode())
        await client.enqueue("email", f"{qname}-a".encode(), queue=qname, group="g")
        await client.enqueue("email", f"{qname}-b".encode(), queue=qname, group="g",
                             unique_ttl=60)
    ran: list[tuple[str, bytes]] = []

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        ran.append((task.queue, task.payload))
        return None

    server = Server(RedisBroker(cluster), handler, queues=dict.fromkeys(queues, 1), clock=clock,
                    group_aggregator=joined, group_grace_period_s=1,
                    aggregation_interval_s=0.05, heartbeat_interval_s=3600,
                    forward_interval_s=3600, recover_interval_s=3600)
    server_factory.append(server)
    await server.start()
    clock.advance(1)
    await wait_until(lambda: len(ran) == len(queues), message="one batch per queue")
    assert sorted(ran) == sorted((q, f"{q}-a,{q}-b".encode()) for q in queues)
    for qname in queues:
        q = keys.queue_keys(qname)
        assert await cluster.exists(q.group("g"), q.aggregation_sets, q.groups) == 0


async def test_stale_sets_are_reclaimed_on_every_node(
    cluster: RedisCluster, queues: list[str], clock: ManualClock
) -> None:
    client = Client(cluster, clock=clock)
    broker = RedisBroker(cluster)
    for qname in queues:
        await client.enqueue("email", b"x", queue=qname, group="g")
        set_id = await broker.aggregation_check(qname, "g", now_s=unix_s(clock),
                                                grace_period_s=1, max_delay_s=0, max_size=1)
        assert set_id is not None
        msgs, _ = await broker.read_aggregation_set(qname, "g", set_id)
        assert [m.payload for m in msgs] == [b"x"]
    for qname in queues:
        await broker.reclaim_stale_aggregation_sets(
            qname, now_s=unix_s(clock) + AGGREGATION_TIMEOUT_S)
        q = keys.queue_keys(qname)
        assert await cluster.zcard(q.group("g")) == 1
        assert await cluster.zcard(q.aggregation_sets) == 0
