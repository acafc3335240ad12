"""The pieces every in-process service fixture shares (tests/api, tests/webhooks, …): the
scripts and tasks.yaml on disk, and an ApiState wired as ``aqsh serve`` wires it."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import redis.asyncio as aioredis

from aqsh.api.metrics import Metrics
from aqsh.api.state import ApiState
from aqsh.config_holder import ConfigHolder
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.rdb import RedisBroker
from aqsh.service import config_queues
from aqsh.settings import Settings


def write_tasks(root: Path, scripts: Mapping[str, str], tasks_yaml: str) -> tuple[Path, Path]:
    """``root/tasks.yaml`` and ``root/scripts/*`` (each body a /bin/sh script, dedented)."""
    scripts_dir = root / "scripts"
    scripts_dir.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = scripts_dir / name
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        path.chmod(0o755)
    config = root / "tasks.yaml"
    config.write_text(tasks_yaml)
    return config, scripts_dir


def api_state(settings: Settings, redis_url: str, *, fast_lane: bool = False,
              socket_timeout_s: float = 2.0) -> ApiState:
    """The API's state on ``redis_url``; close ``state.redis``, ``state.blocking_redis`` and
    ``state.client`` when done."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                     socket_connect_timeout=socket_timeout_s / 2)
    blocking = aioredis.Redis.from_url(redis_url, socket_timeout=30,
                                       socket_connect_timeout=socket_timeout_s / 2,
                                       max_connections=1000)
    broker = RedisBroker(client)
    holder = ConfigHolder(settings.tasks_config, settings.tasks_dir)
    return ApiState(settings=settings, config=holder, redis=client, blocking_redis=blocking,
                    broker=broker, client=Client(broker, fast_lane=fast_lane),
                    inspector=Inspector(client, known_queues=lambda: config_queues(holder)),
                    metrics=Metrics())


async def close_state(state: ApiState) -> None:
    await state.client.aclose()
    await state.redis.aclose()
    await state.blocking_redis.aclose()
