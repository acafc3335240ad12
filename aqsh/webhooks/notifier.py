"""From how a task ended to delivery tasks: the durable half of webhooks.

Nothing is lost if a process dies between a task's end and its deliveries:

1. before an attempt of a task with webhook targets runs, its *intent* is stored
   (``store.INTENTS_KEY``);
2. after the engine has stored the attempt's end, it tells ``on_transition``; the deliveries
   are enqueued in the background, with ids derived from (task, event, URL), and the intent
   is removed in the same atomic script call (lua/webhook_enqueue.lua; on a Cluster, where
   the keys are in different slots, by a later command, once the deliveries exist);
3. a worker dying between 1 and the end of 2 leaves the intent behind; every worker sweeps
   intents that are older than a sweep interval, reads the task's stored state and enqueues
   what its end calls for. Enqueueing twice is harmless: the second meets its own delivery's
   id (TaskIdConflict). The same holds for an attempt that never ended in this process (the
   worker died mid-script, the recoverer retried or archived the task later).

Deliveries are retained as long as task results, which keeps a late repeat from enqueueing a
delivery that already succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import structlog

from aqsh import errors
from aqsh.api.view import CANCELED, iso, public_state
from aqsh.clock import finish
from aqsh.engine import flow
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.connection import RedisClient, is_cluster
from aqsh.engine.fastlane import FastLane
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskInfo, TaskMessage, TaskState
from aqsh.engine.task import CONTEXT_CANCELED, Handler, Task, TaskContext
from aqsh.runner.spec import HEADER_CALLBACK_URL, TasksConfig
from aqsh.settings import Settings
from aqsh.webhooks import WEBHOOK_QUEUE, WEBHOOK_TASK_TYPE
from aqsh.webhooks.batch import Coalescer
from aqsh.webhooks.ssrf import redact
from aqsh.webhooks.store import (
    INTENTS_KEY,
    WEBHOOK_ENQUEUE_SCRIPT,
    Delivery,
    DeliveryMeta,
    deliveries_key,
    intent_member,
    parse_intent,
)

log = structlog.get_logger("aqsh.webhooks")

#: The events a submission's callback_url receives.
CALLBACK_EVENTS = ("task.completed", "task.failed", "task.canceled")
#: The most ended attempts one dispatch handles (one script call for all of them).
DISPATCH_BATCH = 256
ENQUEUE_BATCH = 1000
#: How long the dispatcher lets ended attempts gather before it enqueues their deliveries. A
#: worker running short scripts ends one every few ms; each dispatch costs it a script call and
#: each of its wake-ups a message to every subscribed worker, so a batch of tens is far
#: cheaper per task than a few (10 ms gave ~3 tasks per dispatch at c10, 50 ms ~30). Durability
#: does not depend on it (the intents are stored); a delivery starts at most this much later,
#: which a receiver of completion events does not notice.
DISPATCH_LINGER_S = 0.05
SWEEP_BATCH = 200

#: The delivery log's form of a URL, once per URL (per-task notify URLs repeat on every task).
_shown_url = functools.lru_cache(maxsize=256)(redact)


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    events: tuple[str, ...]
    kind: str  # notify | callback
    secret_env: str | None = None
    secret_file: str | None = None


@dataclass(frozen=True, slots=True)
class _Ended:
    queue: str
    task_id: str
    #: the attempt's retry count when it ran (its intent's)
    retried: int
    event: str
    #: webhook-id discriminator: events that can happen once per attempt carry its number
    event_key: str
    remove_intent: bool
    #: what decides the targets (tasks.yaml's notify for the type, the callback header)
    task_type: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


def event_key(event: str, attempt: int) -> str:
    if event in ("task.retrying", "task.started"):
        return f"{event.removeprefix('task.')}.{attempt}"
    return event.removeprefix("task.")


def delivery_id(task_id: str, key: str, url: str) -> str:
    return f"whk-{task_id}-{key}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def webhook_id(task_id: str, key: str) -> str:
    """The same on every attempt and every endpoint of one event (receivers de-duplicate)."""
    return f"msg_{task_id}_{key}"


class Notifier:
    def __init__(self, *, config: Callable[[], TasksConfig], redis: RedisClient,
                 client: Client, inspector: Inspector, settings: Settings,
                 fast_lane: bool = False) -> None:
        """``fast_lane=True``: the notifier's writes (intents, the delivery index) go over one
        multiplexed connection of its own (plain TCP Redis only; redis-py otherwise), a
        fraction of redis-py's CPU per command on the worker that runs the scripts. Closed by
        ``stop``."""
        self.config = config
        self.redis = redis
        self._lane = FastLane.from_redis(redis, spin_us=0) if fast_lane else None
        self.client = client
        self.inspector = inspector
        self.settings = settings
        self._ended: asyncio.Queue[_Ended] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._intents: Coalescer[tuple[bytes, float]] = Coalescer(self._store_intents)
        # Each ended task asks for its targets three times (intent, hook, dispatch): tasks.yaml's
        # part is kept per task type until the config object is replaced by a reload.
        self._targets_config: TasksConfig | None = None
        self._notify_targets: dict[str, tuple[Target, ...]] = {}
        # One atomic script call per dispatch (webhook_enqueue.lua) where every key is on one
        # server; on a Cluster the keys are in three slots and are written slot by slot.
        self._one_call = not is_cluster(client.redis)
        #: for tests and the benchmark: how many ended tasks were dispatched, and failures
        self.dispatched = 0

    # ------------------------------------------------------------------ who wants what
    def targets(self, task_type: str, headers: Mapping[str, str]) -> list[Target]:
        out = list(self._notify_of(task_type))
        callback = headers.get(HEADER_CALLBACK_URL)
        if callback:
            out.append(Target(url=callback, events=CALLBACK_EVENTS, kind="callback"))
        return out

    def _notify_of(self, task_type: str) -> tuple[Target, ...]:
        config = self.config()
        if config is not self._targets_config:
            self._targets_config, self._notify_targets = config, {}
        cached = self._notify_targets.get(task_type)
        if cached is not None:
            return cached
        spec = config.tasks.get(task_type)
        if spec is None:  # not cached: any name may come from a Go client
            return ()
        cached = self._notify_targets[task_type] = tuple(
            Target(url=n.url, events=n.events, kind="notify", secret_env=n.secret_env,
                   secret_file=n.secret_file) for n in spec.notify)
        return cached

    def wants(self, task_type: str, headers: Mapping[str, str], event: str) -> bool:
        return any(event in t.events for t in self.targets(task_type, headers))

    # ------------------------------------------------------------------ intents
    def _check_at(self) -> float:
        return time.time() + self.settings.webhook_sweep_interval_s

    async def register_intent(self, queue: str, task_id: str, retried: int) -> None:
        """Returns once stored; the intents of attempts starting together share one ZADD."""
        await self.intent_stored(queue, task_id, retried)

    def intent_stored(self, queue: str, task_id: str, retried: int) -> asyncio.Future[None]:
        """``register_intent`` for a caller that runs the attempt meanwhile: settles once
        stored."""
        return self._intents.submit((intent_member(queue, task_id, retried), self._check_at()))

    async def _store_intents(self, items: list[tuple[bytes, float]]) -> None:
        if self._lane is None:
            await self.redis.zadd(INTENTS_KEY, dict(items))
            return
        args: list[Any] = []
        for member, score in items:
            args += [score, member]
        await self._lane.execute("ZADD", INTENTS_KEY, *args)

    # ------------------------------------------------------------------ the engine's hook
    def on_transition(self, msg: TaskMessage, transition: str, error_msg: str) -> None:
        """``aqsh.engine.processor.TransitionHook``: queue the ended attempt for the
        background dispatcher (never block the processor)."""
        if transition == "completed":
            event, attempt = "task.completed", msg.retried
        elif transition == "archived":
            event = ("task.canceled" if error_msg in (CANCELED, CONTEXT_CANCELED)
                     else "task.failed")
            attempt = msg.retried
        elif transition == "canceled":  # never ran (a dependency failed): as DELETE does
            event, attempt = "task.canceled", 0
        elif transition == "retry":
            event, attempt = "task.retrying", msg.retried + 1
        else:
            return
        targets = self.targets(msg.type, msg.headers)
        if not targets:
            return
        self._ended.put_nowait(_Ended(msg.queue, msg.id, msg.retried, event,
                                      event_key(event, attempt), remove_intent=True,
                                      task_type=msg.type, headers=msg.headers))

    async def before_dependency_cancel(self, msg: TaskMessage) -> None:
        """The engine is about to archive a run whose dependency failed: no attempt ever
        stored an intent for it, so one is stored now, and a worker dying right after the
        archive leaves it for any worker's sweep (which tells it as task.canceled)."""
        if self.targets(msg.type, msg.headers):
            await self.register_intent(msg.queue, msg.id, msg.retried)

    def started(self, task: Task) -> None:
        self._ended.put_nowait(_Ended(task.queue, task.id, task.retried, "task.started",
                                      event_key("task.started", task.retried),
                                      remove_intent=False, task_type=task.type,
                                      headers=task.headers))

    async def canceled(self, msg: TaskMessage) -> None:
        """The API archived a task that was not running: deliver task.canceled (a failure is
        logged, not raised: the intent is stored and a sweep delivers it)."""
        ended = _Ended(msg.queue, msg.id, msg.retried, "task.canceled",
                       event_key("task.canceled", 0), remove_intent=True, task_type=msg.type,
                       headers=msg.headers)
        try:
            await self.dispatch(ended)
        except Exception as exc:
            log.warning("webhook.dispatch_failed", task_id=msg.id, webhook_event=ended.event,
                        error=str(exc))

    def wrap(self, handler: Handler) -> Handler:
        """The shell handler, with the intent stored before each attempt of a task that has
        targets (and task.started told)."""
        return _IntentHandler(handler, self)

    # ------------------------------------------------------------------ dispatch
    async def dispatch(self, ended: _Ended) -> int:
        return await self.dispatch_many([ended])

    async def dispatch_many(self, batch: list[_Ended]) -> int:
        """Enqueue the deliveries of ended attempts and write their delivery index, then clear
        their intents; returns how many deliveries were new. No reads: the delivery builds its
        body when first attempted, so this costs the worker that ran the script as little as
        possible. One atomic script call for the whole batch (two on a Cluster, slot by slot).
        Raises when they could not all be enqueued: the intents then stay for a sweep."""
        requests: list[EnqueueRequest] = []
        metas: dict[str, list[bytes]] = {}
        now = iso(time.time()) or ""
        max_retry = len(self.settings.webhook_schedule_s) - 1
        timeout_s = self.settings.webhook_timeout_s + 30
        for ended in batch:
            targets = [t for t in self.targets(ended.task_type, ended.headers)
                       if ended.event in t.events]
            wid = webhook_id(ended.task_id, ended.event_key)
            for target in dict((t.url, t) for t in targets).values():
                did = delivery_id(ended.task_id, ended.event_key, target.url)
                payload = Delivery(task_id=ended.task_id, task_queue=ended.queue,
                                   event=ended.event, url=target.url, webhook_id=wid,
                                   target=target.kind, secret_env=target.secret_env,
                                   secret_file=target.secret_file)
                requests.append(EnqueueRequest(
                    type=WEBHOOK_TASK_TYPE, payload=msgspec.json.encode(payload),
                    queue=WEBHOOK_QUEUE, max_retry=max_retry, timeout=timeout_s, task_id=did,
                    retention=self.settings.result_retention_s))
                metas.setdefault(ended.task_id, []).extend((did.encode(), msgspec.json.encode(
                    DeliveryMeta(event=ended.event, url=_shown_url(target.url),
                                 webhook_id=wid, created_at=now))))
        done = [intent_member(e.queue, e.task_id, e.retried) for e in batch if e.remove_intent]
        ttl_s = max(1, int(self.settings.result_retention_s))
        if requests and self._one_call:
            replies = await self.client.enqueue_batch_with(
                requests, WEBHOOK_ENQUEUE_SCRIPT,
                [INTENTS_KEY, *(deliveries_key(t) for t in metas)],
                [ttl_s, _framed(done), *(_framed(fields) for fields in metas.values())])
            created = _created(replies)
        else:
            # Slot by slot, the intents last: they are cleared only once every delivery task
            # and index entry exists (a failure before leaves them for a sweep).
            created = 0
            for start in range(0, len(requests), ENQUEUE_BATCH):
                created += _created(await self.client.enqueue_many(
                    requests[start:start + ENQUEUE_BATCH]))
            commands: list[tuple[Any, ...]] = []
            for task_id, fields in metas.items():
                commands.append(("HSET", deliveries_key(task_id), *fields))
                commands.append(("EXPIRE", deliveries_key(task_id), ttl_s))
            if done:
                commands.append(("ZREM", INTENTS_KEY, *done))
            if commands:
                await self._write_many(commands)
        self.dispatched += len(batch)
        return created

    async def _write_many(self, commands: list[tuple[Any, ...]]) -> None:
        if self._lane is not None:
            replies = await self._lane.execute_many(commands)
        else:
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    async def _dispatch_loop(self) -> None:
        """One batch at a time: what ends while a batch lingers or is being enqueued goes in
        the next."""
        while True:
            batch = [await self._ended.get()]
            await asyncio.sleep(DISPATCH_LINGER_S)
            while not self._ended.empty() and len(batch) < DISPATCH_BATCH:
                batch.append(self._ended.get_nowait())
            try:
                await self.dispatch_many(batch)
            except Exception as exc:
                # The intents stay: a sweep enqueues them later.
                log.warning("webhook.dispatch_failed", tasks=len(batch), error=str(exc))
            finally:
                for _ in batch:
                    self._ended.task_done()

    # ------------------------------------------------------------------ sweep
    async def sweep_once(self) -> int:
        """Enqueue what ended attempts left behind; returns how many intents it settled."""
        now = time.time()
        members = cast(list[bytes], await self.redis.zrangebyscore(
            INTENTS_KEY, "-inf", now, start=0, num=SWEEP_BATCH))
        intents: list[tuple[bytes, tuple[str, str, int]]] = []
        for member in members:
            parsed = parse_intent(member)
            if parsed is None:
                await self.redis.zrem(INTENTS_KEY, member)
            else:
                intents.append((member, parsed))
        if not intents:
            return 0
        infos = await self.inspector.find_many([(q, t) for _, (q, t, _) in intents])
        ended_batch: list[_Ended] = []
        later: dict[bytes, float] = {}
        for (member, (queue, task_id, retried)), info in zip(intents, infos, strict=True):
            # A task that is gone: nothing to tell, only its intent to remove.
            ended = (_ended_from(info, queue, retried) if info is not None else
                     _Ended(queue, task_id, retried, "", "", remove_intent=True))
            if ended is None:  # still running or waiting: look again later
                later[member] = self._check_at()
                continue
            if info is not None:
                log.info("webhook.swept", task_id=task_id, webhook_event=ended.event)
            ended_batch.append(ended)
        if later:
            await self.redis.zadd(INTENTS_KEY, later, xx=True)
        if ended_batch:
            await self.dispatch_many(ended_batch)
        return len(ended_batch)

    async def _sweep_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("webhook.sweep_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(),
                                       self.settings.webhook_sweep_interval_s)

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, sweep: bool) -> None:
        self._tasks.append(asyncio.create_task(self._dispatch_loop(), name="aqsh-webhooks"))
        if sweep:
            self._tasks.append(asyncio.create_task(self._sweep_loop(),
                                                   name="aqsh-webhook-sweep"))

    async def stop(self, *, drain_s: float = 5.0) -> None:
        """Lets queued dispatches finish for up to ``drain_s`` (whatever is left, the next
        sweep of any worker takes over: the intents are still there)."""
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.join(), drain_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await finish(task)
        self._tasks.clear()
        if self._lane is not None:
            await self._lane.aclose()


def _created(replies: list[TaskInfo | errors.AqshError]) -> int:
    """How many deliveries an enqueue created; one already there (its id) is no error."""
    created = 0
    for reply in replies:
        if isinstance(reply, errors.TaskIdConflict):
            continue
        if isinstance(reply, errors.AqshError):
            raise reply
        created += 1
    return created


def _framed(items: list[bytes]) -> bytes:
    """``items`` as webhook_enqueue.lua unpacks them: each a 4-byte big-endian length, then
    the bytes."""
    return b"".join(len(item).to_bytes(4, "big") + item for item in items)


def _ended_from(info: TaskInfo, queue: str, retried: int) -> _Ended | None:
    """How the attempt ``retried`` ended, judged from the stored task; None while it has not."""
    msg = info.message
    if msg.retried > retried:
        return _Ended(queue, msg.id, retried, "task.retrying",
                      event_key("task.retrying", retried + 1), remove_intent=True,
                      task_type=msg.type, headers=msg.headers)
    if info.state is TaskState.COMPLETED:
        event = "task.completed"
    elif info.state is TaskState.ARCHIVED:
        canceled = public_state(info) == CANCELED or flow.canceled_by_dependency(msg)
        event = "task.canceled" if canceled else "task.failed"
    else:
        return None
    return _Ended(queue, msg.id, retried, event, event_key(event, retried), remove_intent=True,
                  task_type=msg.type, headers=msg.headers)




class _IntentHandler:
    def __init__(self, inner: Handler, notifier: Notifier) -> None:
        self.inner = inner
        self.notifier = notifier

    async def __call__(self, task: Task, ctx: TaskContext) -> bytes | None:
        targets = self.notifier.targets(task.type, task.headers)
        if not targets:
            return await self.inner(task, ctx)
        # Stored while the script starts (not before: no round trip on its way), and awaited
        # before the handler returns, so it is stored before the engine ends the attempt.
        intent = self.notifier.intent_stored(task.queue, task.id, task.retried)
        if any("task.started" in t.events for t in targets):
            self.notifier.started(task)
        try:
            return await self.inner(task, ctx)
        finally:
            try:
                # Stored long before a script ends, as a rule: then no shield is needed.
                if intent.done():
                    intent.result()
                else:
                    await asyncio.shield(intent)
            except Exception as exc:
                # The worker's own hook still delivers; only a crash in the moment after the
                # attempt's end could now go unnoticed.
                log.warning("webhook.intent_failed", task_id=task.id, error=str(exc))

    async def aclose(self) -> None:
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()
