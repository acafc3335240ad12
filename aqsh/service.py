"""The service process behind ``python -m aqsh serve | worker | api`` (the command line itself
is ``aqsh.cli``, which imports this module only when it starts a service).

The API-only process runs on uvloop (its enqueues cost ~30% less CPU there); a process that
runs scripts (worker, both) stays on the standard loop, whose pidfd child watcher spawns
subprocesses several times faster than uvloop does.

Shutdown: the first SIGTERM/SIGINT marks the service not-ready, stops accepting connections,
lets SSE followers end and drains the worker like the engine does (running scripts get the
shutdown timeout, then are requeued); a second signal forces. SIGHUP reloads tasks.yaml.

Secrets: a process that runs scripts makes itself non-dumpable at start, so a script — same uid,
not root — cannot read its ``/proc/<pid>/environ``, ``mem`` or ``fd/*``; and the Redis password
is wiped from the process environment once read (``AQSH_REDIS_PASSWORD_FILE`` keeps it out of the
environment altogether).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from typing import Any

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
from aqsh.engine.faults import LoopMonitor, Loops
from aqsh.engine.inspect import Inspector
from aqsh.engine.rdb import RedisBroker, guarded
from aqsh.engine.scheduler import Scheduler
from aqsh.engine.server import Server
from aqsh.errors import AqshError, ConfigError
from aqsh.logging import configure_logging
from aqsh.runner.batches import check_interval_s, shell_aggregator, shell_group_settings
from aqsh.runner.handler import RunnerSettings, ShellRunner, shell_retry_delay
from aqsh.runner.process import install_child_watcher
from aqsh.runner.schedules import periodic_tasks
from aqsh.runner.spec import TasksConfig
from aqsh.runner.workdirs import check_work_root
from aqsh.settings import Settings
from aqsh.supervisor import supervised_child
from aqsh.webhooks import WEBHOOK_QUEUE
from aqsh.webhooks.delivery import DeliveryHandler, delivery_retry_delay
from aqsh.webhooks.notifier import Notifier

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


_PR_SET_DUMPABLE = 4
#: Variables wiped from the process environment once settings have been read.
SECRET_VARIABLES = ("AQSH_REDIS_PASSWORD",)


def make_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid>/environ, mem, fd/*, maps… of this process become
    root's, and ptrace is refused, to every process without CAP_SYS_PTRACE — the scripts, which
    run as this uid, included. (A root script has the capability unless the deployment drops
    it: see SECURITY.md.) Core dumps are off too. Scripts themselves are dumpable again after
    their exec. False where the call is unavailable (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    return bool(done)


def scrub_environment(names: tuple[str, ...] = SECRET_VARIABLES) -> None:
    """Remove ``names`` from the environment and overwrite their values where the kernel shows
    them: unsetenv alone leaves the original strings in the block /proc/<pid>/environ reads."""
    try:
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        libc.getenv.argtypes = (ctypes.c_char_p,)
        libc.strlen.restype = ctypes.c_size_t
        libc.strlen.argtypes = (ctypes.c_void_p,)
    except (OSError, AttributeError):
        libc = None
    for name in names:
        if name not in os.environ:
            continue
        if libc is not None:
            pointer = libc.getenv(name.encode())
            if pointer:
                ctypes.memset(pointer, 0, libc.strlen(pointer))
        os.environ.pop(name, None)


def harden_process(settings: Settings) -> None:
    """Before anything else runs: secrets out of the environment, and out of reach of the
    scripts where this process runs them. A Redis URL with credentials in it
    (``redis://:pw@host``) counts as a secret too; settings have been read, nothing reads the
    variables again."""
    url_with_password = tuple(name for name in ("AQSH_REDIS_ADDR",)
                              if "@" in os.environ.get(name, ""))
    scrub_environment(SECRET_VARIABLES + url_with_password)
    if settings.mode in ("worker", "both") and not make_non_dumpable():
        print("aqsh: warning: could not make the worker non-dumpable; scripts of this uid can "
              "read its /proc files", file=sys.stderr)


async def serve(settings: Settings) -> int:
    # One of N supervised children (AQSH_WORKER_PROCESSES, aqsh/supervisor.py): dies with the
    # supervisor, shares the port.
    reuse_port = supervised_child()
    configure_logging(settings.log_format, settings.log_level)
    try:
        config = ConfigHolder(settings.tasks_config, settings.tasks_dir)
        if settings.mode in ("worker", "both"):
            check_work_root(settings.results_dir)
    except ConfigError as exc:
        print(f"aqsh: {exc.message}", file=sys.stderr)
        return 2

    # AQSH_REDIS_ADDR=embedded was replaced by the embedded server's URL by the caller
    # (aqsh.cli.process), which also stops that server however this returns.
    url = settings.redis_addr
    redis_settings = RedisSettings(
        url=url, password=settings.redis_password,
        sentinel_addrs=settings.redis_sentinel_addrs,
        sentinel_master=settings.redis_sentinel_master,
        cluster_addrs=settings.redis_cluster_addrs,
    )
    redis = create_client(redis_settings)
    await _require_redis(redis, settings)
    try:
        server_label = await check_server(redis)
    except UnsupportedServer as exc:
        await redis.aclose()
        raise StartupError(exc.message) from exc
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
                     inspector=Inspector(redis, known_queues=lambda: config_queues(config),
                                         lane=broker.lane),
                     metrics=metrics, loops=loops)
    server = None
    scheduler = None
    webhook_server = None
    notifier = state.notifier = _notifier(settings, config, state)
    if settings.mode in ("worker", "both"):
        # AQSH_WORKER_QUEUES=aqsh:webhooks: a worker that only delivers webhooks (script
        # workers then set AQSH_WEBHOOK_WORKER=false, and no delivery shares their CPU).
        if not delivery_only(settings):
            server = _worker(settings, config, broker, metrics, loops=loops, notifier=notifier)
        if settings.webhook_worker or server is None:
            webhook_server = _webhook_worker(settings, broker, metrics, loops=loops)
        if settings.scheduler:
            scheduler = _scheduler(settings, config, broker, metrics, loops=loops)

    async def close_connections() -> None:
        await config.stop()
        await state.client.aclose()
        await broker.close_fast_lane()
        await blocking.aclose()
        await redis.aclose()

    app = create_app(state, api=settings.mode in ("api", "both"))
    app_runner = ApiRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await app_runner.setup()
    host, port = settings.host_port
    site = web.TCPSite(app_runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await app_runner.cleanup()
        await close_connections()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {settings.bind}: {reason}") from None
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
    notifier.start(sweep=server is not None or webhook_server is not None)
    if webhook_server is not None:
        await webhook_server.start()
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
    # After the scripts: their last ends are dispatched before the deliveries stop.
    await notifier.stop()
    if webhook_server is not None:
        await webhook_server.stop()
    await site.stop()
    await app_runner.cleanup()
    await close_connections()
    log.info("aqsh.stopped")
    return 0


class StartupError(Exception):
    """A start that cannot succeed (port taken, Redis unreachable): the command line prints
    its one-line message and exits non-zero instead of a traceback."""


#: How long a starting process waits for Redis (it may be starting alongside, as in a fresh
#: deployment) before giving up; an orchestrator restarts it after that.
REDIS_STARTUP_WAIT_S = 10.0


async def _require_redis(redis: Any, settings: Settings) -> None:
    """One PING before anything is served: an unreachable Redis or a wrong password stops the
    start with one line, rather than a process that reports ready and fails every call."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + REDIS_STARTUP_WAIT_S
    while True:
        try:
            await guarded(redis.ping())
            return
        except (AqshError, OSError) as exc:
            failure: BaseException = exc
        except Exception as exc:  # redis-py's own (auth, cluster set-up): final at once
            failure = exc
            give_up_at = loop.time()
        if loop.time() >= give_up_at:
            await redis.aclose()
            where = (",".join(settings.redis_cluster_addrs) or ",".join(
                settings.redis_sentinel_addrs) or _redacted(settings.redis_addr))
            raise StartupError(f"cannot reach Redis at {where}: {_one_line(failure)}")
        await asyncio.sleep(0.2)


def _redacted(addr: str) -> str:
    """A Redis URL without its password, for messages."""
    scheme, sep, rest = addr.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return addr


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def config_queues(config: ConfigHolder) -> list[str]:
    """The queues tasks.yaml sends tasks to: a lookup by id searches them even when Redis's
    own list of queues was lost (a restart without persistence, a flush)."""
    return sorted({spec.queue for spec in config.current.tasks.values()})


def delivery_only(settings: Settings) -> bool:
    return bool(settings.worker_queues) and all(
        name == WEBHOOK_QUEUE for name, _ in settings.worker_queues)


def _notifier(settings: Settings, config: ConfigHolder, state: ApiState) -> Notifier:
    return Notifier(config=config, redis=state.redis, client=state.client,
                    inspector=state.inspector, settings=settings, fast_lane=True)


def _webhook_worker(settings: Settings, broker: RedisBroker, metrics: Metrics, *,
                    loops: Loops | None = None) -> Server:
    """Deliveries on a server of their own: its own concurrency (a slow receiver never holds a
    slot a script could use), its own retry schedule, and its retries forwarded every second
    (a 5 s step of the schedule must not become 10)."""
    handler = DeliveryHandler(settings, broker.client, on_attempt=metrics.webhook_attempt)
    return Server(broker, handler, concurrency=settings.webhook_concurrency,
                  queues={WEBHOOK_QUEUE: 1}, shutdown_timeout_s=settings.shutdown_timeout_s,
                  retry_delay=delivery_retry_delay(settings.webhook_schedule_s),
                  forward_interval_s=1.0,
                  loops=PrefixedLoops(loops, "webhooks.") if loops is not None else None)


class PrefixedLoops(Loops):
    """A second server in one process reports under its own names (its loops are called
    "fetcher", "acks"... like the first one's)."""

    def __init__(self, base: Loops, prefix: str) -> None:
        super().__init__(base.clock)
        self.base = base
        self.prefix = prefix
        self.monitors = base.monitors

    def monitor(self, name: str, *, ready_after_s: float = 30.0,
                live_after_s: float = 120.0) -> LoopMonitor:
        return self.base.monitor(self.prefix + name, ready_after_s=ready_after_s,
                                 live_after_s=live_after_s)

    def remove(self, name: str) -> None:
        self.base.remove(self.prefix + name)


def _worker(settings: Settings, config: ConfigHolder, broker: RedisBroker,
            metrics: Metrics, *, loops: Loops | None = None,
            notifier: Notifier | None = None) -> Server:
    install_child_watcher()  # before the first spawn; never uvloop in a process that spawns
    runner = ShellRunner(
        config, broker.client,
        RunnerSettings(work_root=settings.results_dir, keep_work_dirs=settings.keep_work_dirs,
                       env_allowlist=settings.env_allowlist, kill_grace_s=settings.kill_grace_s,
                       max_string_len=settings.max_input_length,
                       unknown_tasks=settings.unknown_tasks),
        on_finished=metrics.script_finished,
        fast_lane=True,  # log batches over one connection of its own; closed by server.stop()
    )
    queues = dict(settings.worker_queues) or {
        spec.queue: 1 for spec in config.current.tasks.values()
    }
    # Deliveries are served by their own server (_webhook_worker), never by the shell one.
    queues.pop(WEBHOOK_QUEUE, None)
    # Batches (tasks.yaml ``aggregate:``): each group gets its task's settings; groups of other
    # tasks or of foreign enqueuers are left alone, with a warning in the log.
    return Server(broker, notifier.wrap(runner) if notifier is not None else runner,
                  concurrency=settings.worker_concurrency, queues=queues or {"default": 1},
                  strict_priority=settings.worker_strict_priority,
                  shutdown_timeout_s=settings.shutdown_timeout_s,
                  retry_delay=shell_retry_delay(config), loops=loops,
                  group_aggregator=shell_aggregator(
                      config, result_retention_s=settings.result_retention_s),
                  group_settings=shell_group_settings(config),
                  aggregation_interval_s=check_interval_s(config.current),
                  on_transition=notifier.on_transition if notifier is not None else None,
                  before_dependency_cancel=(notifier.before_dependency_cancel
                                            if notifier is not None else None))


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

