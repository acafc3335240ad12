"""A real aqsh service on a real port: API + worker + Redis, built the way ``aqsh serve`` is."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from aqsh.api.app import ApiRunner, create_app
from aqsh.api.state import ApiState
from aqsh.engine.server import Server
from aqsh.redis_process import free_port
from aqsh.service import _worker
from aqsh.settings import Settings
from tests.services import api_state, close_state
from tests.services import write_tasks as write_scripts_and_tasks

TASKS_YAML = """\
defaults: {timeout: 1m, max_retry: 0, retry_delay: 1s}
tasks:
  echo:
    script: echo.sh
    description: "Echo a name"
    input:
      - {name: name, env: NAME, required: true, pattern: '[a-z]+'}
      - {name: times, env: TIMES, type: int, min: 1, max: 5, default: 1}
  lines:
    script: lines.sh
    input:
      - {name: count, env: COUNT, type: int, min: 1, max: 100000, default: 10}
  slow:
    script: slow.sh
  result:
    script: result.sh
  secret:
    script: echo.sh
    allowed_groups: [ops, admins]
    input:
      - {name: name, env: NAME, required: true}
"""

SCRIPTS = {
    "echo.sh": 'i=0\nwhile [ $i -lt "$TIMES" ]; do echo "hello $NAME"; i=$((i+1)); done\n',
    "lines.sh": 'i=0\nwhile [ $i -lt "$COUNT" ]; do echo "line $i"; i=$((i+1)); done\n',
    "slow.sh": 'echo started\nsleep 300\n',
    "result.sh": 'echo working\nprintf \'{"ok":true}\' > "$AQSH_RESULT_FILE"\n',
}


def write_tasks(root: Path, tasks_yaml: str = TASKS_YAML) -> tuple[Path, Path]:
    return write_scripts_and_tasks(root, SCRIPTS, tasks_yaml)


@dataclass
class Service:
    url: str
    session: aiohttp.ClientSession
    state: ApiState
    server: Server | None

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.url + path, **kwargs) as resp:
            text = await resp.text()
            try:
                body = await resp.json(content_type=None) if text else None
            except ValueError:
                body = text
            return resp.status, body, resp.headers


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(
    redis: aioredis.Redis, redis_url: str, tmp_path: Path
) -> AsyncIterator[ServiceFactory]:
    created: list[tuple[web.AppRunner, Service]] = []

    async def factory(*, worker: bool = True, url: str | None = None, fast_lane: bool = False,
                      tasks_yaml: str = TASKS_YAML, **overrides: Any) -> Service:
        config_path, scripts = write_tasks(tmp_path, tasks_yaml)
        port = free_port()
        settings = Settings(
            mode="both" if worker else "api", bind=f"127.0.0.1:{port}",
            tasks_config=str(config_path), tasks_dir=str(scripts),
            results_dir=str(tmp_path / "work"), shutdown_timeout_s=2, kill_grace_s=1,
            **overrides,
        )
        state = api_state(settings, url or redis_url, fast_lane=fast_lane)
        server = (_worker(settings, state.config, state.broker, state.metrics, loops=state.loops)
                  if worker else None)
        if server is not None:
            await server.start()
        runner = ApiRunner(create_app(state), shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        session = aiohttp.ClientSession()
        service = Service(f"http://127.0.0.1:{port}", session, state, server)
        created.append((runner, service))
        return service

    yield factory
    for runner, service in created:
        await service.session.close()
        if service.server is not None:
            await service.server.stop(shutdown_timeout_s=0)
        await runner.cleanup()
        await close_state(service.state)


async def sse_events(service: Service, task_id: str, *, last_event_id: str | None = None,
                     limit: int | None = None, headers: dict[str, str] | None = None
                     ) -> list[dict[str, str]]:
    """Read SSE events until eof (or ``limit`` data events); returns [{id, event, data}]."""
    hdrs = dict(headers or {})
    if last_event_id is not None:
        hdrs["Last-Event-ID"] = last_event_id
    events: list[dict[str, str]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with service.session.get(f"{service.url}/tasks/{task_id}/logs", headers=hdrs,
                                   timeout=timeout) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if "data" in current or current.get("event"):
                    events.append(current)
                    if current.get("event") == "eof":
                        break
                    if limit is not None and len(events) >= limit:
                        break
                current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            current[field] = current[field] + "\n" + value if field == "data" and field in \
                current else value
    return events


os.environ.setdefault("AQSH_LOG_FORMAT", "json")
