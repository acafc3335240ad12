"""Drive the Go binary and an aqsh handler that behaves like its Go twin.

Task types choose the behaviour on both sides: ``ok*`` succeed, ``fail*`` raise, ``skip*``
skip retries, ``result*`` write a result, ``sleep:<ms>`` sleep first, ``slowfirst:<ms>`` sleep
on the first attempt only. Each handler appends a
JSON record of what it saw to the Redis list ``interop:seen``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from aqsh.engine.task import SkipRetry, Task, TaskContext

ROOT = Path(__file__).resolve().parents[2]
SEEN = "interop:seen"


def go_binary(name: str = "aqsh-interop") -> str:
    candidate = ROOT / ".venv" / "bin" / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not built: run `make interop`")
    return found


def go(command: str, redis_url: str, *flags: str, stdin: Any = None, timeout_s: float = 120,
       binary: str = "aqsh-interop") -> Any:
    """Run one aqsh-interop subcommand and parse its JSON output."""
    proc = subprocess.run(
        [go_binary(binary), command, "-redis", redis_url, *flags],
        input=json.dumps(stdin) if stdin is not None else None,
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"aqsh-interop {command} failed: {proc.stderr}")
    return json.loads(proc.stdout)


def go_background(command: str, redis_url: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [go_binary(), command, "-redis", redis_url, *flags],
        stdout=subprocess.DEVNULL, text=True,
    )


class InteropHandler:
    """The aqsh side of the twin handlers."""

    def __init__(self, redis: aioredis.Redis, server_name: str = "aqsh") -> None:
        self.redis = redis
        self.server_name = server_name
        self.started: dict[str, asyncio.Event] = {}

    async def __call__(self, task: Task, ctx: TaskContext) -> bytes | None:
        self.started.setdefault(task.id, asyncio.Event()).set()
        if task.type.startswith("sleep:") or (task.type.startswith("slowfirst:")
                                              and task.retried == 0):
            await asyncio.sleep(int(task.type.split(":", 1)[1]) / 1000)
        record = {"id": task.id, "type": task.type, "payload": task.payload.decode(),
                  "headers": task.headers, "retried": task.retried, "server": self.server_name,
                  "pid": os.getpid()}
        await self.redis.rpush(SEEN, json.dumps(record))
        if task.type.startswith("fail"):
            raise RuntimeError("aqsh handler failed")
        if task.type.startswith("skip"):
            raise SkipRetry("skip")
        if task.type.startswith("result"):
            return b"aqsh-result:" + task.payload
        return None


async def seen(redis: aioredis.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in await redis.lrange(SEEN, 0, -1)]
