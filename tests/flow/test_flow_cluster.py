"""The held-run scripts on a Redis Cluster (3 primaries): every key the acquire, release,
repair, rate and dependency scripts touch is in the queue's slot, on each node."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from aqsh.engine import flow, keys
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker


def now_s() -> int:
    return int(time.time())


def test_every_flow_key_shares_the_queue_slot() -> None:
    for qname in ("default", "q1", "a:b"):
        slot = key_slot(keys.queue_keys(qname).pending.encode())
        for key in (keys.flow_registry_key(qname), keys.flow_slots_key(qname, "deploy:{x}"),
                    keys.flow_wait_key(qname, "deploy:prod"),
                    keys.flow_rate_key(qname, "t:k", 60)):
            assert key_slot(key.encode()) == slot, key


async def test_limits_and_dependencies_on_each_node(cluster: RedisCluster,
                                                    queues: list[str]) -> None:
    broker = RedisBroker(cluster)
    client = Client(cluster)
    inspector = Inspector(cluster)
    for n, qname in enumerate(queues):
        rule = flow.headers(concurrency=flow.Concurrency(f"deploy:{qname}", 1))
        ids = [f"{qname}-{i}" for i in range(3)]
        for task_id in ids:
            await client.enqueue("deploy", b"{}", queue=qname, task_id=task_id,
                                 headers=rule, retention=600)
        start = now_s()
        first = await broker.dequeue_many([qname], limit=10, now_s=start)
        assert [m.message.id for m in first] == ids[:1]
        assert (await broker.finish_successes([first[0].message], now_s=start)) == [None]
        second = await broker.dequeue_many([qname], limit=10, now_s=start)
        assert [m.message.id for m in second] == ids[1:2]
        await broker.archive(second[0].message, error_msg="boom", now_s=start)
        third = await broker.dequeue_many([qname], limit=10, now_s=start)
        assert [m.message.id for m in third] == ids[2:]
        await broker.retry(third[0].message, retry_at_s=start + 3600, error_msg="x",
                           is_failure=True, now_s=start)
        assert await broker.repair_flow(qname, now_s=start + LEASE_DURATION_S + 1) == 0
        # A rate window on the same node.
        rate = flow.headers(rate=flow.Rate(f"ping:{qname}", 1, 3600))
        for i in range(2):
            await client.enqueue("ping", b"{}", queue=qname, task_id=f"{qname}-p{i}",
                                 headers=rate)
        pinged = await broker.dequeue_many([qname], limit=10, now_s=start)
        assert [m.message.id for m in pinged] == [f"{qname}-p0"]
        # A dependent whose dependency lives on another node.
        other = queues[(n + 1) % len(queues)]
        dep = await client.enqueue("dep", b"{}", queue=other, retention=600)
        waiter = await client.enqueue(
            "after", b"{}", queue=qname, process_at=_at(flow.AFTER_SCORE_S),
            headers=flow.after_headers([(other, dep.id)]))
        assert (await broker.sweep_dependencies(qname, now_s=start)).moved == 0
        # (The other queue may hold an earlier round's promoted dependent too.)
        leased = await broker.dequeue_many([other], limit=10, now_s=start)
        done = next(m.message for m in leased if m.message.id == dep.id)
        await broker.mark_as_complete(done, now_s=start)
        assert (await broker.sweep_dependencies(qname, now_s=start)).moved == 1
        info = await inspector.find_task(waiter.id, [qname])
        assert info.state is TaskState.PENDING


def _at(unix_s: int) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)
