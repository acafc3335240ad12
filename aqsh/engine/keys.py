"""Every Redis key name aqsh uses: the only module that spells ``asynq:``, ``aqsh:`` or ``logs:``.

Per-queue keys carry the ``{qname}`` Redis Cluster hash tag so all keys of one queue share a
slot and multi-key Lua scripts stay Cluster safe (protocol spec §1.2, §2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

PREFIX = "asynq:"
ALL_QUEUES = "asynq:queues"
ALL_SERVERS = "asynq:servers"
ALL_WORKERS = "asynq:workers"
ALL_SCHEDULERS = "asynq:schedulers"
CANCEL_CHANNEL = "asynq:cancel"
#: aqsh-only pub/sub channel: our client publishes the queue name after an enqueue so idle aqsh
#: workers wake at once instead of polling (Go components ignore it).
WAKE_CHANNEL = "aqsh:wake"
#: aqsh-only keys beside asynq's, spelled here too so that an ACL or a key scan has one list:
#: a task's log stream, and the API's Idempotency-Key records.
LOG_KEY_PREFIX = "logs:"
IDEMPOTENCY_PREFIX = "aqsh:idem:"
#: aqsh-only set of the task types that have a run index, as JSON ``[queue, type]`` pairs:
#: what GET /runs merges when no task filter narrows it to one index (types no longer in
#: tasks.yaml and types only Go clients enqueue are found here).
RUNS_TYPES = "aqsh:runs:types"


def log_key(task_id: str) -> str:
    return f"{LOG_KEY_PREFIX}{task_id}"


def idempotency_key(scope: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{scope}"


def runs_index_key(qname: str, task_type: str) -> str:
    """aqsh's run index of one task type in one queue: a sorted set of task ids scored by
    enqueue time (Unix ms). It carries the queue's ``{qname}`` hash tag, so the enqueue
    scripts write it beside the task hash in one Cluster-safe call."""
    return f"aqsh:{{{qname}}}:runs:{task_type}"


def flow_base(qname: str) -> str:
    """aqsh's held-run keys of one queue (aqsh/engine/flow.py) start with this: under the
    queue's ``{qname}`` hash tag, so the scripts that move a task between asynq's sets and
    these keys stay in one Cluster slot."""
    return f"aqsh:{{{qname}}}:flow:"


def flow_registry_key(qname: str) -> str:
    """Hash: every concurrency key of the queue with holders or waiters → its limit."""
    return flow_base(qname) + "keys"


def flow_slots_prefix(qname: str) -> str:
    return flow_base(qname) + "slots:"


def flow_wait_prefix(qname: str) -> str:
    return flow_base(qname) + "wait:"


def flow_slots_key(qname: str, flow_key: str) -> str:
    """Zset: the ids holding a slot of concurrency key ``flow_key``."""
    return flow_slots_prefix(qname) + flow_key


def flow_wait_key(qname: str, flow_key: str) -> str:
    """Zset: the ids waiting for a slot of ``flow_key``, by submission time."""
    return flow_wait_prefix(qname) + flow_key


def flow_waited_key(qname: str) -> str:
    """Zset of ``<task type>\t<ms waited>\t<id>`` of held runs that started, by start time
    (the newest 10000 kept): what the API's metrics turn into a histogram of waiting time."""
    return flow_base(qname) + "waited"


def flow_rate_key(qname: str, rate_key: str, window_start_s: int) -> str:
    """Counter of the runs a rate window of ``rate_key`` admitted (expires after it)."""
    return f"{flow_base(qname)}rate:{rate_key}:{window_start_s}"


#: aqsh-only keys of the webhook deliveries (what they hold: aqsh/webhooks/store.py): the
#: intents of running attempts, and per task its deliveries and their attempts (one hash tag).
WEBHOOK_INTENTS = "aqsh:webhooks:intents"


def webhook_deliveries_key(task_id: str) -> str:
    return f"aqsh:webhooks:{{{task_id}}}:deliveries"


def webhook_attempts_key(task_id: str) -> str:
    return f"aqsh:webhooks:{{{task_id}}}:attempts"


def server_key(host: str, pid: int, server_id: str) -> str:
    return f"asynq:servers:{{{host}:{pid}:{server_id}}}"


def workers_key(host: str, pid: int, server_id: str) -> str:
    return f"asynq:workers:{{{host}:{pid}:{server_id}}}"


def scheduler_entries_key(scheduler_id: str) -> str:
    return f"asynq:schedulers:{{{scheduler_id}}}"


def scheduler_history_key(entry_id: str) -> str:
    return f"asynq:scheduler_history:{entry_id}"


def day_suffix(unix_s: int) -> str:
    """UTC calendar date used by the daily counters (``YYYY-MM-DD``)."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue. Built once per queue name and cached."""

    name: str
    base: str  # "asynq:{q}:"
    task_prefix: str  # "asynq:{q}:t:"
    pending: str
    active: str
    lease: str
    scheduled: str
    retry: str
    archived: str
    completed: str
    paused: str
    processed_total: str
    failed_total: str
    groups: str
    group_prefix: str  # "asynq:{q}:g:"
    aggregation_sets: str

    def task(self, task_id: str) -> str:
        return self.task_prefix + task_id

    def state_container(self, state: str) -> str:
        """The list/zset holding tasks of a (non-aggregating) state."""
        return self.base + state

    def processed_day(self, unix_s: int) -> str:
        return f"{self.base}processed:{day_suffix(unix_s)}"

    def failed_day(self, unix_s: int) -> str:
        return f"{self.base}failed:{day_suffix(unix_s)}"

    def group(self, group: str) -> str:
        return self.group_prefix + group

    def aggregation_set(self, group: str, set_id: str) -> str:
        """``asynq:{q}:g:<group>:<set_id>``: tasks taken out of a group for one aggregation.

        The recoverer finds the group again by cutting this name at its last ``:`` (as
        asynq's script does), so a set id must never contain one.
        """
        return f"{self.group_prefix}{group}:{set_id}"

    def unique(self, task_type: str, payload: bytes | None) -> str:
        """asynq's lock key: ``asynq:{q}:unique:<type>:<md5 hex of payload>``.

        A ``None`` payload gives the trailing-colon form asynq uses for a nil payload (§7.3).
        """
        if payload is None:
            return f"{self.base}unique:{task_type}:"
        return f"{self.base}unique:{task_type}:{hashlib.md5(payload).hexdigest()}"


@lru_cache(maxsize=1024)
def queue_keys(qname: str) -> QueueKeys:
    base = f"asynq:{{{qname}}}:"
    return QueueKeys(
        name=qname,
        base=base,
        task_prefix=base + "t:",
        pending=base + "pending",
        active=base + "active",
        lease=base + "lease",
        scheduled=base + "scheduled",
        retry=base + "retry",
        archived=base + "archived",
        completed=base + "completed",
        paused=base + "paused",
        processed_total=base + "processed",
        failed_total=base + "failed",
        groups=base + "groups",
        group_prefix=base + "g:",
        aggregation_sets=base + "aggregation_sets",
    )


def log_meta_key(task_id: str) -> str:
    """The hash kept beside the log stream ``logs:<task_id>`` (aqsh-only): attempt times, exit
    code and the log writers' batch numbers, which must outlive the stream's trimmed markers.

    The append script writes both keys, so on a Redis Cluster they must share a slot: the
    stream's own hash tag when its name has one, else the whole stream name as the tag. An id
    with a ``}`` but no tag leaves no name that shares the stream's slot; the writer checks the
    slots and leaves this key out then.
    """
    stream = f"logs:{task_id}"
    opening = stream.find("{")
    if opening != -1 and stream.find("}", opening + 1) > opening + 1:
        return stream + ":meta"  # the stream's tag (first "{", first "}" after it) is kept
    return "{" + stream + "}:meta"
