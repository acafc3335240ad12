"""GET /runs: the runs a caller may see, newest first, from the run index
(``aqsh.engine.runindex``), and the background indexer that keeps the index complete.

Authorization is GET /tasks/{id}'s, run by run (``auth.may_see``): a run the caller may not
see is skipped as if it did not exist, so a listing reveals nothing a lookup by id would not.
Task types the caller may not run are not even read (their runs would all be skipped).

A page examines at most ``runindex.DEFAULT_SCAN_BUDGET`` index entries. With filters that
match rarely (``submitted_by`` of someone who ran little, an old ``state``) a page can hold
fewer than ``limit`` runs — even none — and still carry a ``next`` cursor: the client follows
``next`` until it is absent. That is what keeps the cost of a page independent of the history.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from datetime import datetime
from typing import Any

import msgspec
import structlog
from aiohttp import web

from aqsh.api.auth import Caller, may_run, may_see
from aqsh.api.errors import ApiError
from aqsh.api.handlers import _caller, _state, with_waiting
from aqsh.api.state import ApiState
from aqsh.api.view import CANCELED, attempt_times_many, public_state, task_document
from aqsh.engine import flow
from aqsh.engine.faults import LoopMonitor, supervise
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import guarded
from aqsh.engine.runindex import Cursor, Page, Run, RunIndex, RunIndexer, Source
from aqsh.runner.spec import HEADER_SUBMITTED_BY, TasksConfig

log = structlog.get_logger("aqsh.api")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: The states a run can be filtered by: asynq's, and aqsh's ``canceled`` (an archived task
#: whose result says it was canceled; ``archived`` then means failed).
STATES = (*(s.value for s in TaskState), CANCELED)
_MAX_PARAM_CHARS = 256
#: Seconds between two passes of the indexer.
INDEXER_INTERVAL_S = 2.0

INDEXER_KEY = web.AppKey("aqsh_run_indexer", asyncio.Task[None])


class _Query(msgspec.Struct, kw_only=True):
    task: str | None = None
    state: str | None = None
    submitted_by: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cursor = msgspec.json.decode(raw, type=Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise ApiError(400, "invalid_cursor",
                       "cursor must be a `next` value from an earlier page") from None
    if not cursor.task_id or cursor.score_ms < 0:
        raise ApiError(400, "invalid_cursor", "cursor must be a `next` value from an earlier page")
    return cursor


def _time_ms(name: str, value: str) -> int:
    try:
        # RFC 3339 allows "t" and "z" in lower case; fromisoformat does not.
        when = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError(value)
        return max(0, int(when.timestamp() * 1000))
    except (ValueError, OverflowError, OSError):
        raise ApiError(400, "invalid_query",
                       f"{name} must be an RFC 3339 time with a zone, e.g. "
                       "2026-01-31T12:00:00Z") from None


def parse_query(request: web.Request) -> _Query:
    query = _Query()
    for name in ("task", "state", "submitted_by", "since", "until", "limit", "cursor"):
        values = request.query.getall(name, [])
        if not values:
            continue
        if len(values) > 1:
            raise ApiError(400, "invalid_query", f"give {name} once")
        value = values[0]
        if not value or len(value) > _MAX_PARAM_CHARS:
            raise ApiError(400, "invalid_query", f"{name} must be 1-{_MAX_PARAM_CHARS} characters")
        if name == "task":
            query.task = value
        elif name == "state":
            if value not in STATES:
                raise ApiError(400, "invalid_query", "state must be one of: " + ", ".join(STATES))
            query.state = value
        elif name == "submitted_by":
            query.submitted_by = value
        elif name == "since":
            query.since_ms = _time_ms(name, value)
        elif name == "until":
            query.until_ms = _time_ms(name, value)
        elif name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
                raise ApiError(400, "invalid_query", f"limit must be an integer 1-{MAX_LIMIT}")
            query.limit = int(value)
        else:
            query.cursor = decode_cursor(value)
    return query


def sources_for(caller: Caller, config: TasksConfig, registered: set[Source],
                task: str | None) -> set[Source]:
    """The indexes a listing reads: tasks.yaml's types and every registered index (types no
    longer configured, types only Go clients enqueue), narrowed to ``task``, without the
    configured types the caller may not run (it could see none of their runs)."""
    sources = {Source(spec.queue, name) for name, spec in config.tasks.items()} | registered
    out = set()
    for source in sources:
        if task is not None and source.task_type != task:
            continue
        spec = config.tasks.get(source.task_type)
        if spec is not None and not may_run(caller, spec):
            continue
        out.add(source)
    return out


async def list_runs(request: web.Request) -> web.Response:
    state = _state(request)
    caller = _caller(request)
    query = parse_query(request)
    config = state.config()
    index = RunIndex(state.redis)

    def accept(run: Run) -> bool:
        info = run.info
        if query.task is not None and info.type != query.task:
            return False
        if not may_see(caller, info.message.headers, config.tasks.get(info.type)):
            return False
        if query.state is not None and public_state(info) != query.state:
            return False
        return (query.submitted_by is None
                or info.message.headers.get(HEADER_SUBMITTED_BY) == query.submitted_by)

    if query.state == TaskState.ACTIVE.value:
        page = await _active_page(state, index, query, accept)
    else:
        sources = sources_for(caller, config, await index.sources(), query.task)
        page = await index.page(sources, limit=query.limit, accept=accept,
                                cursor=query.cursor, since_ms=query.since_ms,
                                until_ms=query.until_ms)
    times = await attempt_times_many(state.redis, [run.info.id for run in page.runs])
    waiting = await guarded(flow.waiting_many(
        state.redis, [(run.info.queue, run.info.id) for run in page.runs]))
    body: dict[str, Any] = {
        "runs": [with_waiting(task_document(run.info, *t), w, run.info)
                 for run, t, w in zip(page.runs, times, waiting, strict=True)],
        "next": encode_cursor(page.next) if page.next is not None else None,
    }
    return web.json_response(body)


async def _active_page(state: ApiState, index: RunIndex, query: _Query,
                       accept: Any) -> Page:
    """What is running now, on every worker: straight from asynq's active lists (they hold
    as many tasks as the workers' concurrency), not from the index."""
    queues = set(await state.inspector.queues())
    queues |= {spec.queue for spec in state.config().tasks.values()}
    running = await index.active(queues)
    after = query.cursor
    picked: list[Run] = []
    more = False
    for run in running:
        position = (run.enqueued_ms, run.info.id.encode())
        if after is not None and position >= (after.score_ms, after.task_id.encode()):
            continue
        if query.until_ms is not None and run.enqueued_ms > query.until_ms:
            continue
        if query.since_ms is not None and run.enqueued_ms < query.since_ms:
            continue
        if not accept(run):
            continue
        if len(picked) == query.limit:
            more = True
            break
        picked.append(run)
    last = picked[-1] if picked else None
    return Page(runs=picked, next=Cursor(last.enqueued_ms, last.info.id)
                if more and last is not None else None)


# ---------------------------------------------------------------------------- indexer
def _known_sources(state: ApiState) -> list[Source]:
    return [Source(spec.queue, name) for name, spec in state.config().tasks.items()]


def start_indexer(app: web.Application, state: ApiState) -> None:
    """Runs :class:`RunIndexer` for as long as the app, every ``INDEXER_INTERVAL_S``.

    Its monitor is not one of the process's health loops: a history missing Go tasks for a
    while is no reason to take the API out of a load balancer."""
    indexer = RunIndexer(state.redis, known=lambda: _known_sources(state))
    monitor = LoopMonitor("run_indexer", ready_after_s=60.0, live_after_s=600.0)

    stop = asyncio.Event()

    async def body() -> None:
        while not stop.is_set():
            added = await indexer.run_once()
            if added:
                log.debug("runs.indexed", added=added)
            monitor.ok()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=INDEXER_INTERVAL_S)

    async def on_startup(_: web.Application) -> None:
        app[INDEXER_KEY] = asyncio.create_task(supervise(monitor, body), name="run_indexer")

    async def on_cleanup(_: web.Application) -> None:
        task = app.get(INDEXER_KEY)
        if task is None:
            return
        # The event ends the loop even when a cancellation was lost inside a Redis call
        # (redis-py can swallow one while it tears a connection down).
        stop.set()
        task.cancel()
        await asyncio.wait({task}, timeout=INDEXER_INTERVAL_S + 5)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
