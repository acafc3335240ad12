"""Redis connections: the one place that knows how aqsh reaches Redis.

Standalone (``host:port``, ``redis://``, ``rediss://`` with TLS, ``unix://``) or Sentinel (a
list of sentinels and a master name; the client follows failovers). Every component asks this
module for a client, so nothing else knows which one it is talking to.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    sentinel_addrs: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    max_connections: int = 256
    socket_timeout_s: float = 5.0


def normalise_url(addr: str) -> str:
    """Accept asynq-style ``host:port`` as well as a URL."""
    if "://" in addr:
        return addr
    return f"redis://{addr}"


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port or 26379)


def create_client(
    settings: RedisSettings, *, socket_timeout_s: float | None = None
) -> aioredis.Redis:
    """A pooled asyncio client that returns bytes (task messages are binary).

    ``socket_timeout_s`` overrides the read timeout, for clients that block (XREAD BLOCK).
    """
    timeout = settings.socket_timeout_s if socket_timeout_s is None else socket_timeout_s
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
    )
    # from_pool: the client owns its pool, so closing the client disconnects every connection.
    return aioredis.Redis.from_pool(pool)
