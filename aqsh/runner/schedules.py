"""tasks.yaml ``schedules`` → the engine Scheduler's periodic tasks.

A scheduled run is submitted exactly as ``POST /tasks/{name}`` would submit it (same payload
encoding, queue, retries, timeout, result retention and submission headers), so it reads, logs
and cancels like any other task; ``submitted_by`` is ``aqsh-scheduler``.
"""

from __future__ import annotations

import msgspec

from aqsh.engine.scheduler import PeriodicTask
from aqsh.runner.spec import (
    HEADER_SUBMITTED_AT,
    HEADER_SUBMITTED_BY,
    SCHEDULER_USER,
    TasksConfig,
    access_headers,
    flow_headers,
)


def periodic_tasks(config: TasksConfig, *, result_retention_s: float) -> list[PeriodicTask]:
    return [
        PeriodicTask(
            spec=schedule.cron, type=task.name, payload=msgspec.json.encode(schedule.input),
            queue=task.queue, max_retry=task.max_retry, timeout_s=task.timeout_s,
            retention_s=result_retention_s, headers={HEADER_SUBMITTED_BY: SCHEDULER_USER,
                                                  **access_headers(task.allowed_groups),
                                                  **flow_headers(task, schedule.input)},
            fire_time_header=HEADER_SUBMITTED_AT,
        )
        for task in config.tasks.values()
        for schedule in task.schedules
    ]
