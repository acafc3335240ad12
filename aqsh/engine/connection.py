"""Redis connections: the one place that knows how aqsh reaches Redis.

Sentinel and Cluster come later; every component asks this module for a client so adding them
touches nothing else.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where Redis is. ``url`` accepts redis://, rediss:// (TLS), unix:// and host:port."""

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    sentinel_addrs: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    max_connections: int = 64
    socket_timeout_s: float = 5.0


def normalise_url(addr: str) -> str:
    """Accept asynq-style ``host:port`` as well as a URL."""
    if "://" in addr:
        return addr
    return f"redis://{addr}"


def create_client(settings: RedisSettings) -> aioredis.Redis:
    """A pooled asyncio client that returns bytes (task messages are binary)."""
    return aioredis.Redis.from_url(
        normalise_url(settings.url),
        password=settings.password,
        decode_responses=False,
        max_connections=settings.max_connections,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
    )
