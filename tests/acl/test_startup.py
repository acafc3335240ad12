"""``aqsh serve``'s start-up check of the server: what it reports for the server under test,
and the one-sentence refusal (exit 2) for a user that may not load scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from aqsh.engine.compat import UnsupportedServer, check_server, parse_version
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.redis_process import free_port, server_identity
from tests.acl.test_acl import DEPLOYMENT_ACL
from tests.api.conftest import write_tasks

ROOT = Path(__file__).resolve().parents[2]


async def test_the_server_under_test_passes_and_is_named(redis: aioredis.Redis) -> None:
    flavour, version = server_identity()
    assert await check_server(redis) == f"{flavour} {'.'.join(map(str, version))}"


async def test_the_documented_acl_passes_the_check(
    redis: aioredis.Redis, redis_url: str,
) -> None:
    """HELLO needs no right of its own, so the least-privilege user is judged like any."""
    await redis.execute_command("ACL", "SETUSER", "checked", "reset", "on", ">pw",
                                *DEPLOYMENT_ACL.split())
    client = create_client(RedisSettings(url=redis_url.replace("redis://", "redis://checked:pw@")))
    try:
        assert await check_server(client) is not None
    finally:
        await client.aclose()
        await redis.execute_command("ACL", "DELUSER", "checked")


async def test_an_unreachable_server_is_not_judged() -> None:
    client = create_client(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        assert await check_server(client) is None
    finally:
        await client.aclose()


@pytest.mark.parametrize(("text", "version"), [
    ("6.2.14", (6, 2, 14)), ("7.0.15", (7, 0, 15)), ("6.0.16", (6, 0, 16)), ("8.1.8", (8, 1, 8)),
    ("7.4.0-rc1", (7, 4, 0)), ("", ()),
])
def test_versions_parse_for_the_minimum_check(text: str, version: tuple[int, ...]) -> None:
    """No pre-6.2 binary ships in a package this project can install, so the comparison that
    refuses one is proven on the parsed numbers."""
    assert parse_version(text) == version
    assert (parse_version(text) >= (6, 2)) == (version >= (6, 2))


def test_serve_refuses_to_start_without_the_right_to_load_scripts(
    redis_url: str, tmp_path: Path,
) -> None:
    import redis as sync_redis

    admin = sync_redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "noscripts", "reset", "on", ">pw",
                          *DEPLOYMENT_ACL.replace(" +script|load", "").split())
    try:
        config, scripts = write_tasks(tmp_path)
        env = {**os.environ,
               "AQSH_REDIS_ADDR": redis_url.replace("redis://", "redis://noscripts:pw@"),
               "AQSH_TASKS_CONFIG": str(config), "AQSH_TASKS_DIR": str(scripts),
               "AQSH_BIND": f"127.0.0.1:{free_port()}", "AQSH_MODE": "both",
               "AQSH_RESULTS_DIR": str(tmp_path / "work")}
        done = subprocess.run([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        admin.execute_command("ACL", "DELUSER", "noscripts")
        admin.close()
    assert done.returncode == 1, done.stderr[-2000:]  # a start that failed (aqsh.cli.process)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("aqsh: no Lua scripting: "), last
    assert "SCRIPT LOAD" in last
    assert "no permissions" in last.lower()
    assert "Traceback" not in done.stderr


def test_unsupported_server_is_a_config_error() -> None:
    from aqsh import errors

    assert issubclass(UnsupportedServer, errors.ConfigError)
