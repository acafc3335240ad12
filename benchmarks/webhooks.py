"""Webhook deliveries: deliveries/s to a local receiver, and what a ``notify`` costs a task.

- Deliveries/s: N delivery tasks on ``aqsh:webhooks`` sent by the delivery server (as
  ``aqsh serve`` wires it) to an aiohttp receiver in this process, at concurrency 1 and 50.
- Task throughput of ``#!/bin/sh\\necho hi`` with a ``notify`` entry vs the same task type
  without one, same run, alternating rounds, medians: ``notify_vs_plain_ratio`` (≥ 0.9) with
  the deliveries made by a delivery worker of its own (``AQSH_WORKER_QUEUES=aqsh:webhooks``,
  another process on the same machine: the script worker pays the intent, the engine hook and
  the enqueue), and ``notify_inprocess_vs_plain_ratio`` with the default wiring, where the
  script worker's process delivers too (its event loop then carries both).

- The worker's own cost, ``notify_deferred_vs_plain_ratio`` (≥ 0.9): the same two task types
  while nothing delivers (the durable deliveries are drained after each timed round), and the
  worker process's CPU per task with and without (``notify_worker_cpu_ratio``). On a 2-core
  machine the delivery worker and the receiver take CPU the script worker would otherwise
  have; this figure is what "delivering must not slow the worker that ran the script" means
  once deliveries have cores of their own.

Usage: python benchmarks/webhooks.py [tasks] [rounds]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import _common
import aiohttp
import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from aqsh.api.app import settle_heap
from aqsh.api.metrics import Metrics
from aqsh.config_holder import ConfigHolder
from aqsh.engine import keys
from aqsh.engine.client import Client, EnqueueRequest
from aqsh.engine.inspect import Inspector
from aqsh.engine.rdb import RedisBroker
from aqsh.logging import configure_logging
from aqsh.redis_process import RedisProcess, free_port
from aqsh.runner.process import install_child_watcher
from aqsh.service import _webhook_worker, _worker
from aqsh.settings import Settings
from aqsh.webhooks import WEBHOOK_QUEUE, WEBHOOK_TASK_TYPE
from aqsh.webhooks.notifier import Notifier
from aqsh.webhooks.signing import new_secret
from aqsh.webhooks.store import Delivery

_ARGS = [] if sys.argv[1:2] == ["--receiver"] else sys.argv[1:]
# 2,000 script runs a round (2-5 s a side): with 1,000 the in-process side's median moved by a
# fifth between runs.
TASKS = int(_ARGS[0]) if _ARGS else 2000
ROUNDS = int(_ARGS[1]) if len(_ARGS) > 1 else 5


class Receiver:
    """The receiver runs in a process of its own (it is another system): the figures are what
    aqsh's process spends, not a receiver sharing its event loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
            [sys.executable, __file__, "--receiver", str(self.port)])
        self.session = aiohttp.ClientSession()
        for _ in range(500):
            try:
                await self.count()
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.02)  # waiting for the receiver process to listen
        raise SystemExit("the receiver did not start")

    async def count(self) -> int:
        assert self.session is not None
        async with self.session.get(f"http://127.0.0.1:{self.port}/count") as resp:
            return int(await resp.text())

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def serve_receiver(port: int) -> None:
    count = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.Response(status=204)

    async def get_count(request: web.Request) -> web.Response:
        return web.Response(text=str(count))

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", get_count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def until(condition: object, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # the figures live in Redis or the receiver: a poll


async def delivery_rate(redis: aioredis.Redis, settings: Settings, receiver: Receiver,
                        concurrency: int, count: int) -> float:
    await redis.flushall()
    body = msgspec.json.encode({"event": "task.completed", "id": "x" * 36, "state": "completed"})
    payloads = [msgspec.json.encode(Delivery(
        task_id=f"t{i}", task_queue="bench", event="task.completed",
        url=f"http://127.0.0.1:{receiver.port}/hook", webhook_id=f"msg_t{i}_completed",
        body=body.decode(), target="notify", secret_env="BENCH_SECRET")) for i in range(count)]
    client = Client(redis, wake_workers=False)
    for start in range(0, count, 500):
        await client.enqueue_many([EnqueueRequest(type=WEBHOOK_TASK_TYPE, payload=p,
                                                  queue=WEBHOOK_QUEUE, max_retry=7)
                                   for p in payloads[start:start + 500]])
    tuned = msgspec.structs.replace(settings, webhook_concurrency=concurrency)
    broker = RedisBroker(redis, fast_lane=True)
    server = _webhook_worker(tuned, broker, Metrics())
    before = await receiver.count()
    started = time.perf_counter()
    await server.start()

    async def done() -> bool:
        return await receiver.count() - before >= count

    await until(done, "deliveries")
    elapsed = time.perf_counter() - started
    await server.stop()
    await broker.close_fast_lane()
    return count / elapsed


def start_delivery_worker(redis_url: str, tasks_yaml: Path,
                          tmp: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_TASKS_CONFIG": str(tasks_yaml),
           "AQSH_TASKS_DIR": str(tmp), "AQSH_BIND": f"127.0.0.1:{free_port()}",
           "AQSH_RESULTS_DIR": str(tmp / "work-deliverer"), "AQSH_LOG_LEVEL": "warning",
           "AQSH_LOG_FORMAT": "json", "AQSH_SCHEDULER": "false",
           "AQSH_WORKER_QUEUES": WEBHOOK_QUEUE}
    return subprocess.Popen([sys.executable, "-m", "aqsh", "serve", "--mode", "worker"],
                            env=env, cwd=_common.ROOT, stdout=subprocess.DEVNULL)


#: Who delivers while a ``notified`` round runs: the script worker's own process (the default
#: wiring), a delivery worker of its own (another process, started by the caller), or nobody
#: until the round is timed (then a delivery server drains the durable deliveries).
Delivering = Literal["in_process", "delivery_worker", "after_round"]


async def task_rate(redis: aioredis.Redis, settings: Settings, config: ConfigHolder,
                    name: str, count: int, receiver: Receiver,
                    delivering: Delivering) -> tuple[float, float]:
    """Tasks/s of ``name`` through a worker wired as ``aqsh serve`` wires one (with the
    notifier, and the delivery server beside it unless ``delivering`` says otherwise), and this
    process's CPU seconds per task over the timed part: the worker's own cost (the scripts are
    other processes). ``after_round`` isolates what a ``notify`` costs the worker that ran the
    script from what the deliveries cost a machine they share."""
    await redis.flushall()
    client = Client(redis, wake_workers=False)
    for start in range(0, count, 500):
        await client.enqueue_many([EnqueueRequest(type=name, payload=b"{}", queue="bench",
                                                  max_retry=0, retention=3600)
                                   for _ in range(min(500, count - start))])
    broker = RedisBroker(redis, fast_lane=True)
    metrics = Metrics()
    # As aqsh serve builds it: deliveries enqueued over the fast lane, waking the workers.
    lane_client = Client(broker, fast_lane=True)
    notifier = Notifier(config=config, redis=redis, client=lane_client,
                        inspector=Inspector(redis), settings=settings, fast_lane=True)
    server = _worker(settings, config, broker, metrics, notifier=notifier)
    hooks = (_webhook_worker(settings, broker, metrics) if delivering == "in_process"
             else None)
    notifier.start(sweep=True)
    if hooks is not None:
        await hooks.start()
    delivered_before = await receiver.count()
    cpu_started = time.process_time()
    started = time.perf_counter()
    await server.start()
    completed = keys.queue_keys("bench").completed

    async def done() -> bool:
        return int(await redis.zcard(completed)) >= count

    await until(done, f"{count} {name} tasks")
    elapsed = time.perf_counter() - started
    cpu_per_task = (time.process_time() - cpu_started) / count
    if name == "notified" and delivering == "after_round":
        hooks = _webhook_worker(settings, broker, metrics)
        await hooks.start()
    if name == "notified":  # not timed: every delivery arrives before the next round

        async def delivered() -> bool:
            return await receiver.count() - delivered_before >= count

        await until(delivered, f"{count} deliveries")
    await server.stop()
    await notifier.stop()
    if hooks is not None:
        await hooks.stop()
    await lane_client.aclose()
    await broker.close_fast_lane()
    return count / elapsed, cpu_per_task


async def main() -> None:
    install_child_watcher()
    os.environ["BENCH_SECRET"] = new_secret()
    tmp = Path(tempfile.mkdtemp(prefix="aqsh-bench-"))
    (tmp / "hi.sh").write_text("#!/bin/sh\necho hi\n")
    (tmp / "hi.sh").chmod(0o755)
    receiver = Receiver()
    await receiver.start()
    tasks_yaml = tmp / "tasks.yaml"
    tasks_yaml.write_text(f"""\
tasks:
  plain: {{script: hi.sh, queue: bench, max_retry: 0}}
  notified:
    script: hi.sh
    queue: bench
    max_retry: 0
    notify: [{{url: "http://127.0.0.1:{receiver.port}/hook", secret_env: BENCH_SECRET}}]
""")
    settings = Settings(tasks_config=str(tasks_yaml), tasks_dir=str(tmp),
                        results_dir=str(tmp / "work"), worker_concurrency=10,
                        log_format="json", log_level="warning")
    config = ConfigHolder(settings.tasks_config, settings.tasks_dir)
    configure_logging("json", "warning")
    settle_heap()  # as `aqsh serve` does once its app has started
    figures: dict[str, float] = {}
    with RedisProcess() as redis_server:
        redis = aioredis.Redis.from_url(redis_server.url, max_connections=256)
        figures["deliveries_c1_per_s"] = await delivery_rate(redis, settings, receiver, 1,
                                                             max(50, TASKS // 4))
        figures["deliveries_c50_per_s"] = await delivery_rate(redis, settings, receiver, 50,
                                                              TASKS)
        samples = _common.Samples()

        async def interleaved(delivering: Delivering, plain: str, notified: str,
                              cpu: tuple[str, str] | None = None) -> None:
            """Both task types ROUNDS times, alternating, the order flipped every round
            (drift favours neither); ``cpu`` names the worker-CPU samples when recorded."""
            sides = [("plain", plain, cpu[0] if cpu else None),
                     ("notified", notified, cpu[1] if cpu else None)]
            for round_no in range(ROUNDS):
                for name, rate_sample, cpu_sample in sides if round_no % 2 == 0 else sides[::-1]:
                    rate, cpu_per_task = await task_rate(redis, settings, config, name, TASKS,
                                                         receiver, delivering)
                    samples.add(rate_sample, rate)
                    if cpu_sample is not None:
                        samples.add(cpu_sample, cpu_per_task * 1e6)

        # Phase 0: the worker's own cost. No delivery runs while a round is timed; the
        # deliveries wait, durable, and are drained after it.
        await interleaved("after_round", "tasks_plain_0_per_s", "tasks_notify_deferred_per_s",
                          cpu=("worker_cpu_us_per_task_plain", "worker_cpu_us_per_task_notify"))
        # Phase 1: a delivery worker of its own (AQSH_WORKER_QUEUES=aqsh:webhooks, a separate
        # `aqsh serve --mode worker` on the same machine) delivers; the script worker pays
        # the intent, the hook and the enqueue of each delivery.
        deliverer = start_delivery_worker(redis_server.url, tasks_yaml, tmp)
        try:
            await interleaved("delivery_worker", "tasks_plain_per_s", "tasks_notify_per_s")
        finally:
            deliverer.terminate()
            deliverer.wait()
        # Phase 2: the default wiring — the script worker's process delivers too.
        await interleaved("in_process", "tasks_plain_2_per_s", "tasks_notify_inprocess_per_s")
        figures["notify_deferred_vs_plain_ratio"] = samples.ratio("tasks_notify_deferred_per_s",
                                                                  "tasks_plain_0_per_s")
        figures["notify_worker_cpu_ratio"] = samples.ratio("worker_cpu_us_per_task_notify",
                                                           "worker_cpu_us_per_task_plain")
        figures["notify_vs_plain_ratio"] = samples.ratio("tasks_notify_per_s",
                                                         "tasks_plain_per_s")
        figures["notify_inprocess_vs_plain_ratio"] = samples.ratio(
            "tasks_notify_inprocess_per_s", "tasks_plain_2_per_s")
        figures["deliveries_c50_vs_c1_ratio"] = (figures["deliveries_c50_per_s"]
                                                 / figures["deliveries_c1_per_s"])
        await redis.aclose()
    await config.stop()
    await receiver.stop()
    print(f"deliveries/s to a local receiver: c1 {figures['deliveries_c1_per_s']:.0f}, "
          f"c50 {figures['deliveries_c50_per_s']:.0f}")
    print(f"the worker's own cost (deliveries drained after each round): tasks/s plain "
          f"{samples.median('tasks_plain_0_per_s'):.0f}, with notify "
          f"{samples.median('tasks_notify_deferred_per_s'):.0f} (ratio "
          f"{figures['notify_deferred_vs_plain_ratio']:.2f}, target ≥ 0.9); worker CPU µs per "
          f"task {samples.median('worker_cpu_us_per_task_plain'):.0f} · "
          f"{samples.median('worker_cpu_us_per_task_notify'):.0f} "
          f"(ratio {figures['notify_worker_cpu_ratio']:.2f})")
    print(f"tasks/s: plain {samples.median('tasks_plain_per_s'):.0f}, with notify "
          f"{samples.median('tasks_notify_per_s'):.0f} "
          f"(ratio {figures['notify_vs_plain_ratio']:.2f}, target ≥ 0.9); delivered in the "
          f"script worker's own process: ratio {figures['notify_inprocess_vs_plain_ratio']:.2f}")
    _common.report("webhooks", {k: round(v, 3) for k, v in figures.items()}, samples)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--receiver"]:
        serve_receiver(int(sys.argv[2]))
    else:
        asyncio.run(main())
