"""The OpenAPI 3.1 document of the HTTP API (served at /openapi.json; a test keeps it true, and
tests/security/test_schemathesis.py fuzzes a live service against it).

What OpenAPI cannot say, the descriptions do: a submission's body is the *named* task's input
object (the body schema is any configured task's inputs; a body valid for another task is
answered 422), ``process_in`` and ``process_at`` exclude each other (400 when both are given),
and ``process_at`` must lie within a year of now.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aqsh import __version__
from aqsh.api.sse import STREAM_ID_PATTERN
from aqsh.runner.spec import TaskSpec
from aqsh.runner.validate import json_schema

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_TASK_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "a task id (or, for POST, a task type's name)"}
_COMMON_ERRORS = {"400": _error("identity or groups header sent more than once"),
                  "401": _error("identity header required and missing"),
                  "404": _error("no task with this id that the caller may see"),
                  "503": _error("Redis unreachable; retry after Retry-After seconds")}
#: A Redis stream id: <ms>-<seq> (or <ms>), each part at most 2**64-1 (aqsh.api.sse).
_STREAM_ID = {"type": "string", "pattern": STREAM_ID_PATTERN}
_LOG_EVENTS = (
    "text/event-stream, one event per log line: `id` = the stream entry id (<ms>-<n>, n "
    "counting the log's entries), `data` = the line. Named events: `gap` (data "
    '{"lost": <count>}: entries the log\'s length cap trimmed before this client read them), '
    "`error` (data {\"code\", \"message\", \"retry_ms\"} and an SSE `retry:` hint: Redis "
    "stayed unreachable, the stream ends; reconnect with Last-Event-ID to resume with no gap), "
    "`eof` (data = the exit code: the task's last attempt finished, the stream ends). Comment "
    "lines (`: ping`) keep idle connections open. With follow=false: text/plain, one line per "
    "line, `[aqsh] <count> log lines lost: ...` where trimmed lines were."
)
#: aqsh.durations.DURATION_RE, for JSON Schema.
DURATION_PATTERN = r"^(?:\d+h)?(?:\d+m(?!s))?(?:\d+s)?(?:\d+ms)?$"
_TASK_LINKS = {
    "GetTask": {"operationId": "getTask", "parameters": {"id": "$response.body#/id"}},
    "CancelTask": {"operationId": "cancelTask", "parameters": {"id": "$response.body#/id"}},
}
_STATES = ["pending", "scheduled", "active", "retry", "completed", "archived", "canceled",
           "aggregating"]


_PARAM = {"type": "string", "minLength": 1, "maxLength": 256}
_RUNS = (
    "Each run as GET /tasks/{id} shows it; only runs the caller may see (the same check). "
    "Ordered by enqueue time, newest first. A page examines a bounded number of stored runs, "
    "so with filters that match rarely it may hold fewer than `limit` runs, even none, and "
    "still carry `next`: follow `next` until it is null. Runs of tasks enqueued by Go "
    "clients appear (to admins) within seconds, once the background indexer has seen them."
)


def _body_schema(tasks: Sequence[TaskSpec], max_string_len: int) -> dict[str, Any]:
    schemas = []
    for task in tasks:
        schema = json_schema(task, max_string_len=max_string_len)
        schema.pop("$schema", None)
        schemas.append(schema)
    if not schemas:
        return {"type": "object", "additionalProperties": False}
    return {"anyOf": schemas,
            "description": "the named task's inputs: its input_schema in GET /tasks"}


def _task_type(tasks: Sequence[TaskSpec]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if tasks:
        schema["enum"] = [task.name for task in tasks]
    return {**_TASK_ID, "schema": schema,
            "description": "the task type's name (GET /tasks); any other answers 404"}


def document(tasks: Sequence[TaskSpec] = (), *, max_string_len: int = 4096) -> dict[str, Any]:
    """``tasks``: the task types whose input schemas the caller may read (those it may run)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "aqsh", "version": __version__,
                 "description": "Run pre-configured shell scripts asynchronously."},
        "paths": {
            "/tasks": {"get": {
                "summary": "Task types with their input schemas",
                "responses": {"200": _json("task types", {
                    "type": "object", "required": ["tasks"],
                    "properties": {"tasks": {"type": "array",
                                             "items": {"$ref": "#/components/schemas/TaskType"}}},
                }), "400": _COMMON_ERRORS["400"], "401": _COMMON_ERRORS["401"]},
            }},
            "/tasks/{id}": {
                "post": {
                    "summary": "Submit a task", "operationId": "submitTask",
                    "parameters": [
                        _task_type(tasks),
                        {"name": "process_in", "in": "query",
                         "schema": {"type": "string", "minLength": 1, "maxLength": 64,
                                    "pattern": DURATION_PATTERN},
                         "description": "run later, e.g. 90s, 10m, 1h30m (at most 366 days); "
                                        "not with process_at"},
                        {"name": "process_at", "in": "query",
                         "schema": {"type": "string", "format": "date-time", "minLength": 1,
                                    "maxLength": 64},
                         "description": "run at this RFC 3339 time, within 366 days of now; "
                                        "not with process_in"},
                        {"name": "after", "in": "query",
                         "schema": {"type": "string", "minLength": 1, "maxLength": 8192},
                         "description": "comma-separated ids of tasks this run waits for: it "
                                        "starts once all completed, and is canceled if one "
                                        "fails, is canceled or is gone (404 "
                                        "dependency_not_found for an id you may not see); not "
                                        "with process_in/process_at or a group"},
                        {"name": "Idempotency-Key", "in": "header",
                         "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                    "pattern": r"\S"}},
                        {"name": "callback_url", "in": "query",
                         "schema": {"type": "string", "format": "uri", "maxLength": 2048},
                         "description": "POST a signed webhook (Standard Webhooks) here when "
                                        "the task completes, fails or is canceled; https, a "
                                        "host the operator allows, a public address. Not "
                                        "with the Aqsh-Callback-Url header"},
                        {"name": "Aqsh-Callback-Url", "in": "header",
                         "schema": {"type": "string", "format": "uri", "maxLength": 2048},
                         "description": "callback_url as a header"},
                    ],
                    "requestBody": {"required": False, "content": {"application/json": {
                        "schema": _body_schema(tasks, max_string_len)}}},
                    "responses": {
                        "202": {**_json("accepted", {"$ref": "#/components/schemas/Accepted"}),
                                "links": _TASK_LINKS},
                        "400": _error("malformed JSON, schedule, after= or Idempotency-Key, both "
                                      "process_in and process_at, or a callback_url that "
                                      "is refused or not accepted here"),
                        "401": _COMMON_ERRORS["401"],
                        "403": _error("caller is not in the task's allowed groups"),
                        "404": _error("no such task type, or an after= task the caller "
                                      "may not see (dependency_not_found)"),
                        "408": _error("the body did not arrive in time"),
                        "409": _error("Idempotency-Key reused with a different body"),
                        "410": _error("the Idempotency-Key's task ran and is no longer retained"),
                        "413": _error("body over the size limit"),
                        "415": _error("body is not application/json"),
                        "422": _error("input failed the named task's validation; details "
                                      "lists every field"),
                        "503": _COMMON_ERRORS["503"],
                    },
                },
                "get": {"summary": "Task state and result", "operationId": "getTask",
                        "parameters": [_TASK_ID],
                        "responses": {"200": _json("the task",
                                                   {"$ref": "#/components/schemas/Task"}),
                                      **_COMMON_ERRORS}},
                "delete": {"summary": "Cancel a task", "operationId": "cancelTask",
                           "parameters": [_TASK_ID],
                           "responses": {
                               "200": _json("removed before it ran (state canceled)",
                                            {"$ref": "#/components/schemas/CancelAccepted"}),
                               "202": _json("running: its process group is being stopped",
                                            {"$ref": "#/components/schemas/CancelAccepted"}),
                               "409": _error("the task already finished"),
                               **_COMMON_ERRORS}},
            },
            "/tasks/{id}/logs": {"get": {
                "summary": "Follow the task's output (Server-Sent Events)",
                "parameters": [
                    _TASK_ID,
                    {"name": "follow", "in": "query", "schema": {"type": "boolean"},
                     "description": "false: return what exists as text/plain"},
                    {"name": "Last-Event-ID", "in": "header", "schema": _STREAM_ID,
                     "description": "resume after this event id (what EventSource sends)"},
                    {"name": "last_event_id", "in": "query", "schema": _STREAM_ID,
                     "description": "the same, for clients that cannot set headers"},
                    {"name": "stderr", "in": "query", "schema": {"enum": ["event"]},
                     "description": "event: send stderr lines as `event: stderr` instead of "
                                    "the default message event (the console marks them)"},
                ],
                "responses": {
                    "200": {"description": _LOG_EVENTS,
                            "content": {"text/event-stream": {"schema": {"type": "string"}},
                                        "text/plain": {"schema": {"type": "string"}}}},
                    "400": _error("Last-Event-ID / last_event_id is not a stream id "
                                  "(code bad_last_event_id)"),
                    **_COMMON_ERRORS,
                    "503": _error("Redis unreachable, or this server already streams "
                                  "AQSH_MAX_SSE_CLIENTS logs (code too_many_followers); retry "
                                  "after Retry-After seconds"),
                },
            }},
            "/runs": {"get": {
                "summary": "Run history: the runs the caller may see, newest first",
                "operationId": "listRuns",
                "description": _RUNS,
                "parameters": [
                    {"name": "task", "in": "query", "schema": _PARAM,
                     "description": "only runs of this task type"},
                    {"name": "state", "in": "query", "schema": {"enum": _STATES},
                     "description": "only runs in this state; `active`: what runs now, on "
                                    "every worker"},
                    {"name": "submitted_by", "in": "query", "schema": _PARAM,
                     "description": "only runs this identity submitted"},
                    {"name": "since", "in": "query",
                     "schema": {"type": "string", "format": "date-time", "maxLength": 256},
                     "description": "only runs enqueued at or after this RFC 3339 time"},
                    {"name": "until", "in": "query",
                     "schema": {"type": "string", "format": "date-time", "maxLength": 256},
                     "description": "only runs enqueued at or before this RFC 3339 time"},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 200,
                                "default": 50}},
                    {"name": "cursor", "in": "query",
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,256}$"},
                     "description": "the `next` of the previous page (400 for any other)"},
                ],
                "responses": {
                    "200": _json("a page of runs", {"$ref": "#/components/schemas/RunPage"}),
                    "400": _error("a parameter is malformed or given twice (code "
                                  "invalid_query), or the cursor is not a `next` value "
                                  "(invalid_cursor); or the identity header was repeated"),
                    "401": _COMMON_ERRORS["401"],
                    "503": _COMMON_ERRORS["503"],
                },
            }},
            "/tasks/{id}/deliveries": {"get": {
                "summary": "The task's webhook deliveries and each attempt",
                "operationId": "listDeliveries",
                "parameters": [_TASK_ID],
                "responses": {"200": _json("deliveries",
                                           {"$ref": "#/components/schemas/Deliveries"}),
                              **_COMMON_ERRORS},
            }},
            "/tasks/{id}/deliveries/{delivery}/retry": {"post": {
                "summary": "Send a delivery again (same body and webhook-id, fresh schedule)",
                "operationId": "retryDelivery",
                "parameters": [_TASK_ID, {"name": "delivery", "in": "path", "required": True,
                                          "schema": {"type": "string"},
                                          "description": "a delivery id from the list"}],
                "responses": {
                    "202": _json("queued", {"type": "object", "required": ["id", "state"],
                                            "properties": {"id": {"type": "string"},
                                                           "task_id": {"type": "string"},
                                                           "state": {"const": "pending"},
                                                           "links": {"type": "object"}}}),
                    "409": _error("being attempted right now, or no longer retained"),
                    **_COMMON_ERRORS,
                },
            }},
            "/health": {"get": {"summary": "Version, mode and Redis reachability",
                                "responses": {"200": _json("healthy", {"type": "object"}),
                                              "503": _json("Redis unreachable",
                                                           {"type": "object"})}}},
            "/health/live": {"get": {"summary": "Liveness probe",
                                     "responses": {"200": _json("alive", {"type": "object"})}}},
            "/health/ready": {"get": {"summary": "Readiness probe",
                                      "responses": {"200": _json("ready", {"type": "object"}),
                                                    "503": _json("not ready",
                                                                 {"type": "object"})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition",
                                                       "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": _json("OpenAPI 3.1",
                                                                 {"type": "object"})}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                               "details": {}}}}},
            "Links": {"type": "object", "required": ["self", "logs"],
                      "properties": {"self": {"type": "string"}, "logs": {"type": "string"}}},
            "Accepted": {"type": "object",
                         "required": ["id", "name", "queue", "state", "submitted_by", "links"],
                         "properties": {
                             "id": {"type": "string"}, "name": {"type": "string"},
                             "queue": {"type": "string"}, "state": {"enum": _STATES},
                             "submitted_by": {"type": ["string", "null"]},
                             "links": {"$ref": "#/components/schemas/Links"}}},
            "CancelAccepted": {"type": "object", "required": ["id", "state", "links"],
                               "properties": {"id": {"type": "string"},
                                              "state": {"enum": ["canceled", "canceling"]},
                                              "links": {"$ref": "#/components/schemas/Links"}}},
            "Result": {"type": "object", "required": ["exit_code"],
                       "properties": {"exit_code": {"type": "integer"},
                                      "data": {"type": "string"},
                                      "error": {"type": "string"}}},
            "Task": {"type": "object",
                     "required": ["id", "name", "queue", "state", "input", "submitted_by",
                                  "enqueued_at", "started_at", "finished_at", "retries",
                                  "max_retry", "last_error", "result", "links"],
                     "properties": {
                         "id": {"type": "string"}, "name": {"type": "string"},
                         "queue": {"type": "string"}, "state": {"enum": _STATES},
                         "input": {}, "submitted_by": {"type": ["string", "null"]},
                         "enqueued_at": {"type": ["string", "null"], "format": "date-time"},
                         "started_at": {"type": ["string", "null"], "format": "date-time"},
                         "finished_at": {"type": ["string", "null"], "format": "date-time"},
                         "next_process_at": {"type": ["string", "null"],
                                             "format": "date-time"},
                         "retries": {"type": "integer"}, "max_retry": {"type": "integer"},
                         "last_error": {"type": ["string", "null"]},
                         "result": {"oneOf": [{"$ref": "#/components/schemas/Result"},
                                              {"type": "null"}]},
                         "links": {"$ref": "#/components/schemas/Links"}}},
            "RunPage": {"type": "object", "required": ["runs", "next"],
                        "properties": {
                            "runs": {"type": "array",
                                     "items": {"$ref": "#/components/schemas/Task"}},
                            "next": {"type": ["string", "null"],
                                     "description": "pass as `cursor` for the next page; "
                                                    "null: this was the last"}}},
            "TaskType": {"type": "object",
                         "required": ["name", "description", "queue", "timeout_s",
                                      "input_schema"],
                         "properties": {"name": {"type": "string"},
                                        "description": {"type": "string"},
                                        "queue": {"type": "string"},
                                        "timeout_s": {"type": "number"},
                                        "max_retry": {"type": "integer"},
                                        "retry_delay_s": {"type": "number"},
                                        "allowed_groups": {"type": "array",
                                                           "items": {"type": "string"}},
                                        "input_schema": {"type": "object"},
                                        "schedules": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Schedule"}},
                                        "concurrency": {"oneOf": [
                                            {"type": "null"},
                                            {"$ref": "#/components/schemas/ConcurrencyLimit"}]},
                                        "rate_limit": {"oneOf": [
                                            {"type": "null"},
                                            {"$ref": "#/components/schemas/RateLimit"}]}}},
            "ConcurrencyLimit": {
                "type": "object", "required": ["limit", "key"],
                "description": "at most `limit` runs with the same key run at once, across "
                               "every worker; the others wait their turn",
                "properties": {
                    "limit": {"type": "integer", "minimum": 1},
                    "key": {"type": ["string", "null"],
                            "description": "template over the inputs, e.g. {environment}; "
                                           "null: one limit for the whole task type"}}},
            "RateLimit": {
                "type": "object", "required": ["limit", "per_s", "key"],
                "description": "at most `limit` runs with the same key start per window of "
                               "`per_s` seconds; the others wait for the next window",
                "properties": {
                    "limit": {"type": "integer", "minimum": 1},
                    "per_s": {"type": "integer", "minimum": 1},
                    "key": {"type": ["string", "null"],
                            "description": "template over the inputs; null: one window for "
                                           "the whole task type"}}},
            "Deliveries": {"type": "object", "required": ["task_id", "deliveries"],
                           "properties": {"task_id": {"type": "string"}, "deliveries": {
                               "type": "array",
                               "items": {"$ref": "#/components/schemas/Delivery"}}}},
            "Delivery": {
                "type": "object",
                "required": ["id", "event", "url", "webhook_id", "state", "attempts"],
                "properties": {
                    "id": {"type": "string"},
                    "event": {"enum": ["task.completed", "task.failed", "task.canceled",
                                       "task.retrying", "task.started"]},
                    "url": {"type": "string", "description": "without credentials or query"},
                    "webhook_id": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "state": {"enum": ["pending", "delivering", "retrying", "delivered",
                                       "failed", "gone", "refused", "expired"]},
                    "next_attempt_at": {"type": ["string", "null"], "format": "date-time"},
                    "attempts": {"type": "array",
                                 "items": {"$ref": "#/components/schemas/DeliveryAttempt"}}}},
            "DeliveryAttempt": {
                "type": "object",
                "required": ["delivery", "attempt", "at", "duration_ms", "outcome"],
                "properties": {
                    "delivery": {"type": "string"}, "attempt": {"type": "integer"},
                    "at": {"type": "string", "format": "date-time"},
                    "duration_ms": {"type": "number"},
                    "outcome": {"enum": ["delivered", "retrying", "failed", "gone", "refused"]},
                    "status": {"type": ["integer", "null"]},
                    "error": {"type": ["string", "null"]},
                    "next_attempt_at": {"type": ["string", "null"], "format": "date-time"}}},
            "Schedule": {"type": "object", "required": ["cron", "input", "next_run_at"],
                         "description": "a periodic run from tasks.yaml (worker scheduler)",
                         "properties": {"cron": {"type": "string"},
                                        "input": {"type": "object"},
                                        "next_run_at": {"type": "string",
                                                        "format": "date-time"}}},
        }},
    }
