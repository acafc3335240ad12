"""A real aqsh (API + shell worker + delivery worker, wired as ``aqsh serve`` wires them) and a
real HTTP receiver on a free local port that records every request and plays scripted replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from aqsh.api.app import ApiRunner, create_app
from aqsh.engine.server import Server
from aqsh.redis_process import free_port
from aqsh.service import _notifier, _webhook_worker, _worker
from aqsh.settings import Settings
from aqsh.webhooks.notifier import Notifier
from aqsh.webhooks.signing import new_secret
from tests.api.conftest import Service
from tests.services import api_state, close_state, write_tasks

SCRIPTS = {
    "ok.sh": 'echo working\nprintf \'{"ok":true}\' > "$AQSH_RESULT_FILE"\n',
    "fail.sh": 'echo failing >&2\nexit 3\n',
    "slow.sh": 'echo started\nsleep 300\n',
    "big.sh": 'head -c 6000 /dev/zero | tr "\\0" a > "$AQSH_RESULT_FILE"\n',
}


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


class Receiver:
    """Replies to each path with its planned replies in order, then 200."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Received] = []
        self.plans: dict[str, list[Reply]] = {}
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, path: str, *replies: Reply) -> None:
        self.plans[path] = list(replies)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body,
                                      time.monotonic()))
        planned = self.plans.get(request.path)
        reply = planned.pop(0) if planned else Reply()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)  # a slow receiver, not synchronisation
        return web.Response(status=reply.status, headers=reply.headers, text="receiver says hi")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.stop()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_secret()
    monkeypatch.setenv("HOOK_SECRET", value)
    return value


@dataclass
class HookService(Service):
    notifier: Notifier | None = None
    webhook_server: Server | None = None


HookFactory = Callable[..., Awaitable[HookService]]
#: Fast retries, so tests see several attempts in seconds.
TEST_SCHEDULE = (0.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@pytest.fixture
async def make_hooks(redis: aioredis.Redis, redis_url: str,
                     tmp_path: Path) -> AsyncIterator[HookFactory]:
    created: list[tuple[web.AppRunner, HookService]] = []

    async def factory(tasks_yaml: str, *, worker: bool = True, **overrides: Any) -> HookService:
        config_path, scripts = write_tasks(tmp_path, SCRIPTS, tasks_yaml)
        port = free_port()
        values: dict[str, Any] = {
            "mode": "both" if worker else "api", "bind": f"127.0.0.1:{port}",
            "tasks_config": str(config_path), "tasks_dir": str(scripts),
            "results_dir": str(tmp_path / "work"), "shutdown_timeout_s": 2,
            "kill_grace_s": 1, "webhook_schedule_s": TEST_SCHEDULE, "webhook_timeout_s": 5.0,
            "webhook_sweep_interval_s": 1.0,
        }
        values.update(overrides)
        settings = Settings(**values)
        state = api_state(settings, redis_url, socket_timeout_s=5)
        holder, broker, metrics = state.config, state.broker, state.metrics
        notifier = state.notifier = _notifier(settings, holder, state)
        server = webhook_server = None
        if worker:
            server = _worker(settings, holder, broker, metrics, loops=state.loops,
                             notifier=notifier)
            webhook_server = _webhook_worker(settings, broker, metrics, loops=state.loops)
        notifier.start(sweep=worker)
        if webhook_server is not None:
            await webhook_server.start()
        if server is not None:
            await server.start()
        runner = ApiRunner(create_app(state), shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        session = aiohttp.ClientSession()
        service = HookService(f"http://127.0.0.1:{port}", session, state, server,
                              notifier=notifier, webhook_server=webhook_server)
        created.append((runner, service))
        return service

    yield factory
    for runner, service in created:
        await service.session.close()
        if service.server is not None:
            await service.server.stop(shutdown_timeout_s=0)
        if service.notifier is not None:
            await service.notifier.stop(drain_s=0.5)
        if service.webhook_server is not None:
            await service.webhook_server.stop(shutdown_timeout_s=0)
        await runner.cleanup()
        await close_state(service.state)
