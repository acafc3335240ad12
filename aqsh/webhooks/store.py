"""What aqsh keeps about webhooks in Redis, besides the delivery tasks themselves.

* ``aqsh:webhooks:intents`` (sorted set): one member per running attempt of a task that has
  webhook targets, written before its script starts and removed once the deliveries of how it
  ended are enqueued. Score: when a sweep should look at it. A member left behind means the
  process that ended the attempt died before enqueueing them; a sweep does it instead.
* ``aqsh:webhooks:{<task id>}:deliveries`` (hash): delivery id → what it delivers (event, URL
  without secrets, webhook-id), for ``GET /tasks/{id}/deliveries``.
* ``aqsh:webhooks:{<task id>}:attempts`` (list): one record per HTTP attempt.

The per-task keys share a hash tag (one Cluster slot) and expire with the task's result
retention. Their names are built in aqsh/engine/keys.py, with every other key's.
"""

from __future__ import annotations

import msgspec

from aqsh.engine import keys

INTENTS_KEY = keys.WEBHOOK_INTENTS
#: The script that enqueues deliveries, writes their index and clears their intents at once.
WEBHOOK_ENQUEUE_SCRIPT = "webhook_enqueue"
deliveries_key = keys.webhook_deliveries_key
attempts_key = keys.webhook_attempts_key


def intent_member(queue: str, task_id: str, retried: int) -> bytes:
    return msgspec.json.encode([queue, task_id, retried])


def parse_intent(member: bytes) -> tuple[str, str, int] | None:
    try:
        queue, task_id, retried = msgspec.json.decode(member, type=tuple[str, str, int])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return queue, task_id, retried


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery task's payload. The body is built at the first attempt (off the worker that
    ran the script) and kept as the delivery task's result, so every later attempt sends the
    same bytes under the same webhook-id; a redelivery carries it here. The secret is named,
    not carried: payloads are visible in Asynqmon."""

    task_id: str
    task_queue: str
    event: str
    url: str
    webhook_id: str
    #: "notify" (tasks.yaml: trusted) or "callback" (a submission's: SSRF-checked, signed
    #: with the operator's callback secret).
    target: str
    secret_env: str | None = None
    secret_file: str | None = None
    body: str | None = None


class DeliveryMeta(msgspec.Struct, frozen=True, kw_only=True):
    event: str
    url: str
    webhook_id: str
    created_at: str


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    delivery: str
    attempt: int
    at: str
    duration_ms: float
    #: delivered, retrying (failed; another attempt follows), failed (no attempt follows),
    #: gone (410: the endpoint asked not to be called again for this event), refused (the
    #: URL or its address is not allowed, or the secret is missing)
    outcome: str
    status: int | None = None
    error: str | None = None
    next_attempt_at: str | None = None
