"""One error tree for the whole service.

Each class carries a stable machine ``code`` and the HTTP status the API answers with, so the
HTTP layer maps exceptions without a lookup table and the engine stays free of HTTP concerns.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AqshError(Exception):
    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidArgument(AqshError, ValueError):
    """A caller passed an option the engine refuses before writing anything."""

    code = "invalid_argument"
    http_status = 400


class NotFound(AqshError):
    code = "not_found"
    http_status = 404


class TaskNotFound(NotFound):
    code = "task_not_found"


class QueueNotFound(NotFound):
    code = "queue_not_found"


class Conflict(AqshError):
    code = "conflict"
    http_status = 409


class DuplicateTask(Conflict):
    """A unique task's lock is held by another task (asynq's ErrDuplicateTask)."""

    code = "duplicate_task"


class TaskIdConflict(Conflict):
    """A task with this id already exists in the queue (asynq's ErrTaskIDConflict)."""

    code = "task_id_conflict"


class QueueAlreadyPaused(Conflict):
    code = "queue_paused"


class QueueNotPaused(Conflict):
    code = "queue_not_paused"


class TaskStateConflict(Conflict):
    """The operation does not apply to the task's current state (e.g. deleting an active task)."""

    code = "task_state_conflict"


class BrokerUnavailable(AqshError):
    """Redis could not be reached; the caller may retry later."""

    code = "redis_unavailable"
    http_status = 503


class BrokerFault(AqshError):
    """Redis answered with an error that waiting will not cure (``NOPERM``, ``WRONGTYPE``): the
    operation did not happen, and an operator must change the deployment."""

    code = "redis_error"
    http_status = 503


class ConfigError(AqshError):
    code = "config_error"
    http_status = 500
