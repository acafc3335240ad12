"""Golden vectors: protobuf bytes written by the real Go asynq library (read back from Redis by
``aqsh-interop golden``), with the values the Go Inspector reported for them.

Regenerate with ``make golden`` (needs Go). Python must decode every one to the same values,
and re-encoding must give bytes Go reads identically (checked in the interop suite).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from aqsh.engine import wire
from aqsh.engine.models import TaskMessage

GOLDEN = Path(__file__).parent / "golden"
EXPECTED: dict[str, dict[str, Any]] = json.loads((GOLDEN / "golden.json").read_text())


def raw(name: str) -> bytes:
    return (GOLDEN / f"{name}.bin").read_bytes()


def task_fields(msg: TaskMessage) -> dict[str, Any]:
    return {
        "id": msg.id, "queue": msg.queue, "type": msg.type,
        "payload_b64": base64.b64encode(msg.payload).decode() if msg.payload else None,
        "headers": msg.headers or None, "max_retry": msg.retry, "retried": msg.retried,
        "last_err": msg.error_msg, "last_failed_at": msg.last_failed_at_s,
        "timeout_s": msg.timeout_s, "deadline": msg.deadline_s, "group": msg.group_key,
        "retention_s": msg.retention_s, "completed_at": msg.completed_at_s,
    }


@pytest.mark.parametrize("name", ["task_full", "task_group", "task_retry", "task_completed"])
def test_task_messages_written_by_go_decode_identically(name: str) -> None:
    msg = wire.decode_task(raw(name))
    expected = {k: EXPECTED[name][k] for k in task_fields(msg)}
    assert task_fields(msg) == expected
    assert msg.unknown_fields == b""
    # Re-encoding gives a message that decodes to the same values (field order may differ).
    assert wire.decode_task(wire.encode_task(msg)) == msg


def test_full_task_carries_the_unique_key_go_computed() -> None:
    from aqsh.engine.keys import queue_keys

    msg = wire.decode_task(raw("task_full"))
    assert msg.unique_key == queue_keys("golden").unique("golden:full", msg.payload)


def test_server_and_worker_info() -> None:
    server = wire.decode_server(raw("server_info"))
    exp = EXPECTED["server_info"]
    assert (server.host, server.pid, server.server_id, server.concurrency, server.queues,
            server.strict_priority, server.status, server.active_worker_count) == (
        exp["host"], exp["pid"], exp["server_id"], exp["concurrency"], exp["queues"],
        exp["strict_priority"], exp["status"], exp["active_worker_count"])
    assert server.start_time_ns // 10**9 == exp["start_time_s"]
    worker = wire.decode_worker(raw("worker_info"))
    wexp = EXPECTED["worker_info"]
    assert (worker.server_id, worker.task_id, worker.task_type, worker.task_payload.decode(),
            worker.queue) == (wexp["server_id"], wexp["task_id"], wexp["task_type"],
                              wexp["task_payload"], wexp["queue"])
    assert worker.start_time_ns // 10**9 == wexp["start_time_s"]
    assert worker.deadline_ns // 10**9 == wexp["deadline_s"]
    assert wire.decode_worker(wire.encode_worker(worker)) == worker


@pytest.mark.parametrize("name", sorted(k for k in EXPECTED if k.startswith("scheduler_entry")))
def test_scheduler_entries_including_go_zero_time(name: str) -> None:
    entry = wire.decode_scheduler_entry(raw(name))
    exp = EXPECTED[name]
    assert (entry.id, entry.spec, entry.task_type, entry.task_payload.decode()) == (
        exp["id"], exp["spec"], exp["task_type"], exp["task_payload"])
    assert entry.next_enqueue_time_ns // 10**9 == exp["next_s"]
    assert len(entry.enqueue_options) == exp["options"]
    if exp["prev_is_zero"]:
        assert entry.prev_enqueue_time_ns is None
        assert wire.encode_scheduler_entry(entry) == raw(name) or (
            wire.decode_scheduler_entry(wire.encode_scheduler_entry(entry)) == entry)
    else:
        assert entry.prev_enqueue_time_ns is not None
        assert entry.prev_enqueue_time_ns // 10**9 == exp["prev_s"]


def test_scheduler_enqueue_event() -> None:
    event = wire.decode_enqueue_event(raw("enqueue_event"))
    assert event.task_id == EXPECTED["enqueue_event"]["task_id"]
    assert event.enqueue_time_ns // 10**9 == EXPECTED["enqueue_event"]["enqueue_time_s"]
