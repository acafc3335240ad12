"""Route handlers. They speak in tasks and transitions (Client, Inspector), never in keys."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from aqsh import errors
from aqsh.api.auth import Caller, authorize_submit, authorize_task, caller_of, may_run
from aqsh.api.errors import ApiError
from aqsh.api.openapi import document
from aqsh.api.sse import follow_logs, plain_logs, start_id
from aqsh.api.state import STATE_KEY, ApiState
from aqsh.api.view import CANCELED, FINISHED, public_state, task_document
from aqsh.api.view import iso as _iso
from aqsh.api.view import links as _view_links
from aqsh.durations import parse_duration
from aqsh.engine import flow, keys
from aqsh.engine.client import new_task_id
from aqsh.engine.cron import CronSpec
from aqsh.engine.inspect import QueueInfo
from aqsh.engine.keys import log_key, log_meta_key
from aqsh.engine.models import TaskInfo, TaskState
from aqsh.engine.rdb import broker_error, guarded
from aqsh.engine.scripts import Batch
from aqsh.runner.batches import DEFAULT_GROUP, GROUP_RE, group_name
from aqsh.runner.result import ScriptResult, encode_result
from aqsh.runner.spec import (
    HEADER_CALLBACK_URL,
    HEADER_SUBMITTED_AT,
    HEADER_SUBMITTED_BY,
    TaskSpec,
    access_headers,
    flow_headers,
)
from aqsh.runner.validate import json_schema, validate_input
from aqsh.webhooks.ssrf import CallbackRefused, callback_policy

log = structlog.get_logger("aqsh.api")
T = TypeVar("T")

_FINISHED = FINISHED


def _state(request: web.Request) -> ApiState:
    return request.app[STATE_KEY]


def _caller(request: web.Request) -> Caller:
    state = _state(request)
    return caller_of(request, state.settings, state.trust)


def _links(request: web.Request, task_id: str) -> dict[str, str]:
    return _view_links(task_id)


def json_response(body: Any, status: int = 200) -> web.Response:
    """``web.json_response`` with msgspec's encoder (several times faster than the standard
    library's on these small documents), same bytes on the wire up to whitespace and the same
    Content-Type."""
    return web.Response(body=msgspec.json.encode(body), status=status,
                        headers={"Content-Type": _JSON_CONTENT_TYPE})


_JSON_CONTENT_TYPE = "application/json; charset=utf-8"

#: What ``POST /tasks/{name}`` stored (task_id, name, queue, user): the access log line of
#: the request carries it, so that line is where a submission is logged.
SUBMITTED_KEY = web.RequestKey("aqsh_submitted", dict[str, Any])


# ---------------------------------------------------------------------------- submit
async def submit_task(request: web.Request) -> web.Response:
    state = _state(request)
    caller = caller_of(request, state.settings, state.trust)  # _caller, state looked up once
    name = request.match_info["id"]  # the task type: POST shares the /tasks/{id} resource
    spec = state.config().tasks.get(name)
    if spec is None:
        raise ApiError(404, "task_type_not_found", f"no task named {name!r} is configured")
    authorize_submit(caller, spec, name)
    body = await _json_body(request)
    values = validate_input(spec, body, max_string_len=state.settings.max_input_length)
    process_at = _schedule(request)
    group = _group(request, spec, process_at)
    after = await _after(request, caller, process_at, group)
    if after:
        # Stored waiting (aqsh.engine.flow): scheduled far ahead until the sweep starts it.
        process_at = datetime.fromtimestamp(flow.AFTER_SCORE_S, UTC)
    callback_url = _callback_url(request)
    payload = msgspec.json.encode(values)
    idem_key = request.headers.get("Idempotency-Key")
    task_id: str | None = None
    idem: _IdempotencyRecord | None = None
    if idem_key is not None:
        key = idem_key
        idem = await _riding_out_outages(state, lambda: guarded(
            _idempotent_id(state, caller, name, key, payload, process_at, group)))
        task_id = idem.task_id
        if idem.previous:
            try:
                info = await state.inspector.find_task(task_id, [spec.queue])
                return json_response(_accepted(request, info, name, caller), status=202)
            except errors.TaskNotFound:
                if idem.previous == "enqueued":
                    raise ApiError(
                        410, "idempotent_task_expired",
                        "the task submitted with this Idempotency-Key ran and is no longer "
                        "retained; use a new key to run it again",
                        details={"id": task_id}) from None
                # An earlier attempt stored the key but not its task (it was answered with an
                # error, e.g. 503 in a Redis blip): this retry enqueues it under the same id.
    # The access record travels with the task (asynq headers), so who may read or cancel it
    # is fixed now, whatever tasks.yaml says later.
    headers = {HEADER_SUBMITTED_AT: str(time.time_ns()), **access_headers(spec.allowed_groups),
               **flow_headers(spec, values)}
    if caller.user:
        headers[HEADER_SUBMITTED_BY] = caller.user
    if callback_url is not None:
        headers[HEADER_CALLBACK_URL] = callback_url
    if after:
        headers.update(flow.after_headers(after))
    # The id is fixed before the first attempt: when an attempt's answer is lost (Redis went
    # away mid-call), the next attempt meets its own task as a TaskIdConflict, never a twin.
    task_id = task_id or new_task_id()

    def enqueue() -> Awaitable[TaskInfo]:  # the client's coroutine itself: no wrapping one
        return state.client.enqueue(
            name, payload, queue=spec.queue, max_retry=spec.max_retry, timeout=spec.timeout_s,
            retention=state.settings.result_retention_s, headers=headers, task_id=task_id,
            process_at=process_at, group=group,
        )

    try:
        info = await _riding_out_outages(state, enqueue)
    except errors.TaskIdConflict:
        # An earlier attempt (this request's, or one with the same Idempotency-Key) stored it.
        info = await state.inspector.find_task(task_id, [spec.queue])
    if idem is not None and idem.previous != "enqueued":
        await _mark_enqueued(state, idem)
    state.metrics.task_submitted(name)
    # Said on the request's access log line (app.AccessLogger), not as a second event: one
    # line per request is a tenth of a POST's CPU less (benchmarks/README.md).
    request[SUBMITTED_KEY] = {"task_id": info.id, "name": name, "queue": spec.queue,
                              "user": caller.user}
    return json_response(_accepted(request, info, name, caller), status=202)


async def _riding_out_outages(state: ApiState, attempt: Callable[[], Awaitable[T]]) -> T:
    """Repeat ``attempt`` while Redis is unreachable, for up to ``AQSH_SUBMIT_RETRY``: a Redis
    restart or a Sentinel failover then costs callers latency, not 503s. A draining process
    gives up at once."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + state.settings.submit_retry_s
    delay_s = 0.05
    while True:
        try:
            return await attempt()
        except errors.BrokerUnavailable:
            if state.draining or loop.time() + delay_s > give_up_at:
                raise
        state.metrics.submit_retries.inc()
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 1.0)


async def _after(request: web.Request, caller: Caller, process_at: datetime | None,
                 group: str | None) -> list[tuple[str, str]]:
    """``?after=id1,id2``: the (queue, id) of each task the run waits for. The caller must be
    able to see each one, as GET /tasks/{id} decides: an unknown and an invisible id get the
    same 404, so a submission cannot probe for tasks it may not read."""
    raw = request.query.get("after")
    if raw is None:
        return []
    ids = [part.strip() for part in raw.split(",") if part.strip()]
    if not ids or len(ids) > 100:
        raise ApiError(400, "invalid_after", "after= takes 1 to 100 task ids, comma separated")
    if process_at is not None or group is not None:
        raise ApiError(400, "invalid_after",
                       "after= cannot be combined with a schedule or a batch group")
    state = _state(request)
    out: list[tuple[str, str]] = []
    for task_id in dict.fromkeys(ids):
        try:
            info = await state.inspector.find_task(task_id)
            authorize_task(caller, task_id, info.message.headers,
                           state.config().tasks.get(info.type))
        except errors.TaskNotFound:
            raise ApiError(404, "dependency_not_found", f"task {task_id} not found",
                           details={"after": task_id}) from None
        out.append((info.queue, info.id))
    return out


def _group(request: web.Request, spec: TaskSpec, process_at: datetime | None) -> str | None:
    """``?group=``: the batch a run of a task that aggregates joins (``default`` if none)."""
    given = request.query.getall("group", ())
    if spec.aggregate is None:
        if given:
            raise ApiError(400, "invalid_group",
                           f"task {spec.name!r} does not batch its runs (no 'aggregate:')")
        return None
    if len(given) > 1:
        raise ApiError(400, "invalid_group", "give group once")
    group = given[0] if given else DEFAULT_GROUP
    if not GROUP_RE.match(group):
        raise ApiError(400, "invalid_group",
                       "group must be 1-128 letters, digits or _ . : @ = - "
                       "(starting with a letter or digit)")
    if process_at is not None:
        raise ApiError(400, "invalid_group", "a run that joins a batch cannot be scheduled")
    return group_name(spec.name, group)


def _accepted(request: web.Request, info: TaskInfo, name: str, caller: Caller) -> dict[str, Any]:
    return {"id": info.id, "name": name, "queue": info.queue, "state": info.state.value,
            "submitted_by": info.message.headers.get(HEADER_SUBMITTED_BY, caller.user),
            "links": _links(request, info.id)}


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send the input as application/json")
    content = request.content
    if content.is_eof():
        # The whole body came with the headers (the usual small POST): it is all buffered, so
        # it is taken as it is — no timer, no read loop — and held to the same size limit
        # ``request.read()`` enforces.
        raw = content.read_nowait()
        if len(raw) > request.client_max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size,
                                                actual_size=len(raw))
    else:
        timeout_s = _state(request).settings.http_body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(408, "request_timeout",
                           f"the request body did not arrive within {timeout_s:g} s") from None
    if not raw.strip():
        return {}
    check_json_shape(raw)
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


#: Task inputs are one flat object of scalars; these bounds leave room for anything sensible
#: while keeping a hostile body from reaching the decoder (deep nesting: RecursionError; a
#: 100,000-digit number: seconds of CPU converting it).
MAX_JSON_DEPTH = 32
MAX_JSON_NUMBER_CHARS = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_JSON_LONG_NUMBER = re.compile(rb"[-+0-9.eE]{%d,}" % (MAX_JSON_NUMBER_CHARS + 1))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def check_json_shape(raw: bytes) -> None:
    """Reject, before decoding, a body nested deeper than MAX_JSON_DEPTH or holding a number
    literal longer than MAX_JSON_NUMBER_CHARS. Strings are blanked first (brackets and digits
    inside them are text); a linear scan, so the check costs less than the decode it guards.

    Both checks first look at the body as it is, which can only overcount (a run of number
    characters outside strings is one in the raw body too; strings only add brackets): a body
    that passes there passes, and the strings are blanked only for one that does not."""
    if _JSON_LONG_NUMBER.search(raw) is None and (
            len(raw.translate(None, _NOT_BRACKETS)) <= MAX_JSON_DEPTH):
        return
    outside = _JSON_STRING.sub(b'""', raw)
    if _JSON_LONG_NUMBER.search(outside):
        raise ApiError(400, "invalid_json", "request body has a number longer than "
                       f"{MAX_JSON_NUMBER_CHARS} characters")
    brackets = outside.translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_JSON_DEPTH:
        return
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, "invalid_json",
                           f"request body is nested deeper than {MAX_JSON_DEPTH} levels")


#: How far ahead a task may be scheduled: further is far more likely a unit mistake than a plan.
MAX_SCHEDULE_AHEAD_S = 366 * 24 * 3600.0
#: process_at may lie in the past (the task runs now), but not absurdly far.
MAX_SCHEDULE_BEHIND_S = 366 * 24 * 3600.0
_MAX_SCHEDULE_PARAM_CHARS = 64


def _schedule(request: web.Request) -> datetime | None:
    if not request.query_string:
        return None  # no query at all: nothing to parse
    process_in = request.query.get("process_in")
    process_at = request.query.get("process_at")
    if process_in is not None and process_at is not None:
        raise ApiError(400, "invalid_schedule", "give process_in or process_at, not both")
    for name, value in (("process_in", process_in), ("process_at", process_at)):
        if len(request.query.getall(name, ())) > 1:
            raise ApiError(400, "invalid_schedule", f"give {name} once")
        if value is not None and not (0 < len(value.strip()) <= _MAX_SCHEDULE_PARAM_CHARS):
            raise ApiError(400, "invalid_schedule",
                           f"{name} must be 1-{_MAX_SCHEDULE_PARAM_CHARS} characters")
    now_s = time.time()
    if process_in is not None:
        try:
            delay_s = parse_duration(process_in)
        except ValueError as exc:
            raise ApiError(400, "invalid_schedule", f"process_in: expected {exc}") from None
        if delay_s > MAX_SCHEDULE_AHEAD_S:
            raise ApiError(400, "invalid_schedule",
                           f"process_in is more than {MAX_SCHEDULE_AHEAD_S / 86400:g} days")
        return datetime.fromtimestamp(now_s + delay_s, UTC)
    if process_at is not None:
        try:
            when = datetime.fromisoformat(process_at.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError(400, "invalid_schedule",
                           "process_at must be an RFC 3339 time with a zone") from None
        if when.tzinfo is None:
            raise ApiError(400, "invalid_schedule", "process_at needs a time zone (e.g. Z)")
        try:
            when_s = when.timestamp()  # year 1 at +14:00 is before the epoch's range
        except (OverflowError, ValueError):
            when_s = float("-inf")
        if not now_s - MAX_SCHEDULE_BEHIND_S <= when_s <= now_s + MAX_SCHEDULE_AHEAD_S:
            raise ApiError(400, "invalid_schedule", "process_at must be within "
                           f"{MAX_SCHEDULE_AHEAD_S / 86400:g} days of now")
        return when.astimezone(UTC)
    return None


#: The header form of the ``callback_url`` query parameter.
CALLBACK_HEADER = "Aqsh-Callback-Url"


def _callback_url(request: web.Request) -> str | None:
    """A submission's ``callback_url`` (query parameter or header, never an input: inputs are
    the script's), checked against the operator's callback policy now, so a refused URL is a
    400 to its caller rather than a failed delivery nobody reads."""
    given = [*request.query.getall("callback_url", ()),
             *request.headers.getall(CALLBACK_HEADER, ())]
    if not given:
        return None
    if len(given) > 1:
        raise ApiError(400, "invalid_callback_url",
                       f"give callback_url once (query parameter or {CALLBACK_HEADER} header)")
    settings = _state(request).settings
    policy = callback_policy(settings.callback_allowed_hosts, settings.callback_allow_http,
                             settings.callback_allowed_networks)
    if not policy.enabled or not (settings.callback_secret or settings.callback_secret_file):
        raise ApiError(400, "callbacks_disabled",
                       "this service accepts no callback_url (the operator has not configured "
                       "AQSH_CALLBACK_ALLOWED_HOSTS and AQSH_CALLBACK_SECRET)")
    try:
        policy.check_url(given[0])
    except CallbackRefused as exc:
        raise ApiError(400, "invalid_callback_url", f"callback_url refused: {exc}") from None
    return str(given[0])


class _IdempotencyRecord(msgspec.Struct, frozen=True):
    redis_key: str
    task_id: str
    fingerprint: str
    #: what an earlier request with this key did: "" (none: this is the first), "recorded" (an
    #: attempt began; its enqueue may have failed) or "enqueued"
    previous: str

    def encode(self, *, enqueued: bool) -> bytes:
        record = {"id": self.task_id, "fingerprint": self.fingerprint}
        return msgspec.json.encode({**record, "enqueued": True} if enqueued else record)


async def _idempotent_id(state: ApiState, caller: Caller, name: str, key: str, payload: bytes,
                         process_at: datetime | None, group: str | None = None
                         ) -> _IdempotencyRecord:
    """The task id for this Idempotency-Key and what earlier requests with it did.

    SET NX makes two concurrent requests with one key agree on one id. The record holds a hash
    of the request, so the same key with a different body is refused (409). Its "enqueued" mark
    lets a retry tell a task that was never stored (enqueue it now) from one that ran and has
    since been deleted because its retention ended before the key's (it must not run twice).
    """
    if not key.strip() or len(key) > 255:
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 characters")
    scope = hashlib.sha256(f"{caller.user or ''}\0{name}\0{key}".encode()).hexdigest()
    fingerprint = hashlib.sha256(
        payload + b"\0" + (process_at.isoformat().encode() if process_at else b"")
        + (b"\0group=" + group.encode() if group else b"")  # a batch's run: which batch
    ).hexdigest()
    fresh = _IdempotencyRecord(keys.idempotency_key(scope), str(uuid.uuid4()), fingerprint, "")
    created = await state.redis.set(fresh.redis_key, fresh.encode(enqueued=False), nx=True,
                                    ex=max(1, int(state.settings.idempotency_ttl_s)))
    if created:
        return fresh
    raw = await state.redis.get(fresh.redis_key)
    if raw is None:  # expired between the two commands: treat as new
        return fresh
    stored = msgspec.json.decode(raw)
    if stored["fingerprint"] != fingerprint:
        raise ApiError(409, "idempotency_conflict",
                       "this Idempotency-Key was used with a different request body")
    return _IdempotencyRecord(fresh.redis_key, str(stored["id"]), fingerprint,
                              "enqueued" if stored.get("enqueued") else "recorded")


async def _mark_enqueued(state: ApiState, record: _IdempotencyRecord) -> None:
    """One SET XX KEEPTTL: the record keeps its original expiry. Failing here costs only the
    410 a much later retry would get, so it does not fail a request whose task is stored."""
    with contextlib.suppress(RedisError):
        await state.redis.set(record.redis_key, record.encode(enqueued=True), xx=True,
                              keepttl=True)


# ---------------------------------------------------------------------------- read
async def _find_authorized(request: web.Request) -> tuple[TaskInfo, TaskSpec | None, Caller]:
    state = _state(request)
    caller = _caller(request)
    task_id = request.match_info["id"]
    info = await state.inspector.find_task(task_id)
    spec = state.config().tasks.get(info.type)
    authorize_task(caller, task_id, info.message.headers, spec)
    return info, spec, caller


async def get_task(request: web.Request) -> web.Response:
    """The task, its attempt times riding in the same round trip as its lookup."""
    state = _state(request)
    caller = _caller(request)
    task_id = request.match_info["id"]
    times = Batch()
    # One script reads the log stream and its meta hash, which share a Cluster slot for every
    # id without "{" or "}" (keys.log_meta_key) — and the route's {id} matches no other.
    times.script(_ATTEMPT_TIMES, [log_meta_key(task_id), log_key(task_id)], [])
    info, (reply,) = await state.inspector.find_task_with(task_id, times, [_ATTEMPT_TIMES])
    authorize_task(caller, task_id, info.message.headers, state.config().tasks.get(info.type))
    if isinstance(reply, Exception):
        raise broker_error(reply) or reply
    started_ms, finished_ms = (None if ms is None else int(ms) for ms in reply)
    waiting = None
    if info.state is TaskState.SCHEDULED:  # the only state a held run is in
        waiting = (await guarded(flow.waiting_many(state.redis, [(info.queue, info.id)])))[0]
    return json_response(with_waiting(task_document(info, started_ms, finished_ms), waiting,
                                      info))


#: lua/log_attempt_times.lua: view.attempt_times as one read-only script call.
_ATTEMPT_TIMES = "log_attempt_times"


def with_waiting(doc: dict[str, Any], waiting: flow.Waiting | None,
                 info: TaskInfo) -> dict[str, Any]:
    """A held run's document says why it waits: ``reason`` (concurrency, rate, after),
    ``key`` (the task name and the rendered key; for ``after`` the ids waited for, comma
    separated), ``position`` in the key's line (0 = next; null for rate and after) and
    ``since``. Documents of runs that do not wait have no ``waiting``."""
    after = flow.after_of(info.message)
    if waiting is None and after and info.state is TaskState.SCHEDULED:
        doc["waiting"] = {"reason": flow.REASON_AFTER, "key": ",".join(i for _, i in after),
                          "position": None, "since": doc.get("enqueued_at")}
    if waiting is not None:
        doc["waiting"] = {
            "reason": waiting.reason, "key": waiting.key, "position": waiting.position,
            "since": (_iso(waiting.since_ms / 1000) if waiting.since_ms is not None else None),
        }
    return doc


async def task_logs(request: web.Request) -> web.StreamResponse:
    info, _, _ = await _find_authorized(request)
    state = _state(request)
    after = start_id(request)
    follow = request.query.get("follow", "true")
    if follow not in ("true", "false"):
        raise ApiError(400, "invalid_follow", "follow must be true or false")
    if follow == "false":
        return await plain_logs(request, state.redis, info.id, after)

    async def finished() -> bool:
        try:
            current = await state.inspector.find_task(info.id, [info.queue])
        except errors.TaskNotFound:
            return True
        return current.state in _FINISHED

    return await follow_logs(request, state.blocking_redis, info.id, after, finished,
                             state.metrics.sse_clients.inc, state.metrics.sse_clients.dec,
                             hub=state.log_hub, max_clients=state.settings.max_sse_clients)


# ---------------------------------------------------------------------------- cancel
async def cancel_task(request: web.Request) -> web.Response:
    info, _, caller = await _find_authorized(request)
    state = _state(request)
    if info.state in _FINISHED:
        raise ApiError(409, "task_finished", f"task {info.id} already finished "
                       f"({public_state(info)})")
    if info.state is TaskState.ACTIVE:
        await state.inspector.cancel_processing(info.id)
        log.info("task.cancel_requested", task_id=info.id, user=caller.user)
        return await _outcome_of_cancel(request, info)
    # Not running: archive it with a "canceled" result, so it stays readable (and re-runnable
    # from Asynqmon) instead of vanishing into a 404. No worker ends it, so the webhook intent
    # is stored here first (a sweep delivers task.canceled if this process dies meanwhile).
    notifier = state.notifier
    notify = notifier is not None and bool(notifier.targets(info.type, info.message.headers))
    if notify and notifier is not None:
        await notifier.register_intent(info.queue, info.id, info.message.retried)
    try:
        await state.inspector.archive_task(info.queue, info.id)
    except errors.TaskStateConflict:
        current = await state.inspector.find_task(info.id, [info.queue])
        if current.state is TaskState.ACTIVE:  # it started meanwhile
            await state.inspector.cancel_processing(info.id)
            return await _outcome_of_cancel(request, info)
        raise ApiError(409, "task_finished", f"task {info.id} already finished") from None
    await state.broker.write_result(info.queue, info.id,
                                    encode_result(ScriptResult(exit_code=-1, error=CANCELED)))
    log.info("task.canceled", task_id=info.id, user=caller.user)
    if notify and notifier is not None:
        await notifier.canceled(info.message)
    return web.json_response({"id": info.id, "state": CANCELED,
                              "links": _links(request, info.id)}, status=200)


#: How long DELETE of a running task waits to report what became of it before answering 202.
CANCEL_SETTLE_S = 2.0


async def _outcome_of_cancel(request: web.Request, info: TaskInfo) -> web.Response:
    """A cancel can lose the race with completion: the script had exited and its ack was on
    its way when the request came. Answer what really happened — 200 canceled, or 409 with the
    state it finished in — and 202 only while it is genuinely still stopping."""
    state = _state(request)
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + CANCEL_SETTLE_S
    delay_s = 0.02
    while loop.time() < give_up_at:
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, 0.25)
        try:
            current = await state.inspector.find_task(info.id, [info.queue])
        except errors.TaskNotFound:  # finished and not retained
            raise ApiError(409, "task_finished",
                           f"task {info.id} already finished") from None
        if current.state is TaskState.ACTIVE:
            continue
        final = public_state(current)
        if final == CANCELED:
            return web.json_response({"id": info.id, "state": CANCELED,
                                      "links": _links(request, info.id)}, status=200)
        raise ApiError(409, "task_finished", f"task {info.id} already finished ({final})",
                       details={"state": final})
    return web.json_response({"id": info.id, "state": "canceling",
                              "links": _links(request, info.id)}, status=202)


# ---------------------------------------------------------------------------- catalogue
async def list_task_types(request: web.Request) -> web.Response:
    state = _state(request)
    caller = _caller(request)
    config = state.config()
    now_s = time.time()
    out = []
    for name in sorted(config.tasks):
        spec = config.tasks[name]
        if not may_run(caller, spec):
            continue  # neither its inputs nor its schedules' inputs are this caller's business
        out.append({
            "name": name, "description": spec.description, "queue": spec.queue,
            "timeout_s": spec.timeout_s, "max_retry": spec.max_retry,
            "retry_delay_s": spec.retry_delay_s, "allowed_groups": list(spec.allowed_groups),
            "input_schema": json_schema(spec, max_string_len=state.settings.max_input_length),
            "schedules": [
                {"cron": schedule.cron, "input": schedule.input,
                 "next_run_at": _iso(CronSpec(schedule.cron).next_after(now_s))}
                for schedule in spec.schedules
            ],
            # As configured (the key template, not a rendered key); null: no such limit.
            "concurrency": None if spec.concurrency is None else {
                "limit": spec.concurrency.limit, "key": spec.concurrency.key},
            "rate_limit": None if spec.rate_limit is None else {
                "limit": spec.rate_limit.limit, "per_s": spec.rate_limit.per_s,
                "key": spec.rate_limit.key},
        })
    return web.json_response({"tasks": out})


async def metrics(request: web.Request) -> web.Response:
    state = _state(request)

    async def compute() -> list[QueueInfo]:
        infos = []
        waiting: dict[tuple[str, str], int] = {}
        for qname in await state.inspector.queues():
            try:
                infos.append(await state.inspector.queue_info(qname))
            except errors.QueueNotFound:
                continue
            for label, n in (await guarded(flow.waiting_census(state.redis, qname))).items():
                waiting[label] = waiting.get(label, 0) + n
            state.metrics.runs_waited(await guarded(flow.take_waits(state.redis, qname)))
        state.metrics.set_waiting(waiting)
        return infos

    await state.metrics.queue_figures.refresh(compute)
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    """Input schemas only of the task types the caller may run, as in GET /tasks."""
    state = _state(request)
    config = state.config()
    try:
        caller = _caller(request)
        tasks = [config.tasks[n] for n in sorted(config.tasks) if may_run(caller, config.tasks[n])]
    except ApiError:  # anonymous where identity is required: the document without inputs
        tasks = []
    return web.json_response(document(tasks, max_string_len=state.settings.max_input_length))
