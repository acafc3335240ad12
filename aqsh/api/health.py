"""Probes that tell the truth: ``/health/ready`` (send traffic / count this worker in?) and
``/health/live`` (is a restart the cure?), both from the loops' own records.

Ready fails while draining, while Redis does not answer, and while any supervised loop has not
completed a cycle within its deadline or keeps failing: a worker whose fetcher gets ``OOM`` from
every dequeue takes no tasks, and must say so. Live fails only when a loop is *wedged* — has done
nothing at all, neither a cycle nor a failure, for long enough — because a loop that fails is
waiting for Redis, which a restart does not bring back, while a wedged one is stuck in-process.
Live stays 200 while the process drains: it is shutting down on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from aqsh import __version__, errors
from aqsh.api.state import STATE_KEY, ApiState
from aqsh.engine.faults import Loops


async def _redis_latency_ms(state: ApiState) -> tuple[float | None, str | None]:
    started = time.perf_counter()
    try:
        await state.broker.ping()
    except (errors.BrokerUnavailable, errors.BrokerFault) as exc:
        return None, exc.message
    return round((time.perf_counter() - started) * 1000, 3), None


async def _verdict(state: ApiState) -> tuple[bool, bool, dict[str, object]]:
    latency, redis_error = await _redis_latency_ms(state)
    loops_ready, loops_live, loops = state.loops.report()
    redis: dict[str, object] = {"reachable": latency is not None, "latency_ms": latency}
    if redis_error is not None:
        redis["error"] = redis_error
    body: dict[str, object] = {"redis": redis, "loops": loops, "draining": state.draining}
    ready = latency is not None and loops_ready and not state.draining
    return ready, loops_live, body


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    ready, _, body = await _verdict(state)
    body = {"status": "ok" if ready else "unavailable", "version": __version__,
            "mode": state.settings.mode, **body, "tasks": len(state.config().tasks)}
    return web.json_response(body, status=200 if ready else 503)


async def live(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    _, loops_live, loops = state.loops.report()
    if not loops_live:
        wedged = {name: d for name, d in loops.items() if "not_live" in d}
        return web.json_response({"status": "wedged", "loops": wedged}, status=503)
    return web.json_response({"status": "draining" if state.draining else "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    is_ready, _, body = await _verdict(state)
    if state.draining:
        status = "draining"
    elif not body["redis"]["reachable"]:  # type: ignore[index]
        status = "redis unavailable"
    elif not is_ready:
        status = "loops failing"
    else:
        status = "ok"
    return web.json_response({"status": status, **body}, status=200 if is_ready else 503)


class LoopErrorsCollector(Collector):
    """``aqsh_loop_errors_total{loop,kind}``, read from the loops' records at scrape time (the
    engine keeps its own counts and knows nothing of Prometheus)."""

    def __init__(self, loops: Loops) -> None:
        self.loops = loops

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "aqsh_loop_errors", "Failures of a supervised loop, by loop and kind of fault",
            labels=["loop", "kind"])
        for loop, kind, count in self.loops.error_counts():
            family.add_metric([loop, kind], count)
        yield family
