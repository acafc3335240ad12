"""Redis connections: the one place that knows how aqsh reaches Redis.

Standalone (``host:port``, ``redis://``, ``rediss://`` with TLS, ``unix://``), Sentinel (a
list of sentinels and a master name; the client follows failovers) or Cluster (seed nodes; the
client follows the slot map). Every component asks this module for a client, so nothing else
knows which one it is talking to — except for the two things a Cluster client does differently
and that live here too: whether it is one (``is_cluster``) and how to subscribe
(``open_pubsub``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

#: What ``create_client`` returns. Both speak the same commands; a Cluster client routes each
#: one by its keys' slot, splits pipelines per node and has no DB selection.
RedisClient = aioredis.Redis | RedisCluster


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    sentinel_addrs: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    cluster_addrs: tuple[str, ...] = ()
    #: Standalone/Sentinel: the whole pool; Cluster: per node (redis-py's unit there).
    max_connections: int = 256
    socket_timeout_s: float = 5.0


def normalise_url(addr: str) -> str:
    """Accept asynq-style ``host:port`` as well as a URL."""
    if "://" in addr:
        return addr
    return f"redis://{addr}"


def _host_port(addr: str, default_port: int = 26379) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port or default_port)


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def quick_retry() -> Retry:
    """redis-py's own retry covers a dropped connection (one quick reconnect), nothing longer:
    redis-py 6+ would otherwise retry a LOADING or a refused connect for seconds inside one
    call, invisible to the supervised loops (and so to /health), which back off and retry an
    outage themselves."""
    return Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.2), 2)


def create_client(
    settings: RedisSettings, *, socket_timeout_s: float | None = None
) -> RedisClient:
    """A pooled asyncio client that returns bytes (task messages are binary).

    ``socket_timeout_s`` overrides the read timeout, for clients that block (XREAD BLOCK).
    """
    timeout = settings.socket_timeout_s if socket_timeout_s is None else socket_timeout_s
    if settings.cluster_addrs and settings.sentinel_addrs:
        raise ValueError("give cluster addresses or sentinel addresses, not both")
    if settings.cluster_addrs:
        # Any reachable seed is enough: the client reads the slot map from it and learns every
        # node. asynq's RedisClusterClientOpt takes the same seed list (and no DB).
        return RedisCluster(
            startup_nodes=[ClusterNode(*_host_port(a, 6379)) for a in settings.cluster_addrs],
            password=settings.password,
            decode_responses=False,
            max_connections=settings.max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=settings.socket_timeout_s,
            health_check_interval=30,
        )
    if settings.sentinel_addrs:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [_host_port(a) for a in settings.sentinel_addrs],
            socket_timeout=settings.socket_timeout_s,
            password=settings.password,
            sentinel_kwargs={"socket_timeout": settings.socket_timeout_s},
        )
        client: aioredis.Redis = sentinel.master_for(
            settings.sentinel_master,
            socket_timeout=timeout,
            socket_connect_timeout=settings.socket_timeout_s,
            password=settings.password,
            decode_responses=False,
            retry=quick_retry(),
        )
        return client
    # A blocking pool makes a burst beyond max_connections wait for a free connection (up
    # to the socket timeout) instead of failing with "Too many connections": hundreds of SSE
    # followers checking their task at once must queue, not error.
    pool = aioredis.BlockingConnectionPool.from_url(
        normalise_url(settings.url),
        password=settings.password,
        decode_responses=False,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=timeout,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        retry=quick_retry(),
    )
    # from_pool: the client owns its pool, so closing the client disconnects every connection.
    return aioredis.Redis.from_pool(pool)


@contextlib.asynccontextmanager
async def open_pubsub(client: RedisClient) -> AsyncIterator[PubSub]:
    """A classic (not sharded) pub/sub connection, closed on exit.

    On a Cluster it is a plain connection to one primary, picked at random from the current
    slot map each time (so a resubscription after a node failure moves elsewhere, and
    subscribers spread over the nodes): Redis Cluster forwards every classic PUBLISH — from a
    client or from inside a Lua script — to all nodes over the cluster bus, so any node hears
    every message. redis-py's own cluster pub/sub is not used: older releases lack it on
    asyncio, and it would pin the subscriber to the channel's slot owner for no gain.
    """
    owned: aioredis.Redis | None = None
    if isinstance(client, RedisCluster):
        await client.initialize()
        node = random.choice(client.get_primaries())
        owned = aioredis.Redis.from_pool(
            aioredis.ConnectionPool(connection_class=node.connection_class,
                                    **node.connection_kwargs)
        )
        pubsub = owned.pubsub(ignore_subscribe_messages=True)
    else:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        yield pubsub
    finally:
        # A broken subscription may fail to close; it is being abandoned either way.
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        if owned is not None:
            with contextlib.suppress(Exception):
                await owned.aclose()
