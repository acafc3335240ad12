"""The start-up check of the Redis server: version and Lua, told in one sentence.

aqsh's scripts use commands of Redis 6.2 (``ZRANGE ... BYSCORE``, ``LPOS``, ``GETDEL``-era
replies) and every state change is a Lua script, so an older server or one without scripting
(some proxies and managed tiers disable ``EVAL``) would fail every call with an error that names
a command, not the cause. ``aqsh serve`` asks once at start-up and refuses to run instead.

The version comes from ``HELLO`` (no arguments: the reply describes the server without
switching protocols), which Redis runs for any authenticated user whatever its ACL, so the
least-privilege ACL needs no ``INFO``. A server that does not answer is not judged: the loops
retry and ``/health/ready`` tells; an unreachable Redis at start-up is not a configuration
error.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from aqsh import errors
from aqsh.engine.connection import RedisClient
from aqsh.engine.rdb import REDIS_DOWN
from aqsh.engine.scripts import script_source

log = structlog.get_logger("aqsh.engine")

MIN_VERSION = (6, 2)
_MIN_VERSION_TEXT = ".".join(map(str, MIN_VERSION))


class UnsupportedServer(errors.ConfigError):
    """The Redis server cannot run aqsh: too old, or no Lua scripting."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _hello_fields(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    if isinstance(reply, list | tuple):
        return {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}
    return {}


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.4.0-rc1"`` -> (7, 4, 0): the leading numbers, up to the first non-number."""
    found = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in found.group(0).split(".")) if found else ()


async def check_server(client: RedisClient) -> str | None:
    """``"redis 7.0.15"`` when the server can run aqsh; raises ``UnsupportedServer`` with the
    reason when it cannot; None when it did not answer (not judged)."""
    try:
        if isinstance(client, RedisCluster):  # a keyless command: any node speaks for all
            # A node, not the RANDOM flag: redis-py then still tries to find a slot for HELLO.
            await client.initialize()
            reply = await client.execute_command("HELLO", target_nodes=client.get_random_node())
        else:
            reply = await client.execute_command("HELLO")  # type: ignore[no-untyped-call]
    except REDIS_DOWN as exc:
        log.warning("redis.check_skipped", reason=f"redis unavailable: {exc}")
        return None
    except ResponseError as exc:
        # Redis < 6.0 has no HELLO; 6.0 wants a protocol version: both are older than 6.2.
        raise UnsupportedServer(
            f"the Redis server refused HELLO, which servers older than Redis "
            f"{_MIN_VERSION_TEXT} lack (aqsh needs Redis >= "
            f"{_MIN_VERSION_TEXT} or Valkey): {exc}") from exc
    fields = _hello_fields(reply)
    flavour = fields.get("server", "redis")
    version_text = fields.get("version", "")
    version = parse_version(version_text)
    # Valkey numbers from 7.2 on (a Redis 7.2 fork); any Valkey is new enough.
    if flavour == "redis" and version < MIN_VERSION:
        raise UnsupportedServer(
            f"the Redis server is {flavour} {version_text or 'of unknown version'}: aqsh needs "
            f"Redis >= {_MIN_VERSION_TEXT} or Valkey")
    try:
        await client.script_load(script_source("enqueue"))
    except REDIS_DOWN as exc:
        log.warning("redis.check_skipped", reason=f"redis unavailable: {exc}")
        return None
    except ResponseError as exc:
        raise UnsupportedServer(
            f"no Lua scripting: the Redis server answered SCRIPT LOAD with {exc!s} (aqsh "
            "needs SCRIPT LOAD and EVALSHA, and the right to run them: see the README's "
            "ACL)") from exc
    return f"{flavour} {version_text}"
