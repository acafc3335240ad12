"""Round-trip properties of the protobuf codec for every asynq message."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aqsh.engine import wire
from aqsh.engine.models import (
    SchedulerEnqueueEvent,
    SchedulerEntry,
    ServerInfo,
    TaskMessage,
    WorkerInfo,
)

i32 = st.integers(-(2**31), 2**31 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=40)
ns = st.integers(-(2**62), 2**62)

task_messages = st.builds(
    TaskMessage, type=text, payload=st.binary(max_size=200), id=text, queue=text, retry=i32,
    retried=i32, error_msg=text, timeout_s=i64, deadline_s=i64, unique_key=text,
    last_failed_at_s=i64, retention_s=i64, completed_at_s=i64, group_key=text,
    headers=st.dictionaries(text, text, max_size=5),
)


@given(task_messages)
def test_task_message_round_trip(msg: TaskMessage) -> None:
    assert wire.decode_task(wire.encode_task(msg)) == msg


@given(task_messages, st.integers(16, 500), st.integers(0, 2**63 - 1))
def test_unknown_fields_survive_a_rewrite(msg: TaskMessage, field: int, value: int) -> None:
    # A newer asynq may add fields; a rewrite by aqsh must keep them (varint, wire type 0).
    tag = field << 3
    extra = _varint(tag) + _varint(value)
    decoded = wire.decode_task(wire.encode_task(msg) + extra)
    assert decoded.unknown_fields == extra
    assert wire.decode_task(wire.encode_task(decoded)).unknown_fields == extra


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@given(st.builds(ServerInfo, host=text, pid=i32, server_id=text, concurrency=i32,
                 queues=st.dictionaries(text, i32, max_size=4), strict_priority=st.booleans(),
                 status=text, start_time_ns=ns, active_worker_count=i32))
def test_server_info_round_trip(info: ServerInfo) -> None:
    assert wire.decode_server(wire.encode_server(info)) == info


@given(st.builds(WorkerInfo, host=text, pid=i32, server_id=text, task_id=text, task_type=text,
                 task_payload=st.binary(max_size=100), queue=text, start_time_ns=ns,
                 deadline_ns=ns))
def test_worker_info_round_trip(info: WorkerInfo) -> None:
    assert wire.decode_worker(wire.encode_worker(info)) == info


@given(st.builds(SchedulerEntry, id=text, spec=text, task_type=text,
                 task_payload=st.binary(max_size=50), enqueue_options=st.lists(text, max_size=4),
                 next_enqueue_time_ns=ns,
                 prev_enqueue_time_ns=st.none() | st.integers(0, 2**62)))
def test_scheduler_entry_round_trip(entry: SchedulerEntry) -> None:
    assert wire.decode_scheduler_entry(wire.encode_scheduler_entry(entry)) == entry


@given(st.builds(SchedulerEnqueueEvent, task_id=text, enqueue_time_ns=ns))
def test_enqueue_event_round_trip(event: SchedulerEnqueueEvent) -> None:
    assert wire.decode_enqueue_event(wire.encode_enqueue_event(event)) == event
