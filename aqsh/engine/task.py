"""What a handler sees: the task, its context, and the outcomes it can signal.

Shared by the processor (which builds them) and handlers such as the shell runner (which use
them), so neither imports the other.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec


class Task(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    payload: bytes
    queue: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: Retries so far (0 on the first attempt) and the configured maximum.
    retried: int = 0
    max_retry: int = 0


#: The error an attempt ends with when it was cancelled (asynq:cancel) before its handler could
#: say anything of its own: asynq's text for a cancelled context, which Go servers write too.
CONTEXT_CANCELED = "context canceled"


class CancelReason(enum.StrEnum):
    """Why the processor cancelled a running handler."""

    CANCELED = "canceled"  # asynq:cancel (Inspector CancelProcessing, aqsh DELETE /tasks/{id})
    DEADLINE = "deadline"  # min(now + timeout, deadline) passed
    LEASE_LOST = "lease_lost"  # the lease could not be extended; the task may run elsewhere
    SHUTDOWN = "shutdown"  # shutdown timeout reached; the task is requeued


class ResultWriter(Protocol):
    async def write(self, data: bytes) -> int:
        """Store ``data`` as the task's ``result`` hash field; returns bytes written."""
        ...


class TaskContext(Protocol):
    @property
    def task_id(self) -> str: ...

    @property
    def queue(self) -> str: ...

    @property
    def retry_count(self) -> int: ...

    @property
    def max_retry(self) -> int: ...

    @property
    def deadline_s(self) -> float:
        """Unix seconds after which the attempt is cancelled."""
        ...

    @property
    def result_writer(self) -> ResultWriter: ...

    @property
    def cancel_reason(self) -> CancelReason | None:
        """Set before the handler is cancelled, so cleanup can tell the causes apart."""
        ...


Handler = Callable[[Task, TaskContext], Awaitable[bytes | None]]


class TaskError(Exception):
    """An expected failure whose message says it all: recorded as ``error_msg`` verbatim
    (other exceptions are recorded with their class name in front)."""


class SkipRetry(TaskError):
    """Fail the task and archive it at once, whatever retries are left."""


class RevokeTask(TaskError):
    """Drop the task without counting a failure (asynq's RevokeTask)."""
