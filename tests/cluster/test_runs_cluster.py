"""The run index on a real Redis Cluster: every enqueue script writes it in the queue's slot
(a key in another slot would be a CROSSSLOT error), and a listing merges indexes living on
different nodes."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.runindex import RunIndex, RunIndexer, Source

pytestmark = pytest.mark.timeout(120)


async def test_every_enqueue_path_indexes_and_a_listing_merges_the_nodes(
    cluster: RedisCluster, queues: list[str],
) -> None:
    client = Client(cluster)
    ids: list[str] = []
    for qname in queues:
        key = keys.runs_index_key(qname, "job")
        assert key_slot(key.encode()) == key_slot(keys.queue_keys(qname).pending.encode())
        ids.append((await client.enqueue("job", b"1", queue=qname)).id)
        ids.append((await client.enqueue("job", b"2", queue=qname, process_in=60)).id)
        ids.append((await client.enqueue("job", b"3", queue=qname, unique_ttl=60)).id)
        ids.append((await client.enqueue("job", b"4", queue=qname, unique_ttl=60,
                                         process_in=60)).id)
    batch = await client.enqueue_many(
        [EnqueueRequest(type="job", payload=b"", queue=q) for q in queues for _ in range(3)])
    ids += [r.id for r in batch if not isinstance(r, Exception)]
    assert len(ids) == 4 * len(queues) + 3 * len(queues)
    # A task from a client that writes no index (asynq's Go client), found by the indexer.
    foreign = await Client(cluster, index_runs=False).enqueue("job", b"go", queue=queues[1])
    await RunIndexer(cluster, known=lambda: [Source(q, "job") for q in queues]).run_once()
    index = RunIndex(cluster)
    assert await index.sources() == {Source(q, "job") for q in queues}
    listed: list[str] = []
    order: list[tuple[int, bytes]] = []
    cursor = None
    while True:
        page = await index.page(await index.sources(), limit=4, accept=lambda run: True,
                                cursor=cursor)
        listed += [run.info.id for run in page.runs]
        order += [(run.enqueued_ms, run.info.id.encode()) for run in page.runs]
        if page.next is None:
            break
        cursor = page.next
    assert sorted(listed) == sorted([*ids, foreign.id])
    assert order == sorted(order, reverse=True)  # newest first across the nodes
    running = await index.active(queues)
    assert running == []
