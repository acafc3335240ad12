"""The aiohttp application: routes, middleware, and the HTTP limits it enforces.

Limits, chosen rather than inherited from aiohttp's defaults (SECURITY.md lists them):

* request line (method, URL, version) and each header at most ``MAX_LINE_BYTES``; at most
  ``MAX_HEADERS`` headers. An authenticating proxy adds a handful; browsers send ~20.
* body at most ``AQSH_MAX_BODY_BYTES`` (1 MiB), read within ``AQSH_HTTP_BODY_TIMEOUT`` (30 s).
* a connection idle (no request, or a request's headers still arriving) for longer than
  ``AQSH_HTTP_IDLE_TIMEOUT`` (75 s: longer than common proxies' upstream keep-alive of 60 s,
  so the proxy, not aqsh, closes an idle pooled connection and never reuses a dying one) is
  closed.

Errors found by aiohttp's HTTP parser before any route runs (a line too long, too many
headers, a malformed request) are answered in the same JSON envelope as every other error.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from aqsh.api import deliveries, handlers, health, runs, ui
from aqsh.api.errors import Handler, error_middleware, error_response
from aqsh.api.loghub import LogHub
from aqsh.api.state import STATE_KEY, ApiState

log = structlog.get_logger("aqsh.api")
access_log = structlog.get_logger("aqsh.access")

MAX_LINE_BYTES = 8190
MAX_HEADERS = 64


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request by route template (not raw path: ids would explode the
    label set). Sits outside the error middleware so error responses are counted too."""
    started = time.perf_counter()
    response = await handler(request)
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    request.app[STATE_KEY].metrics.request_done(
        template, request.method, response.status,
        # streams last as long as the client stays: not timed
        None if template.endswith("/logs") else time.perf_counter() - started)
    return response


class AccessLogger(AbstractAccessLogger):
    """The access log as one structlog event per request (``request.served``), in the same
    format as every other log line — JSON in containers — instead of aiohttp's Apache-style
    text through the standard library's logging, which cost several times more per request
    (a strftime, a LogRecord, a formatter). Same facts: peer, request line, status, bytes,
    duration, referer and user agent when sent; for an accepted ``POST /tasks/{name}`` also the
    task's ``task_id``, ``name``, ``queue`` and ``user`` (what a separate ``task.submitted``
    event said before: one event per request costs a POST a tenth of its CPU less)."""

    __slots__ = ("_log",)

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        # One per connection (aiohttp makes one per connection handler): bound once here,
        # not resolved through structlog's lazy proxy on every request.
        self._log = access_log.bind()

    @property
    def enabled(self) -> bool:
        # Asked once per connection: structlog's own level filter (configure_logging's level).
        check = getattr(self._log, "is_enabled_for", None)
        return True if check is None else bool(check(logging.INFO))

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        headers = request.headers
        # A submission's task_id, name, queue and user (handlers.SUBMITTED_KEY).
        extra: dict[str, Any] = request.get(handlers.SUBMITTED_KEY) or {}
        if (referer := headers.get("Referer")) is not None:
            extra["referer"] = referer
        if (agent := headers.get("User-Agent")) is not None:
            extra["user_agent"] = agent
        self._log.info("request.served", peer=request.remote, method=request.method,
                        path=request.raw_path, status=response.status,
                        bytes=response.body_length, duration_ms=round(time * 1000, 3), **extra)


def create_app(state: ApiState, *, api: bool = True) -> web.Application:
    """``api=False`` (worker mode) serves only health and metrics, for probes and scraping."""
    app = web.Application(
        middlewares=[metrics_middleware, ui.ui_headers_middleware, error_middleware,
                     ui.csrf_middleware],
        client_max_size=state.settings.max_body_bytes,
        handler_args=handler_args(state),
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
        app.router.add_get("/tasks", handlers.list_task_types)
        # One resource for POST (a type's name) and GET/DELETE (a task id): OpenAPI counts
        # /tasks/{name} and /tasks/{id} as the same path, and a 405's Allow header lists the
        # methods of every resource matching the URL anyway.
        task = app.router.add_resource("/tasks/{id}")
        task.add_route("POST", handlers.submit_task)
        task.add_route("GET", handlers.get_task)
        task.add_route("HEAD", handlers.get_task)  # as router.add_get would
        task.add_route("DELETE", handlers.cancel_task)
        app.router.add_get("/tasks/{id}/logs", handlers.task_logs)
        app.router.add_get("/runs", runs.list_runs)
        runs.start_indexer(app, state)
        app.router.add_get("/tasks/{id}/deliveries", deliveries.list_deliveries)
        app.router.add_post("/tasks/{id}/deliveries/{delivery}/retry",
                            deliveries.retry_delivery)
        ui.add_routes(app)
    app.router.add_get("/health", health.health)
    app.router.add_get("/health/live", health.live)
    app.router.add_get("/health/ready", health.ready)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.on_startup.append(freeze_startup_heap)  # last: after the other startup hooks
    return app


_heap_frozen = False


async def freeze_startup_heap(_: web.Application) -> None:
    """The app's start-up hook (every mode: a worker serves /health and /metrics too)."""
    settle_heap()


def settle_heap() -> None:
    """Once per process, as the first app starts: collect, then ``gc.freeze()`` what is left —
    the imported modules, the configuration, the connection pools, objects that live as long as
    the process — into the collector's permanent generation. Requests allocate objects that
    outlive a few young collections (in flight during a Redis round trip, at 50 connections many
    are), so full collections come often; each walked that whole startup heap, a fifth of a
    ``POST``'s CPU (benchmarks/README.md, "Third pass"). Frozen objects are still freed by
    reference counting; only a cycle among them would never be collected, and the collection
    before the freeze leaves none. Benchmarks that wire a worker in their own process call
    this as ``aqsh serve`` would have."""
    global _heap_frozen
    if _heap_frozen:  # a second app in the process (tests): the first one's freeze stands
        return
    _heap_frozen = True
    gc.collect()
    gc.freeze()
    # Young collections start once tracked allocations outnumber deallocations by the
    # threshold. At 700 (Python's default) the objects of the requests in flight alone cross it
    # (50 connections: ~1,200 young collections per 30,000 requests, ~5 µs of each request's
    # CPU); at YOUNG_GC_THRESHOLD they are a handful. Cyclic garbage waits a little longer.
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_GC_THRESHOLD), *older)


#: The young generation's collection threshold once the app has started (see above).
YOUNG_GC_THRESHOLD = 10_000


def handler_args(state: ApiState) -> dict[str, Any]:
    return {"max_line_size": MAX_LINE_BYTES, "max_field_size": MAX_LINE_BYTES,
            "max_headers": MAX_HEADERS,
            "keepalive_timeout": state.settings.http_idle_timeout_s}


class _JsonErrorProtocol(RequestHandler):
    """aiohttp's connection handler, answering its own errors (parser refusals, a handler
    timeout, an exception past every middleware) in the JSON envelope instead of text/plain.
    A malformed request is the client's fault: it is logged at debug level, not as an error."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # the response has begun: only closing is left
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            error_id = uuid.uuid4().hex
            log.error("http.internal_error", error_id=error_id, status=status, exc_info=exc)
            response = error_response(status, "internal",
                                      f"internal server error (error id {error_id})",
                                      details={"error_id": error_id},
                                      headers={"X-Error-Id": error_id})
        else:
            code, text = _protocol_error(exc)
            log.debug("http.bad_request", peer=request.remote, code=code,
                      error=str(exc) if exc is not None else message)
            response = error_response(status, code, text)
        response.force_close()
        return response


def _protocol_error(exc: BaseException | None) -> tuple[str, str]:
    if isinstance(exc, LineTooLong):
        return ("request_too_large",
                f"the request line or a header is longer than {MAX_LINE_BYTES} bytes")
    if isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        return "request_too_large", f"more than {MAX_HEADERS} headers"
    return "bad_request", "malformed HTTP request"


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer protocol errors in JSON and write the access
    log as structlog events; use it wherever an app from ``create_app`` is served (``aqsh
    serve``, the tests)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log_class", AccessLogger)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Same state and arguments; only the protocol factory differs. aiohttp offers no
        # public hook for the connection handler class.
        server.__class__ = _JsonErrorServer
        return server
