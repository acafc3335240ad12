"""The aiohttp application: routes, middleware, body limit."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from aiohttp import web

from aqsh.api import handlers, health
from aqsh.api.errors import Handler, error_middleware
from aqsh.api.loghub import LogHub
from aqsh.api.state import STATE_KEY, ApiState


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by route template (not raw path: ids would explode the
    label set). Sits outside the error middleware so error responses are counted too."""
    started = time.perf_counter()
    response = await handler(request)
    state = request.app[STATE_KEY]
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    state.metrics.http_requests.labels(template, request.method, str(response.status)).inc()
    if not template.endswith("/logs"):  # streams last as long as the client stays
        state.metrics.http_latency.labels(template, request.method).observe(
            time.perf_counter() - started)
    return response


def create_app(state: ApiState, *, api: bool = True) -> web.Application:
    """``api=False`` (worker mode) serves only health and metrics, for probes and scraping."""
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware],
        client_max_size=state.settings.max_body_bytes,
    )
    app[STATE_KEY] = state
    state.metrics.registry.register(health.LoopErrorsCollector(state.loops))
    if api and state.log_hub is None and isinstance(state.blocking_redis, aioredis.Redis):
        hub = state.log_hub = LogHub(state.blocking_redis,
                                     monitor=state.loops.monitor("sse_hub"))

        async def close_hub(_: web.Application) -> None:
            await hub.close()

        app.on_cleanup.append(close_hub)
    if api:
        app.router.add_post("/tasks/{name}", handlers.submit_task)
        app.router.add_get("/tasks", handlers.list_task_types)
        app.router.add_get("/tasks/{id}", handlers.get_task)
        app.router.add_delete("/tasks/{id}", handlers.cancel_task)
        app.router.add_get("/tasks/{id}/logs", handlers.task_logs)
    app.router.add_get("/health", health.health)
    app.router.add_get("/health/live", health.live)
    app.router.add_get("/health/ready", health.ready)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", handlers.openapi)
    return app
