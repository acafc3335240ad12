"""Loads ``lua/*.lua`` once and runs them by EVALSHA, reloading on NOSCRIPT.

The scripts live in the top-level ``lua/`` folder of the source tree (editable installs) and are
shipped as ``aqsh/_lua`` inside the wheel. EVALSHA goes through ``execute_command`` directly:
redis-py's ``Script.__call__`` costs several times more CPU per call, which matters on the
enqueue/dequeue/ack hot paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

KeyT = str | bytes
ArgT = str | bytes | int | float


def lua_dir() -> Path:
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir.parent / "lua", package_dir / "_lua"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"aqsh Lua scripts not found next to {package_dir}")


@cache
def script_source(name: str) -> str:
    return (lua_dir() / f"{name}.lua").read_text(encoding="utf-8")


@cache
def script_sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode()).hexdigest()


class Scripts:
    """Runs named Lua scripts on one client by SHA, loading them on first NOSCRIPT."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def run(self, name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Any:
        sha = script_sha(name)
        try:
            return await self._client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", sha, len(keys), *keys, *args
            )
        except NoScriptError:
            await self._client.script_load(script_source(name))
            return await self._client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", sha, len(keys), *keys, *args
            )

    @staticmethod
    def queue(pipe: Pipeline, name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> None:
        """Add an EVALSHA to a pipeline; call ``execute_pipeline`` to run it."""
        pipe.execute_command("EVALSHA", script_sha(name), len(keys), *keys, *args)

    async def load(self, names: Sequence[str]) -> None:
        for name in names:
            await self._client.script_load(script_source(name))

    async def execute_pipeline(self, pipe: Pipeline, names: Sequence[str]) -> list[Any]:
        """Run a pipeline of EVALSHAs and return every reply (errors as exception objects).

        A command that failed with NOSCRIPT had no effect, so after loading the scripts only
        those commands are sent again: a restarted or flushed Redis costs one extra round trip
        and never runs a transition twice.
        """
        commands = list(pipe.command_stack)
        replies = list(await pipe.execute(raise_on_error=False))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.load(names)
            again = self._client.pipeline(transaction=False)
            for i in missing:
                args, options = commands[i]
                again.execute_command(*args, **options)
            for i, reply in zip(missing, await again.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies
