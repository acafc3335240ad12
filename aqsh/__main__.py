"""``python -m aqsh`` / ``aqsh``: ``serve`` (api | worker | both) and ``check-config``.

The API-only process runs on uvloop (its enqueues cost ~30% less CPU there); a process that
runs scripts (worker, both) stays on the standard loop, whose pidfd child watcher spawns
subprocesses several times faster than uvloop does.

Shutdown: the first SIGTERM/SIGINT marks the service not-ready, stops accepting connections,
lets SSE followers end and drains the worker like the engine does (running scripts get the
shutdown timeout, then are requeued); a second signal forces. SIGHUP reloads tasks.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import structlog
from aiohttp import web

from aqsh import __version__
from aqsh.api.app import ApiRunner, create_app
from aqsh.api.metrics import Metrics
from aqsh.api.state import ApiState
from aqsh.config_holder import ConfigHolder
from aqsh.engine.client import Client
from aqsh.engine.compat import UnsupportedServer, check_server
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.engine.faults import Loops
from aqsh.engine.inspect import Inspector
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.scheduler import Scheduler
from aqsh.engine.server import Server
from aqsh.errors import ConfigError
from aqsh.logging import configure_logging
from aqsh.runner.handler import RunnerSettings, ShellRunner, shell_retry_delay
from aqsh.runner.process import install_child_watcher
from aqsh.runner.schedules import periodic_tasks
from aqsh.runner.spec import TasksConfig
from aqsh.settings import Settings, load_settings

log = structlog.get_logger("aqsh")


def check_config(path: str, tasks_dir: str) -> int:
    from aqsh.runner.spec import load_tasks

    try:
        config = load_tasks(path, tasks_dir)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"{path}: OK, {len(config.tasks)} task(s): {', '.join(sorted(config.tasks))}")
    return 0


async def serve(settings: Settings) -> int:
    configure_logging(settings.log_format, settings.log_level)
    try:
        config = ConfigHolder(settings.tasks_config, settings.tasks_dir)
    except ConfigError as exc:
        print(f"aqsh: {exc.message}", file=sys.stderr)
        return 2

    embedded = None
    url = settings.redis_addr
    if settings.redis_addr == "embedded":
        from aqsh.embedded import start_embedded_redis

        embedded = start_embedded_redis(settings.data_dir)
        url = embedded.url
        log.info("redis.embedded", url=url, data_dir=embedded.data_dir)
    redis_settings = RedisSettings(
        url=url, password=settings.redis_password,
        sentinel_addrs=settings.redis_sentinel_addrs,
        sentinel_master=settings.redis_sentinel_master,
        cluster_addrs=settings.redis_cluster_addrs,
    )
    redis = create_client(redis_settings)
    try:
        server_label = await check_server(redis)
    except UnsupportedServer as exc:
        print(f"aqsh: {exc.message}", file=sys.stderr)
        await redis.aclose()
        if embedded is not None:
            embedded.stop_keep_data()
        return 2
    if server_label is not None:
        log.info("redis.checked", server=server_label)
    blocking = create_client(
        RedisSettings(url=url, password=settings.redis_password,
                      sentinel_addrs=settings.redis_sentinel_addrs,
                      sentinel_master=settings.redis_sentinel_master,
                      cluster_addrs=settings.redis_cluster_addrs, max_connections=4096),
        socket_timeout_s=60.0,
    )
    # Script calls (dequeue, acks, leases, results) over the broker's own fast lane: a
    # fraction of redis-py's CPU per call (plain TCP Redis only; redis-py otherwise).
    broker = RedisBroker(redis, fast_lane=True)
    metrics = Metrics()
    # The API's enqueues take the fast lane (one multiplexed connection; plain TCP Redis only,
    # otherwise the client falls back to redis-py by itself).
    loops = Loops()
    state = ApiState(settings=settings, config=config, redis=redis, blocking_redis=blocking,
                     broker=broker, client=Client(broker, fast_lane=True),
                     inspector=Inspector(redis, known_queues=lambda: config_queues(config)),
                     metrics=metrics, loops=loops)
    server = None
    scheduler = None
    if settings.mode in ("worker", "both"):
        server = _worker(settings, config, broker, metrics, loops=loops)
        if settings.scheduler:
            scheduler = _scheduler(settings, config, broker, metrics, loops=loops)
    app = create_app(state, api=settings.mode in ("api", "both"))
    app_runner = ApiRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await app_runner.setup()
    host, port = settings.host_port
    site = web.TCPSite(app_runner, host, port)
    await site.start()
    loop = asyncio.get_running_loop()
    log.info("aqsh.started", version=__version__, mode=settings.mode, bind=settings.bind,
             tasks=sorted(config.current.tasks), event_loop=type(loop).__module__)

    stop = asyncio.Event()

    def on_stop_signal() -> None:
        if stop.is_set() and server is not None:
            log.warning("aqsh.forced_shutdown")
            server.force()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, config.reload)
    config.watch()
    if server is not None:
        await server.start()
    if scheduler is not None:
        await scheduler.start()
    await stop.wait()
    log.info("aqsh.stopping")
    # Not ready from now on, but still answering: the probes must see a drain (live 200,
    # ready 503), not a refused connection, until the running scripts are done.
    state.draining = True
    if scheduler is not None:
        await scheduler.stop()
    if server is not None:
        await server.stop()
    await site.stop()
    await app_runner.cleanup()
    await config.stop()
    await state.client.aclose()
    await broker.close_fast_lane()
    await blocking.aclose()
    await redis.aclose()
    if embedded is not None:
        embedded.stop_keep_data()
    log.info("aqsh.stopped")
    return 0


def config_queues(config: ConfigHolder) -> list[str]:
    """The queues tasks.yaml sends tasks to: a lookup by id searches them even when Redis's
    own list of queues was lost (a restart without persistence, a flush)."""
    return sorted({spec.queue for spec in config.current.tasks.values()})


def _worker(settings: Settings, config: ConfigHolder, broker: RedisBroker,
            metrics: Metrics, *, loops: Loops | None = None) -> Server:
    install_child_watcher()  # before the first spawn; never uvloop in a process that spawns
    runner = ShellRunner(
        config, broker.client,
        RunnerSettings(work_root=settings.results_dir, keep_work_dirs=settings.keep_work_dirs,
                       env_allowlist=settings.env_allowlist, kill_grace_s=settings.kill_grace_s,
                       max_string_len=settings.max_input_length),
        on_finished=metrics.script_finished,
        fast_lane=True,  # log batches over one connection of its own; closed by server.stop()
    )
    queues = dict(settings.worker_queues) or {
        spec.queue: 1 for spec in config.current.tasks.values()
    }
    return Server(broker, runner, concurrency=settings.worker_concurrency, queues=queues,
                  strict_priority=settings.worker_strict_priority,
                  shutdown_timeout_s=settings.shutdown_timeout_s,
                  retry_delay=shell_retry_delay(config), loops=loops)


def _scheduler(settings: Settings, config: ConfigHolder, broker: RedisBroker,
               metrics: Metrics, *, loops: Loops | None = None) -> Scheduler:
    """The schedules of tasks.yaml, re-synced on every reload (unchanged entries keep their
    next fire time)."""

    def count(task: str, outcome: str) -> None:
        metrics.schedule_fires.labels(task, outcome).inc()

    scheduler = Scheduler(broker, on_fire=count, loops=loops)

    def sync(current: TasksConfig) -> None:
        scheduler.sync(periodic_tasks(current, result_retention_s=settings.result_retention_s))

    sync(config.current)
    config.subscribe(sync)
    return scheduler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aqsh", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"aqsh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the service (mode from AQSH_MODE or --mode)")
    serve_cmd.add_argument("--mode", choices=("api", "worker", "both"))
    check = sub.add_parser("check-config", help="validate a tasks.yaml; exit 1 on errors")
    check.add_argument("file")
    check.add_argument("--tasks-dir", default=None,
                       help="base for relative script paths (default: AQSH_TASKS_DIR or the "
                            "file's directory)")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        import os

        tasks_dir = args.tasks_dir or os.environ.get("AQSH_TASKS_DIR") or os.path.dirname(
            os.path.abspath(args.file))
        return check_config(args.file, tasks_dir)
    try:
        settings = load_settings(None, **({"mode": args.mode} if args.mode else {}))
    except ConfigError as exc:
        print(f"aqsh: {exc.message}", file=sys.stderr)
        return 2
    loop_factory = None
    if settings.uses_uvloop:
        import uvloop  # only where it runs: a worker process need not load it

        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
        loop_factory=loop_factory
    ) as runner:
        return runner.run(serve(settings))
    return 130


if __name__ == "__main__":
    sys.exit(main())
