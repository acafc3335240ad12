"""The engine handler of delivery tasks: one signed POST per attempt, its outcome recorded.

Outcomes: a 2xx is success (the task is acknowledged only then; a crash between the 2xx and
the acknowledgement repeats the delivery, which is what ``webhook-id`` is for). ``410 Gone``
stops this delivery for good. Anything else — another status (a redirect included: they are
never followed), a timeout, a refused or reset connection — is retried on the schedule;
``429`` and ``503`` wait at least their ``Retry-After``. A URL or address the callback policy
refuses, or a secret that cannot be read, fails at once (waiting would not change it).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import os
import time
from collections.abc import Callable, Sequence

import aiohttp
import msgspec
import structlog

from aqsh import __version__
from aqsh.api.view import attempt_times, iso
from aqsh.engine.connection import RedisClient
from aqsh.engine.inspect import Inspector
from aqsh.engine.task import SkipRetry, Task, TaskContext, TaskError
from aqsh.settings import Settings
from aqsh.webhooks import WEBHOOK_QUEUE
from aqsh.webhooks.batch import Coalescer
from aqsh.webhooks.body import webhook_body
from aqsh.webhooks.signing import InvalidSecret, parse_secrets, signature_header
from aqsh.webhooks.ssrf import CallbackPolicy, CallbackRefused, GuardedResolver, redact
from aqsh.webhooks.store import Attempt, Delivery, DeliveryMeta, attempts_key, deliveries_key

log = structlog.get_logger("aqsh.webhooks")

#: The longest Retry-After believed (a receiver cannot park a delivery for a week).
MAX_RETRY_AFTER_S = 24 * 3600.0
_ERROR_SNIPPET_BYTES = 200


class DeliveryFailed(TaskError):
    """Retried after ``delay_s`` (the schedule's, or a longer Retry-After)."""

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


def schedule_delay(schedule: Sequence[float], retried: int) -> float:
    """The wait before the attempt after ``retried`` retries (the last delay repeats)."""
    return float(schedule[min(retried + 1, len(schedule) - 1)])


def delivery_retry_delay(
    schedule: Sequence[float],
) -> Callable[[int, BaseException, Task], float]:
    def delay(retried: int, error: BaseException, task: Task) -> float:
        if isinstance(error, DeliveryFailed):
            return error.delay_s
        return schedule_delay(schedule, retried)

    return delay


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now_s), MAX_RETRY_AFTER_S)


def read_secret_source(*, env: str | None, file: str | None) -> list[bytes]:
    """The keys of a secret source, read now (so a rotated file or variable takes effect at
    the next attempt). Raises InvalidSecret saying what is wrong, never what it holds."""
    if env is not None:
        text = os.environ.get(env)
        if text is None:
            raise InvalidSecret(f"the secret variable {env} is not set in the worker")
        where = f"variable {env}"
    elif file is not None:
        try:
            with open(file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise InvalidSecret(f"cannot read secret file {file}: {exc.strerror}") from None
        where = f"file {file}"
    else:
        raise InvalidSecret("no secret configured")
    try:
        return parse_secrets(text)
    except InvalidSecret as exc:
        raise InvalidSecret(f"{where}: {exc}") from None


class DeliveryHandler:
    def __init__(self, settings: Settings, redis: RedisClient, *,
                 on_attempt: Callable[[str, str, float], None] | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.schedule = settings.webhook_schedule_s
        self.policy = CallbackPolicy(settings.callback_allowed_hosts,
                                     allow_http=settings.callback_allow_http,
                                     allowed_networks=settings.callback_allowed_networks)
        #: (event, outcome, duration_s) after each attempt: the metrics.
        self.on_attempt = on_attempt
        self.inspector = Inspector(redis)
        self._records: Coalescer[tuple[Delivery, Attempt]] = Coalescer(self._write_records)
        self._trusted: aiohttp.ClientSession | None = None
        self._guarded: aiohttp.ClientSession | None = None

    def _session(self, guarded: bool) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        if guarded:
            if self._guarded is None:
                connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy),
                                                 use_dns_cache=False, limit=0)
                self._guarded = aiohttp.ClientSession(connector=connector, timeout=timeout)
            return self._guarded
        if self._trusted is None:
            self._trusted = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        return self._trusted

    async def aclose(self) -> None:
        for session in (self._trusted, self._guarded):
            if session is not None:
                await session.close()
        self._trusted = self._guarded = None

    def _secrets(self, delivery: Delivery) -> list[bytes]:
        if delivery.target == "callback":
            if self.settings.callback_secret:
                return parse_secrets(self.settings.callback_secret)
            return read_secret_source(env=None, file=self.settings.callback_secret_file)
        return read_secret_source(env=delivery.secret_env, file=delivery.secret_file)

    async def __call__(self, task: Task, ctx: TaskContext) -> bytes | None:
        try:
            delivery = msgspec.json.decode(task.payload, type=Delivery)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SkipRetry(f"not a webhook delivery: {exc}") from None
        body, built = await self._body(task, delivery)
        attempt = task.retried + 1
        started = time.monotonic()
        status: int | None = None
        retry_after_s: float | None = None
        error: str | None = None
        refused = False
        try:
            keys = self._secrets(delivery)
            if delivery.target == "callback":
                self.policy.check_url(delivery.url)
            status, retry_after_s, error = await self._post(delivery, keys, body)
        except InvalidSecret as exc:
            refused, error = True, str(exc)
        except CallbackRefused as exc:
            refused, error = True, f"refused: {exc}"
        except TimeoutError:
            error = f"timed out after {self.settings.webhook_timeout_s:g}s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            error = f"connection error: {exc}"
        duration_s = time.monotonic() - started
        next_at: float | None = None
        if status is not None and 200 <= status < 300:
            outcome = "delivered"
        elif refused:
            outcome = "refused"
        elif status == 410:
            outcome = "gone"
        elif task.retried >= task.max_retry:
            outcome = "failed"
        else:
            outcome = "retrying"
            delay_s = schedule_delay(self.schedule, task.retried)
            if status in (429, 503) and retry_after_s is not None:
                delay_s = max(delay_s, retry_after_s)
            # The engine keeps retry times in whole seconds: round up, never early.
            next_at = float(math.ceil(time.time() + delay_s))
        record = Attempt(delivery=task.id, attempt=attempt, at=iso(time.time()) or "",
                         duration_ms=round(duration_s * 1000, 1), outcome=outcome,
                         status=status, error=error, next_attempt_at=iso(next_at))
        await self._record(delivery, record)
        if self.on_attempt is not None:
            self.on_attempt(delivery.event, outcome, duration_s)
        log.info("webhook.attempt", delivery=task.id, webhook_event=delivery.event,
                 url=redact(delivery.url), attempt=attempt, status=status, outcome=outcome,
                 error=error, duration_ms=record.duration_ms)
        if outcome == "delivered":
            return body  # stored with the acknowledgement
        if built:
            # Kept for the attempts to come (and a redelivery): they send these same bytes.
            await ctx.result_writer.write(body)
        text = error or f"HTTP {status}"
        if outcome in ("refused", "gone"):
            raise SkipRetry(text if outcome == "refused" else "410 Gone: endpoint stopped")
        # Counted from the whole second the engine counts from (it truncates "now").
        raise DeliveryFailed(text, (next_at - int(time.time())) if next_at else 0.0)

    async def _body(self, task: Task, delivery: Delivery) -> tuple[bytes, bool]:
        """(body, built now). Built at the first attempt from the task as it is stored then,
        and kept as this delivery task's result, so that every attempt sends the same bytes.
        A first attempt (retried 0) has none kept yet — except one cut short by a shutdown,
        which then builds it again from the same ended task."""
        if delivery.body is not None:
            return delivery.body.encode(), False
        if task.retried > 0:
            own, info = await self.inspector.find_many(
                [(WEBHOOK_QUEUE, task.id), (delivery.task_queue, delivery.task_id)])
            if own is not None and own.result:
                return own.result, False
        else:
            (info,) = await self.inspector.find_many([(delivery.task_queue, delivery.task_id)])
        started_ms = finished_ms = None
        if info is not None:
            started_ms, finished_ms = await attempt_times(self.redis, delivery.task_id)
        body = webhook_body(info, task_id=delivery.task_id, event=delivery.event,
                            started_ms=started_ms, finished_ms=finished_ms,
                            max_bytes=self.settings.webhook_max_body_bytes,
                            base_url=self.settings.public_url or "")
        return body, True

    async def _post(self, delivery: Delivery, keys: list[bytes], body: bytes
                    ) -> tuple[int, float | None, str | None]:
        timestamp_s = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": f"aqsh/{__version__}",
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp_s),
            "webhook-signature": signature_header(keys, delivery.webhook_id, timestamp_s, body),
        }
        session = self._session(guarded=delivery.target == "callback")
        async with session.post(delivery.url, data=body, headers=headers,
                                allow_redirects=False) as response:
            error = None
            if not 200 <= response.status < 300:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    snippet = await response.content.read(_ERROR_SNIPPET_BYTES)
                    error = f"HTTP {response.status}" + (
                        f": {snippet.decode('utf-8', 'replace').strip()}" if snippet.strip()
                        else "")
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
            return response.status, retry_after, error

    async def _record(self, delivery: Delivery, record: Attempt) -> None:
        """Best effort: a lost record must not turn a delivered webhook into a retried one.
        Attempts ending together share one pipeline."""
        try:
            await self._records.add((delivery, record))
        except Exception as exc:
            log.warning("webhook.record_failed", delivery=record.delivery, error=str(exc))

    async def _write_records(self, items: list[tuple[Delivery, Attempt]]) -> None:
        ttl_s = max(1, int(self.settings.result_retention_s))
        pipe = self.redis.pipeline(transaction=False)
        for delivery, record in items:
            meta = DeliveryMeta(event=delivery.event, url=redact(delivery.url),
                                webhook_id=delivery.webhook_id, created_at=record.at)
            pipe.hsetnx(deliveries_key(delivery.task_id), record.delivery,
                        msgspec.json.encode(meta))
            pipe.expire(deliveries_key(delivery.task_id), ttl_s)
            pipe.rpush(attempts_key(delivery.task_id), msgspec.json.encode(record))
            pipe.expire(attempts_key(delivery.task_id), ttl_s)
        await pipe.execute()
