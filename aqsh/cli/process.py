"""Process commands: ``serve`` (mode from AQSH_MODE or ``--mode``), ``worker``, ``api``, and
``check-config``.

A start that cannot succeed — a bad setting, a bad tasks.yaml, the port taken, Redis out of
reach — prints one line and exits non-zero, and leaves nothing running: the embedded Redis of
``AQSH_REDIS_ADDR=embedded`` is started here, outside the event loop, and stopped here however
the service ends; it also dies with this process when that is SIGKILLed (see aqsh.embedded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import click
import msgspec

from aqsh.errors import ConfigError

#: Exit codes: 1 a start that failed (port, Redis), 2 bad configuration (settings, tasks.yaml).
EXIT_START_FAILED = 1
EXIT_BAD_CONFIG = 2


def _fail(message: str, code: int) -> int:
    print(f"aqsh: {message}", file=sys.stderr)
    return code


_processes_option = click.option(
    "--processes", metavar="N|auto", default=None,
    help="Run N processes under one supervisor, sharing the port (default: "
         "AQSH_WORKER_PROCESSES, else 1; auto = the cores this process may use).")


def run_service(mode: str | None, processes: str | None = None) -> int:
    from aqsh.settings import load_settings

    if processes is not None:
        os.environ["AQSH_WORKER_PROCESSES"] = processes  # parsed and checked as the setting
    try:
        settings = load_settings(None, **({"mode": mode} if mode else {}))
        if settings.worker_processes > 1 and settings.redis_addr == "embedded":
            raise ConfigError("AQSH_REDIS_ADDR=embedded runs in one process: set "
                              "AQSH_WORKER_PROCESSES=1 or use an external Redis")
    except ConfigError as exc:
        return _fail(exc.message, EXIT_BAD_CONFIG)
    # Imported only now: the client and admin commands need none of the service's modules.
    from aqsh.logging import configure_logging
    from aqsh.service import StartupError, harden_process, make_non_dumpable, serve

    if settings.worker_processes > 1:
        from aqsh.supervisor import run_supervisor

        # N children under a supervisor (aqsh/supervisor.py). It keeps the environment (the
        # children read their settings from it), so it is made non-dumpable: a script of the
        # same uid cannot read its environ.
        configure_logging(settings.log_format, settings.log_level)
        make_non_dumpable()
        return run_supervisor(settings.worker_processes, settings.mode)
    harden_process(settings)  # before anything else runs: secrets out of reach of scripts

    embedded = None
    if settings.redis_addr == "embedded":
        from aqsh.embedded import start_embedded_redis
        from aqsh.redis_process import RedisBinaryNotFound

        try:
            embedded = start_embedded_redis(settings.data_dir)
        except (RedisBinaryNotFound, RuntimeError, OSError) as exc:
            return _fail(f"cannot start the embedded Redis: {exc}", EXIT_START_FAILED)
        configure_logging(settings.log_format, settings.log_level)
        import structlog

        structlog.get_logger("aqsh").info("redis.embedded", url=embedded.url,
                                          data_dir=embedded.data_dir)
        settings = msgspec.structs.replace(settings, redis_addr=embedded.url)
    loop_factory = None
    if settings.uses_uvloop:
        import uvloop  # only where it runs: a worker process need not load it

        loop_factory = uvloop.new_event_loop
    try:
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
            loop_factory=loop_factory
        ) as runner:
            return runner.run(serve(settings))
        return 130
    except StartupError as exc:
        return _fail(str(exc), EXIT_START_FAILED)
    finally:
        if embedded is not None:
            embedded.stop_keep_data()


@click.command(epilog="""\b
Examples:
  AQSH_REDIS_ADDR=redis:6379 aqsh serve             # API and worker in one process
  aqsh serve --mode api                              # same as: aqsh api
  AQSH_REDIS_ADDR=embedded aqsh serve                # a private Redis, for trying aqsh out
""")
@click.option("--mode", type=click.Choice(["api", "worker", "both"]),
              help="What to run (default: AQSH_MODE, else both).")
@_processes_option
def serve(mode: str | None, processes: str | None) -> int:
    """Run the service: the HTTP API, the worker, or both. Settings come from AQSH_*."""
    return run_service(mode, processes)


@click.command(epilog="\b\nExamples:\n  python -m aqsh worker               # a Deployment's args"
               "\n  aqsh worker --processes auto        # one worker process per core, on a VM")
@_processes_option
def worker(processes: str | None) -> int:
    """Run a worker: runs the scripts of tasks.yaml, serves /health and /metrics."""
    return run_service("worker", processes)


@click.command(epilog="\b\nExamples:\n  python -m aqsh api                  # a Deployment's args"
               "\n  aqsh api --processes 4              # four processes on one port")
@_processes_option
def api(processes: str | None) -> int:
    """Run the HTTP API only (no scripts run in this process)."""
    return run_service("api", processes)


@click.command("check-config", epilog="\b\nExample:\n  aqsh check-config tasks.yaml "
               "--tasks-dir scripts/")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tasks-dir", default=None,
              help="Base for relative script paths (default: AQSH_TASKS_DIR or the file's "
                   "directory).")
def check_config(file: str, tasks_dir: str | None) -> int:
    """Validate a tasks.yaml; exit 1 on errors, naming file and line."""
    from aqsh.service import check_config as check

    base = tasks_dir or os.environ.get("AQSH_TASKS_DIR") or os.path.dirname(
        os.path.abspath(file))
    return check(file, base)


COMMANDS = [serve, worker, api, check_config]
