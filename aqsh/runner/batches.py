"""Batches: shell tasks that declare ``aggregate:`` run once per group of submissions.

A submission ``POST /tasks/{name}?group=<g>`` joins the asynq group ``<name>/<g>`` (state
``aggregating``); the engine's aggregator (aqsh.engine.aggregator) turns a due group into one
task of the same type whose payload holds the group's inputs as JSON lines; the runner writes
them to a file named by ``$AQSH_BATCH_FILE`` and runs the script once.

The task name is part of the group name so that a group belongs to one task type, whose own
``aggregate:`` settings then apply; task names never contain ``/``, so the name is what comes
before the first one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import msgspec

from aqsh.engine.aggregator import GroupSettings
from aqsh.engine.client import EnqueueRequest
from aqsh.engine.task import Task
from aqsh.runner.spec import (
    HEADER_SUBMITTED_AT,
    HEADER_SUBMITTED_BY,
    TasksConfig,
    access_headers,
)

GROUP_SEPARATOR = "/"
#: The group a submission joins when it names none.
DEFAULT_GROUP = "default"
#: What a caller may name a group: it becomes part of a Redis key.
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@=-]{0,127}$")
#: Headers of an aggregated task: the caller's group name and how many runs it holds. The first
#: also tells the runner that the payload is a batch (JSON lines), not one run's inputs.
HEADER_BATCH_GROUP = "aqsh-batch-group"
HEADER_BATCH_SIZE = "aqsh-batch-size"
#: ``submitted_by`` of an aggregated task: many callers' runs, none of them its owner.
AGGREGATOR_USER = "aqsh-aggregator"
#: asynq checks groups every min(7 s, grace period).
MAX_CHECK_INTERVAL_S = 7.0


def group_name(task_name: str, group: str) -> str:
    """The asynq group of a submission to ``task_name`` with the caller's ``group``."""
    return f"{task_name}{GROUP_SEPARATOR}{group}"


def split_group(name: str) -> tuple[str, str] | None:
    """(task name, caller's group) of an asynq group made by ``group_name``; None for a group
    some other enqueuer made."""
    task_name, sep, group = name.partition(GROUP_SEPARATOR)
    return (task_name, group) if sep and task_name and group else None


def shell_group_settings(
    config: Callable[[], TasksConfig],
) -> Callable[[str, str], GroupSettings | None]:
    """The ``aggregate:`` settings of the task a group belongs to; None (not this worker's to
    aggregate, and warned about) for groups of tasks without one, or not made by aqsh."""

    def settings(qname: str, group: str) -> GroupSettings | None:
        parts = split_group(group)
        spec = config().tasks.get(parts[0]) if parts is not None else None
        if spec is None or spec.aggregate is None or spec.queue != qname:
            return None
        agg = spec.aggregate
        return GroupSettings(grace_period_s=agg.grace_s, max_delay_s=agg.max_delay_s,
                             max_size=agg.max_size)

    return settings


def check_interval_s(config: TasksConfig) -> float:
    """min(7 s, the shortest grace period of the tasks that aggregate)."""
    graces = [s.aggregate.grace_s for s in config.tasks.values() if s.aggregate is not None]
    return min([MAX_CHECK_INTERVAL_S, *graces])


def shell_aggregator(
    config: Callable[[], TasksConfig], *, result_retention_s: float,
) -> Callable[[str, list[Task]], EnqueueRequest]:
    """One task of the group's type holding every run's inputs, one JSON object a line, in the
    order they joined. It gets the task's own retries, timeout and access record."""

    def aggregate(group: str, tasks: list[Task]) -> EnqueueRequest:
        parts = split_group(group)
        spec = config().tasks.get(parts[0]) if parts is not None else None
        if parts is None or spec is None or spec.aggregate is None:
            raise ValueError(f"group {group!r} belongs to no task that aggregates")
        strangers = sorted({t.type for t in tasks} - {spec.name})
        if strangers:
            raise ValueError(f"group {group!r} holds tasks of other types: {strangers}")
        headers = {
            HEADER_SUBMITTED_AT: str(time.time_ns()),
            HEADER_SUBMITTED_BY: AGGREGATOR_USER,
            HEADER_BATCH_GROUP: parts[1],
            HEADER_BATCH_SIZE: str(len(tasks)),
            **access_headers(spec.allowed_groups),
        }
        return EnqueueRequest(
            type=spec.name, payload=b"".join(_line(t.payload) for t in tasks),
            max_retry=spec.max_retry, timeout=spec.timeout_s, retention=result_retention_s,
            headers=headers)

    return aggregate


def _line(payload: bytes) -> bytes:
    """One run's inputs as one line. aqsh's own payloads are compact JSON already; anything
    else (a Go enqueuer's) is re-encoded so a newline inside cannot split it, and a payload
    that is not JSON becomes a JSON string, which the runner then refuses as inputs."""
    try:
        value = msgspec.json.decode(payload) if payload.strip() else {}
    except msgspec.DecodeError:
        value = payload.decode("utf-8", "replace")
    return msgspec.json.encode(value) + b"\n"


def batch_inputs(task: Task) -> list[object]:
    """The runs' inputs of a task: one per line of an aggregated task, else the task's own
    payload (a batch of one: a grouped run that an operator ran alone, say)."""
    if HEADER_BATCH_GROUP not in task.headers:
        return [msgspec.json.decode(task.payload) if task.payload.strip() else {}]
    return [msgspec.json.decode(line) for line in task.payload.splitlines() if line.strip()]
