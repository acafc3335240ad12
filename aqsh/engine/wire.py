"""protobuf <-> typed models: the only module that imports the generated protobuf code.

Unknown protobuf fields are carried through ``TaskMessage.unknown_fields`` so that a message
written by a newer asynq keeps its extra fields when aqsh rewrites it (retry, archive, complete).
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet

from aqsh.engine import asynq_pb2 as pb
from aqsh.engine.models import (
    GO_ZERO_TIME_S,
    SchedulerEnqueueEvent,
    SchedulerEntry,
    ServerInfo,
    TaskMessage,
    WorkerInfo,
)

_NS = 1_000_000_000


def encode_task(msg: TaskMessage) -> bytes:
    # Only the fields that are set: proto3 does not write defaults anyway, and skipping them
    # halves the cost on the enqueue hot path (most of a fresh task's fields are zero).
    proto = pb.TaskMessage(type=msg.type, payload=msg.payload, id=msg.id, queue=msg.queue,
                           retry=msg.retry)
    if msg.retried:
        proto.retried = msg.retried
    if msg.error_msg:
        proto.error_msg = msg.error_msg
    if msg.timeout_s:
        proto.timeout = msg.timeout_s
    if msg.deadline_s:
        proto.deadline = msg.deadline_s
    if msg.unique_key:
        proto.unique_key = msg.unique_key
    if msg.last_failed_at_s:
        proto.last_failed_at = msg.last_failed_at_s
    if msg.retention_s:
        proto.retention = msg.retention_s
    if msg.completed_at_s:
        proto.completed_at = msg.completed_at_s
    if msg.group_key:
        proto.group_key = msg.group_key
    if msg.headers:
        proto.headers.update(msg.headers)
    data: bytes = proto.SerializeToString()
    return data + msg.unknown_fields if msg.unknown_fields else data


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _unknown_bytes(proto: pb.TaskMessage) -> bytes:
    """Re-encode the fields our schema lacks, so a rewrite by aqsh keeps what a newer asynq
    wrote. (Groups, wire type 3, are obsolete in proto3 and not kept.)"""
    out = bytearray()
    for field in UnknownFieldSet(proto):  # type: ignore[attr-defined]
        tag = _varint(field.field_number << 3 | field.wire_type)
        if field.wire_type == 0:
            out += tag + _varint(field.data)
        elif field.wire_type == 1:
            out += tag + int(field.data).to_bytes(8, "little")
        elif field.wire_type == 2:
            out += tag + _varint(len(field.data)) + bytes(field.data)
        elif field.wire_type == 5:
            out += tag + int(field.data).to_bytes(4, "little")
    return bytes(out)


def decode_task(raw: bytes) -> TaskMessage:
    proto = pb.TaskMessage()
    proto.ParseFromString(raw)
    return TaskMessage(
        type=proto.type,
        payload=proto.payload,
        id=proto.id,
        queue=proto.queue,
        retry=proto.retry,
        retried=proto.retried,
        error_msg=proto.error_msg,
        timeout_s=proto.timeout,
        deadline_s=proto.deadline,
        unique_key=proto.unique_key,
        last_failed_at_s=proto.last_failed_at,
        retention_s=proto.retention,
        completed_at_s=proto.completed_at,
        group_key=proto.group_key,
        headers=dict(proto.headers),
        unknown_fields=_unknown_bytes(proto),
    )


def _ts(ns: int) -> Timestamp:
    seconds, nanos = divmod(ns, _NS)
    return Timestamp(seconds=seconds, nanos=nanos)


def _ns(ts: Timestamp) -> int:
    return int(ts.seconds) * _NS + int(ts.nanos)


def encode_server(info: ServerInfo) -> bytes:
    data: bytes = pb.ServerInfo(
        host=info.host,
        pid=info.pid,
        server_id=info.server_id,
        concurrency=info.concurrency,
        queues=info.queues,
        strict_priority=info.strict_priority,
        status=info.status,
        start_time=_ts(info.start_time_ns),
        active_worker_count=info.active_worker_count,
    ).SerializeToString()
    return data


def decode_server(raw: bytes) -> ServerInfo:
    proto = pb.ServerInfo()
    proto.ParseFromString(raw)
    return ServerInfo(
        host=proto.host,
        pid=proto.pid,
        server_id=proto.server_id,
        concurrency=proto.concurrency,
        queues=dict(proto.queues),
        strict_priority=proto.strict_priority,
        status=proto.status,
        start_time_ns=_ns(proto.start_time),
        active_worker_count=proto.active_worker_count,
    )


def encode_worker(info: WorkerInfo) -> bytes:
    data: bytes = pb.WorkerInfo(
        host=info.host,
        pid=info.pid,
        server_id=info.server_id,
        task_id=info.task_id,
        task_type=info.task_type,
        task_payload=info.task_payload,
        queue=info.queue,
        start_time=_ts(info.start_time_ns),
        deadline=_ts(info.deadline_ns),
    ).SerializeToString()
    return data


def decode_worker(raw: bytes) -> WorkerInfo:
    proto = pb.WorkerInfo()
    proto.ParseFromString(raw)
    return WorkerInfo(
        host=proto.host,
        pid=proto.pid,
        server_id=proto.server_id,
        task_id=proto.task_id,
        task_type=proto.task_type,
        task_payload=proto.task_payload,
        queue=proto.queue,
        start_time_ns=_ns(proto.start_time),
        deadline_ns=_ns(proto.deadline),
    )


def encode_scheduler_entry(entry: SchedulerEntry) -> bytes:
    prev = (
        Timestamp(seconds=GO_ZERO_TIME_S, nanos=0)
        if entry.prev_enqueue_time_ns is None
        else _ts(entry.prev_enqueue_time_ns)
    )
    data: bytes = pb.SchedulerEntry(
        id=entry.id,
        spec=entry.spec,
        task_type=entry.task_type,
        task_payload=entry.task_payload,
        enqueue_options=entry.enqueue_options,
        next_enqueue_time=_ts(entry.next_enqueue_time_ns),
        prev_enqueue_time=prev,
    ).SerializeToString()
    return data


def decode_scheduler_entry(raw: bytes) -> SchedulerEntry:
    proto = pb.SchedulerEntry()
    proto.ParseFromString(raw)
    prev_ns = (
        None
        if proto.prev_enqueue_time.seconds == GO_ZERO_TIME_S
        else _ns(proto.prev_enqueue_time)
    )
    return SchedulerEntry(
        id=proto.id,
        spec=proto.spec,
        task_type=proto.task_type,
        task_payload=proto.task_payload,
        enqueue_options=list(proto.enqueue_options),
        next_enqueue_time_ns=_ns(proto.next_enqueue_time),
        prev_enqueue_time_ns=prev_ns,
    )


def encode_enqueue_event(event: SchedulerEnqueueEvent) -> bytes:
    data: bytes = pb.SchedulerEnqueueEvent(
        task_id=event.task_id, enqueue_time=_ts(event.enqueue_time_ns)
    ).SerializeToString()
    return data


def decode_enqueue_event(raw: bytes) -> SchedulerEnqueueEvent:
    proto = pb.SchedulerEnqueueEvent()
    proto.ParseFromString(raw)
    return SchedulerEnqueueEvent(task_id=proto.task_id, enqueue_time_ns=_ns(proto.enqueue_time))
