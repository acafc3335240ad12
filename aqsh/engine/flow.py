"""Held runs: tasks that wait their turn (per-key concurrency limits and rate windows).

The engine knows nothing of what a key means: a task message carries its flow control as
asynq headers (written by whoever enqueued it, aqsh's runner for shell tasks), so the rule
travels with the task and every aqsh worker applies the same one. A Go server on the same
queue ignores these headers and does not honour the limits.

How a run waits (lua/flow_*.lua, one script per step):

- **Concurrency.** The dequeue script reads the rule out of the message it leases
  (lua/_flow_headers.lua walks the protobuf headers) and, in the same call, either gives the
  run a slot of its key (a zset of holders) or moves it back from active to ``scheduled``,
  scored far ahead (:data:`HELD_SCORE_S`), puts it in the key's line, ordered by submission
  time, and takes the next pending task instead. A run that also has a rate rule is left to
  the worker: ``flow_rate`` first, then ``flow_acquire`` does the same as the dequeue. Waiting
  holds no lease and uses no retry and no timeout. Asynqmon, the asynq CLI and a Go Inspector
  see a scheduled task and can delete or run it. The finishing transitions (done, mark_complete,
  retry, archive: their ``+flow`` variants) free the slot and promote the oldest waiter in the
  same script call: the waiter's slot is reserved at once, it goes to the front of pending, and
  idle workers are woken by the same publish an enqueue makes. A slot's holder keeps it while
  its lease is live; a dead worker's slot is freed once its lease lapses (by the next acquire,
  or by the recoverer's repair sweep).
- **Rate.** ``flow_rate`` counts the runs a fixed window admitted; a run over the limit waits
  in ``scheduled`` until the window ends (a real time: the forwarder brings it back, and it
  is counted again in the next window). A run with both rules is counted once: a promoted
  concurrency waiter (its slot reserved) passes its rate check without counting.
- **Dependencies.** A run carrying :data:`HEADER_AFTER` is enqueued scheduled at
  :data:`AFTER_SCORE_S`; the servers' dependency sweep (every second) starts it once every
  task it names completed, or archives it, naming the task, once one was archived or is gone
  (``flow_after_end``). Dependencies may be in other queues (other Cluster slots): their
  states are read one command each, and only the waiter's own queue is written.

While a run waits its task hash says why (``aqsh_wait_reason``, ``aqsh_wait_key``, and
``aqsh_wait_since`` in Unix ms); :func:`waiting_many` reads that for the HTTP API.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgspec

from aqsh.engine import keys, wire
from aqsh.engine.connection import RedisClient
from aqsh.engine.models import TaskMessage
from aqsh.engine.scripts import Scripts

HEADER_CONCURRENCY_KEY = "aqsh-concurrency-key"
HEADER_CONCURRENCY_LIMIT = "aqsh-concurrency-limit"
#: When the run was submitted (Unix us): its place in its key's line. Workers race to dequeue
#: runs of one key; ordering the line by this instead of by arrival keeps submission order.
HEADER_CONCURRENCY_SEQ = "aqsh-concurrency-seq"
HEADER_RATE_KEY = "aqsh-rate-key"
HEADER_RATE_LIMIT = "aqsh-rate-limit"
HEADER_RATE_PER_S = "aqsh-rate-per-s"

#: A run waiting for a slot is scored at 2100-01-01T00:00:00Z in ``scheduled``: asynq tools
#: show a date nobody mistakes for a real schedule, and asynq's forwarder never reaches it.
HELD_SCORE_S = 4_102_444_800

#: A run waiting for other tasks (:data:`HEADER_AFTER`) is scored one second later: the
#: dependency sweep finds exactly those with one range query.
AFTER_SCORE_S = HELD_SCORE_S + 1
#: The tasks a run waits for, as a JSON list of ``[queue, id]`` pairs. The rule travels in
#: the message, so the run is stored waiting by the one script that schedules it.
HEADER_AFTER = "aqsh-after"
#: When such a run was submitted (Unix ms): its dependency wait goes to the wait histogram
#: when it starts. A run enqueued without it (an older producer) starts unrecorded.
HEADER_AFTER_SINCE_MS = "aqsh-after-since"

REASON_CONCURRENCY = "concurrency"
REASON_RATE = "rate"
REASON_AFTER = "after"
#: Hash fields of a waiting run (beside asynq's; Go ignores fields it does not know).
FIELD_REASON = "aqsh_wait_reason"
FIELD_KEY = "aqsh_wait_key"
FIELD_SINCE_MS = "aqsh_wait_since"


@dataclass(frozen=True, slots=True)
class Concurrency:
    key: str
    limit: int
    #: Submission time (Unix us), the run's place in the line; 0: when first seen waiting.
    seq_us: int = 0


@dataclass(frozen=True, slots=True)
class Rate:
    key: str
    limit: int
    per_s: int

    def window_start_s(self, now_s: int) -> int:
        return now_s - now_s % self.per_s


#: The dependency sweep's ``error_msg`` for a run it cancelled: this prefix, the dependency's
#: id, then one of the two endings (written by :func:`dependency_problem`, read back by
#: :func:`canceled_by_dependency`).
_DEPENDENCY_PREFIX = "dependency "
_DEPENDENCY_GONE = " no longer exists"
_DEPENDENCY_ARCHIVED = " was archived (failed or cancelled)"


def dependency_problem(dependency_id: str, *, gone: bool) -> str:
    """The ``error_msg`` of a run cancelled because of ``dependency_id``: it names the
    dependency (the API's ``last_error``)."""
    ending = _DEPENDENCY_GONE if gone else _DEPENDENCY_ARCHIVED
    return f"{_DEPENDENCY_PREFIX}{dependency_id}{ending}"


def canceled_by_dependency(msg: TaskMessage) -> bool:
    """Whether an archived run is one the dependency sweep cancelled: it waited (the header),
    never ran, and its error is the sweep's. An observer that learns of it from the stored
    task alone (the webhook sweep, after a crash) must tell it as a cancel, not a failure."""
    error = msg.error_msg
    return (HEADER_AFTER in msg.headers and msg.retried == 0
            and error.startswith(_DEPENDENCY_PREFIX)
            and error.endswith((_DEPENDENCY_GONE, _DEPENDENCY_ARCHIVED)))


@dataclass(frozen=True, slots=True)
class AfterSwept:
    """What one dependency sweep of a queue did: ``moved`` runs started or were cancelled;
    ``canceled`` are the messages of those archived, as stored (``error_msg`` names the
    dependency). No worker ends a cancelled run, so whoever sweeps tells the observers."""

    moved: int = 0
    canceled: tuple[TaskMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a run waits: ``position`` is its place in the key's line (0 = next), None for a
    rate wait (every run of a window is released at its end)."""

    reason: str
    key: str
    position: int | None
    since_ms: int | None


def headers(*, concurrency: Concurrency | None = None,
            rate: Rate | None = None) -> dict[str, str]:
    """The headers a producer adds to a task to have it wait its turn."""
    out: dict[str, str] = {}
    if concurrency is not None:
        out[HEADER_CONCURRENCY_KEY] = concurrency.key
        out[HEADER_CONCURRENCY_LIMIT] = str(concurrency.limit)
        out[HEADER_CONCURRENCY_SEQ] = str(concurrency.seq_us or time.time_ns() // 1000)
    if rate is not None:
        out[HEADER_RATE_KEY] = rate.key
        out[HEADER_RATE_LIMIT] = str(rate.limit)
        out[HEADER_RATE_PER_S] = str(rate.per_s)
    return out


def after_headers(dependencies: Sequence[tuple[str, str]], *,
                  since_ms: int | None = None) -> dict[str, str]:
    """The headers of a run that may start only once every (queue, id) has completed; such a
    run is scheduled at :data:`AFTER_SCORE_S`. ``since_ms``: its submission (default now)."""
    return {HEADER_AFTER: msgspec.json.encode([list(d) for d in dependencies]).decode(),
            HEADER_AFTER_SINCE_MS: str(since_ms if since_ms is not None
                                       else time.time_ns() // 1_000_000)}


def after_of(msg: TaskMessage) -> list[tuple[str, str]]:
    """The (queue, id) pairs the run waits for; [] without (or with a malformed) header."""
    raw = msg.headers.get(HEADER_AFTER)
    if not raw:
        return []
    try:
        pairs = msgspec.json.decode(raw, type=list[tuple[str, str]])
    except msgspec.DecodeError:
        return []
    return [(q, i) for q, i in pairs]


def after_since_ms(msg: TaskMessage) -> int | None:
    return _positive(msg.headers.get(HEADER_AFTER_SINCE_MS))


def _positive(text: str | None) -> int | None:
    """A whole number >= 1 written in ASCII digits only, or None: the dequeue script reads
    the same headers (lua/_flow_headers.lua), and both must agree on every rule (Python's
    ``int`` alone would also take " 5", "+5" and "1_0")."""
    if text is None or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value >= 1 else None


def concurrency_of(msg: TaskMessage) -> Concurrency | None:
    """The task's concurrency rule; None without one (or with a malformed one: a foreign
    producer's mistake must not stop the task from running)."""
    key = msg.headers.get(HEADER_CONCURRENCY_KEY)
    limit = _positive(msg.headers.get(HEADER_CONCURRENCY_LIMIT))
    if key is None or limit is None:
        return None
    return Concurrency(key, limit, _positive(msg.headers.get(HEADER_CONCURRENCY_SEQ)) or 0)


def rate_of(msg: TaskMessage) -> Rate | None:
    key = msg.headers.get(HEADER_RATE_KEY)
    limit = _positive(msg.headers.get(HEADER_RATE_LIMIT))
    per_s = _positive(msg.headers.get(HEADER_RATE_PER_S))
    if key is None or limit is None or per_s is None:
        return None
    return Rate(key, limit, per_s)


def acquire_call(msg: TaskMessage, rule: Concurrency, *, now_s: int, now_ns: int,
                 reserve_s: int) -> tuple[str, list[str], list[Any]]:
    q = keys.queue_keys(msg.queue)
    key_list = [q.active, q.lease, q.scheduled, q.pending, q.task(msg.id),
                keys.flow_slots_key(msg.queue, rule.key), keys.flow_wait_key(msg.queue, rule.key),
                keys.flow_registry_key(msg.queue), keys.flow_waited_key(msg.queue)]
    args: list[Any] = [msg.id, rule.limit, now_s, now_s + reserve_s, HELD_SCORE_S, rule.key,
                       now_ns // 1_000_000, q.task_prefix, now_ns, msg.queue,
                       keys.WAKE_CHANNEL, rule.seq_us or now_ns // 1000, msg.type]
    return "flow_acquire", key_list, args


def rate_call(msg: TaskMessage, rule: Rate, *, now_s: int,
              now_ns: int) -> tuple[str, list[str], list[Any]]:
    q = keys.queue_keys(msg.queue)
    start_s = rule.window_start_s(now_s)
    key_list = [q.active, q.lease, q.scheduled, q.task(msg.id),
                keys.flow_rate_key(msg.queue, rule.key, start_s), keys.flow_waited_key(msg.queue)]
    slots = concurrency_of(msg)
    if slots is not None:  # a promoted waiter passed its rate window when it first came
        key_list.append(keys.flow_slots_key(msg.queue, slots.key))
    record = 0 if slots is not None else 1
    return "flow_rate", key_list, [msg.id, rule.limit, start_s + rule.per_s, rule.key,
                                   now_ns // 1_000_000, msg.type, record]


def with_release(call: tuple[str, list[str], list[Any]], msg: TaskMessage, *, now_s: int,
                 now_ns: int, reserve_s: int) -> tuple[str, list[str], list[Any]]:
    """A finishing transition's call, turned into its ``+flow`` variant when the task holds
    (or may hold) a concurrency slot; unchanged otherwise. Every limited run's ack comes
    here, so what depends only on the queue and the rule is built once (``_release_parts``)."""
    key = msg.headers.get(HEADER_CONCURRENCY_KEY)
    if key is None:
        return call
    parts = _release_parts(msg.queue, key, msg.headers.get(HEADER_CONCURRENCY_LIMIT))
    if parts is None:
        return call
    name, key_list, args = call
    flow_keys, limit, task_prefix = parts
    return (name + "+flow", [*key_list, *flow_keys],
            [*args, key, limit, now_s, now_s + reserve_s, now_ns, task_prefix, msg.queue,
             keys.WAKE_CHANNEL])


@lru_cache(maxsize=4096)
def _release_parts(qname: str, flow_key: str,
                   limit_text: str | None) -> tuple[tuple[str, ...], int, str] | None:
    """The release's extra KEYS, the key's limit and the task prefix; None when the rule is
    not one (``concurrency_of`` reads it the same way)."""
    limit = _positive(limit_text)
    if limit is None:
        return None
    q = keys.queue_keys(qname)
    return ((keys.flow_slots_key(qname, flow_key), keys.flow_wait_key(qname, flow_key),
             keys.flow_registry_key(qname), q.scheduled, q.pending, q.lease),
            limit, q.task_prefix)


def repair_call(qname: str, *, now_s: int, now_ns: int,
                reserve_s: int) -> tuple[str, list[str], list[Any]]:
    q = keys.queue_keys(qname)
    return ("flow_repair",
            [keys.flow_registry_key(qname), q.scheduled, q.pending, q.lease],
            [now_s, now_s + reserve_s, now_ns, q.task_prefix, keys.flow_slots_prefix(qname),
             keys.flow_wait_prefix(qname), qname, keys.WAKE_CHANNEL])


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def waiting_many(client: RedisClient,
                       tasks: Sequence[tuple[str, str]]) -> list[Waiting | None]:
    """For each (queue, task id): why the run waits, or None when it does not (a run that a
    foreign tool moved out of scheduled no longer waits, whatever its hash still says)."""
    if not tasks:
        return []
    pipe = client.pipeline(transaction=False)
    for qname, task_id in tasks:
        q = keys.queue_keys(qname)
        pipe.hmget(q.task(task_id), ["state", FIELD_REASON, FIELD_KEY, FIELD_SINCE_MS])
    fields = await pipe.execute()
    out: list[Waiting | None] = []
    positions: list[tuple[int, str, str, str]] = []
    for i, ((qname, task_id), row) in enumerate(zip(tasks, fields, strict=True)):
        state, reason, key, since = (_text(v) for v in row)
        if state != "scheduled" or reason is None or key is None:
            out.append(None)
            continue
        since_ms = int(since) if since is not None and since.isdigit() else None
        out.append(Waiting(reason, key, None, since_ms))
        if reason == REASON_CONCURRENCY:
            positions.append((i, qname, task_id, key))
    if positions:
        # A run's place is how many in its line were submitted before it: ZSCORE, then the
        # ids scored below (not ZRANK: aqsh's documented ACL has no ZRANK).
        pipe = client.pipeline(transaction=False)
        for _, qname, task_id, key in positions:
            pipe.zscore(keys.flow_wait_key(qname, key), task_id)
        scores = await pipe.execute()
        pipe = client.pipeline(transaction=False)
        placed = [(p, sc) for p, sc in zip(positions, scores, strict=True) if sc is not None]
        for (_, qname, _, key), score in placed:
            line = keys.flow_wait_key(qname, key)
            pipe.zrangebyscore(line, "-inf", f"({score!r}")
            pipe.zrangebyscore(line, score, score)  # ties: Redis orders them by member
        replies = await pipe.execute()
        for n, ((i, _, task_id, _), _) in enumerate(placed):
            below, level = replies[2 * n], replies[2 * n + 1]
            mine = task_id.encode()
            ahead = len(below) + sum(
                1 for m in level if (m if isinstance(m, bytes) else str(m).encode()) < mine)
            held = out[i]
            if held is not None:
                out[i] = Waiting(held.reason, held.key, ahead, held.since_ms)
    return out


async def waiting_census(client: RedisClient, qname: str, *,
                         limit: int = 10_000) -> dict[tuple[str, str], int]:
    """How many runs of the queue wait, by (task type, reason): for a metrics gauge. Reads
    the scheduled tasks due from now on (a held run is one), at most ``limit`` of them, so
    a huge schedule costs a bounded scrape."""
    q = keys.queue_keys(qname)
    ids = await client.zrangebyscore(q.scheduled, int(time.time()), "+inf", start=0,
                                     num=limit)
    if not ids:
        return {}
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hmget(q.task(_text(task_id) or ""), ["msg", "state", FIELD_REASON])
    counts: dict[tuple[str, str], int] = {}
    for msg, state, reason in await pipe.execute():
        if msg is None or _text(state) != "scheduled":
            continue
        decoded = wire.decode_task(msg)
        why = _text(reason) or (REASON_AFTER if HEADER_AFTER in decoded.headers else None)
        if why is None:
            continue
        counts[(decoded.type, why)] = counts.get((decoded.type, why), 0) + 1
    return counts


async def take_waits(client: RedisClient, qname: str,
                     count: int = 10_000) -> list[tuple[str, float]]:
    """(task type, seconds waited) of the held runs that started since the last call, taken
    off the queue's record in one script call (API replicas that scrape share them, none is
    counted twice)."""
    raw = await Scripts(client).run("flow_take_waits", [keys.flow_waited_key(qname)], [count])
    out: list[tuple[str, float]] = []
    for item in raw or []:
        task_type, _, _id = (_text(item) or "").rpartition("\t")  # drop the id
        task_type, _, waited_ms = task_type.rpartition("\t")
        if waited_ms.isdigit():
            out.append((task_type, int(waited_ms) / 1000))
    return out
