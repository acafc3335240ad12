"""Prometheus metrics: asynq's queue metrics under asynq's names and labels (so existing asynq
dashboards and Asynqmon's charts work), plus aqsh's own HTTP, task, script and SSE metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aqsh.engine.inspect import QueueInfo

#: Labelled metric children kept per family for the request path (see Metrics.request_done).
_MAX_CACHED_CHILDREN = 1024
_STATES = ("active", "pending", "scheduled", "retry", "archived", "completed")


class QueueSnapshot:
    """asynq's x/metrics families, from QueueInfo values read just before the scrape."""

    def __init__(self) -> None:
        self.infos: Sequence[QueueInfo] = ()

    def collect(self) -> Iterator[Metric]:
        enqueued = GaugeMetricFamily("asynq_tasks_enqueued_total",
                                     "Number of tasks enqueued per queue and state",
                                     labels=["queue", "state"])
        size = GaugeMetricFamily("asynq_queue_size", "Number of tasks in a queue",
                                 labels=["queue"])
        latency = GaugeMetricFamily("asynq_queue_latency_seconds",
                                    "Age of the oldest pending task", labels=["queue"])
        memory = GaugeMetricFamily("asynq_queue_memory_usage_approx_bytes",
                                   "Approximate memory used by a queue", labels=["queue"])
        processed = CounterMetricFamily("asynq_tasks_processed",
                                        "Tasks processed (successes and failures)",
                                        labels=["queue"])
        failed = CounterMetricFamily("asynq_tasks_failed", "Tasks failed", labels=["queue"])
        paused = GaugeMetricFamily("asynq_queue_paused_total", "1 when the queue is paused",
                                   labels=["queue"])
        for info in self.infos:
            for state in _STATES:
                enqueued.add_metric([info.queue, state], getattr(info, state))
            size.add_metric([info.queue], info.size)
            latency.add_metric([info.queue], info.latency_s)
            memory.add_metric([info.queue], info.memory_usage_bytes)
            processed.add_metric([info.queue], info.processed_total)
            failed.add_metric([info.queue], info.failed_total)
            paused.add_metric([info.queue], 1 if info.paused else 0)
        yield from (enqueued, size, latency, memory, processed, failed, paused)


#: How old the queue figures /metrics serves may be. Computing them runs a script per queue
#: (memory sampling included), so a scraper polling every 100 ms — or many scrapers, or an
#: unauthenticated caller in a loop — must not turn into Redis load.
QUEUE_FIGURES_TTL_S = 5.0


class QueueFigures:
    """The queue figures, recomputed at most once per ``ttl_s``; scrapes that arrive while a
    computation runs wait for that one instead of starting their own."""

    def __init__(self, snapshot: QueueSnapshot, refreshes: Counter,
                 ttl_s: float = QUEUE_FIGURES_TTL_S) -> None:
        self.snapshot = snapshot
        self.refreshes = refreshes
        self.ttl_s = ttl_s
        self._computed_at = float("-inf")
        self._running: asyncio.Future[None] | None = None

    async def refresh(self, compute: Callable[[], Awaitable[Sequence[QueueInfo]]]) -> None:
        if time.monotonic() - self._computed_at < self.ttl_s:
            return
        if self._running is None:
            self._running = asyncio.ensure_future(self._compute(compute))
        # Shielded: a scraper that disconnects must not cancel the others' computation.
        await asyncio.shield(self._running)

    async def _compute(self, compute: Callable[[], Awaitable[Sequence[QueueInfo]]]) -> None:
        try:
            self.refreshes.inc()
            self.snapshot.infos = await compute()
            self._computed_at = time.monotonic()
        finally:
            self._running = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queues = QueueSnapshot()
        self.registry.register(self.queues)
        self.queue_refreshes = Counter(
            "aqsh_queue_figures_refreshes", "Computations of the asynq_* queue figures "
            "(at most one per few seconds, however often /metrics is scraped)",
            registry=self.registry)
        self.queue_figures = QueueFigures(self.queues, self.queue_refreshes)
        self.http_requests = Counter("aqsh_http_requests", "HTTP requests",
                                     ["route", "method", "status"], registry=self.registry)
        self.http_latency = Histogram("aqsh_http_request_duration_seconds",
                                      "HTTP request latency", ["route", "method"],
                                      registry=self.registry)
        self.tasks_submitted = Counter("aqsh_tasks_submitted", "Tasks accepted by the API",
                                       ["task"], registry=self.registry)
        self.tasks_finished = Counter("aqsh_tasks_finished", "Script runs finished",
                                      ["task", "outcome"], registry=self.registry)
        self.script_duration = Histogram(
            "aqsh_script_duration_seconds", "Script run time", ["task"],
            buckets=(0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
            registry=self.registry)
        self.submit_retries = Counter(
            "aqsh_submit_retries", "Submission attempts repeated because Redis was unreachable",
            registry=self.registry)
        self.schedule_fires = Counter(
            "aqsh_schedule_fires", "Schedule fires by outcome: stored (by this worker), "
            "elsewhere (another replica stored it), failed (Redis away), refused",
            ["task", "outcome"], registry=self.registry)
        self.webhook_deliveries = Counter(
            "aqsh_webhook_deliveries", "Webhook delivery attempts by event and outcome: "
            "delivered, retrying, failed (no attempt left), gone (410), refused (URL, address "
            "or secret not allowed)", ["event", "outcome"], registry=self.registry)
        self.webhook_duration = Histogram(
            "aqsh_webhook_delivery_duration_seconds", "Webhook delivery attempt time",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
            registry=self.registry)
        self.sse_clients = Gauge("aqsh_sse_clients", "SSE log followers connected",
                                 registry=self.registry)
        self.runs_waiting = Gauge(
            "aqsh_runs_waiting", "Runs held until their turn, by task and reason "
            "(concurrency, rate), as of the last queue figures", ["task", "reason"],
            registry=self.registry)
        self.run_wait = Histogram(
            "aqsh_run_wait_seconds", "Time held runs waited for their turn (concurrency, "
            "rate) before they started", ["task"],
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400),
            registry=self.registry)

        # Labelled children by label values: ``labels()`` re-validates and hashes its arguments
        # on every call, which costs more per request than the increment itself. Bounded like
        # the label sets (route templates, configured task names); past the bound, uncached.
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[tuple[str, str], Any] = {}
        self._submitted_children: dict[str, Any] = {}

    def request_done(self, route: str, method: str, status: int,
                     duration_s: float | None) -> None:
        """One request answered: counted, and timed unless ``duration_s`` is None (streams)."""
        key = (route, method, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self.http_requests.labels(route, method, str(status))
            if len(self._request_children) < _MAX_CACHED_CHILDREN:
                self._request_children[key] = counter
        counter.inc()
        if duration_s is None:
            return
        histogram = self._latency_children.get((route, method))
        if histogram is None:
            histogram = self.http_latency.labels(route, method)
            if len(self._latency_children) < _MAX_CACHED_CHILDREN:
                self._latency_children[(route, method)] = histogram
        histogram.observe(duration_s)

    def task_submitted(self, task: str) -> None:
        counter = self._submitted_children.get(task)
        if counter is None:
            counter = self.tasks_submitted.labels(task)
            if len(self._submitted_children) < _MAX_CACHED_CHILDREN:
                self._submitted_children[task] = counter
        counter.inc()

    def webhook_attempt(self, event: str, outcome: str, duration_s: float) -> None:
        self.webhook_deliveries.labels(event, outcome).inc()
        self.webhook_duration.observe(duration_s)

    def set_waiting(self, counts: dict[tuple[str, str], int]) -> None:
        """Replace the held-run figures: a label set that no longer waits disappears."""
        self.runs_waiting.clear()
        for (task, reason), n in counts.items():
            self.runs_waiting.labels(task, reason).set(n)

    def runs_waited(self, waits: list[tuple[str, float]]) -> None:
        for task, waited_s in waits:
            self.run_wait.labels(task).observe(waited_s)

    def script_finished(self, task: str, outcome: str, duration_s: float) -> None:
        self.tasks_finished.labels(task, outcome).inc()
        self.script_duration.labels(task).observe(duration_s)
