"""A real three-node Redis Cluster (password protected, no replicas), started once per session.

Each test gets a fresh ``RedisCluster`` client built by ``create_client`` — the way ``aqsh
serve`` builds it — on flushed nodes with an empty script cache, so the first script call of
every test goes through the NOSCRIPT reload. ``QUEUES`` names one queue per node, so every
test that uses all three spreads its work over the whole cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from aqsh.engine import keys
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.redis_process import RedisClusterProcess

PASSWORD = "cluster-secret"


def queue_on_node(cluster: RedisClusterProcess, node: int, stem: str = "q") -> str:
    """The first queue name ``stem<n>`` whose keys live in node ``node``'s slots."""
    first, end = cluster.slot_ranges()[node]
    for n in range(10_000):
        name = f"{stem}{n}"
        if first <= key_slot(keys.queue_keys(name).pending.encode()) < end:
            return name
    raise AssertionError(f"no queue name for node {node}")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(3, password=PASSWORD) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def queues(redis_cluster: RedisClusterProcess) -> list[str]:
    """One queue per node, in node order."""
    return [queue_on_node(redis_cluster, i) for i in range(len(redis_cluster.nodes))]


@pytest.fixture
def cluster_settings(redis_cluster: RedisClusterProcess) -> RedisSettings:
    # One seed is enough: the client discovers the other nodes from it.
    return RedisSettings(cluster_addrs=redis_cluster.addrs[:1], password=PASSWORD)


@pytest.fixture
async def cluster(cluster_settings: RedisSettings) -> AsyncIterator[RedisCluster]:
    client = create_client(cluster_settings)
    assert isinstance(client, RedisCluster)
    await client.flushall()  # every primary
    await client.script_flush()
    try:
        yield client
    finally:
        await client.aclose()
