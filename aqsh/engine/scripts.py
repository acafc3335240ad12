"""Loads ``lua/*.lua`` once and runs them by EVALSHA, reloading on NOSCRIPT.

The scripts live in the top-level ``lua/`` folder of the source tree (editable installs) and are
shipped as ``aqsh/_lua`` inside the wheel. EVALSHA goes through ``execute_command`` directly:
redis-py's ``Script.__call__`` costs several times more CPU per call, which matters on the
enqueue/dequeue/ack hot paths.

On a Redis Cluster the client routes each EVALSHA to the node owning its keys' slot (every
script's KEYS share one), and SCRIPT LOAD goes to every primary, so a NOSCRIPT from whichever
node owns the slot — a fresh node after a failover included — is healed by the same reload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from aqsh.engine.connection import RedisClient

if TYPE_CHECKING:  # fastlane imports this module for script sources
    from aqsh.engine.fastlane import FastLane

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


class Batch:
    """Commands for one pipelined round trip, kept as plain argument tuples.

    Not a redis-py pipeline: after a NOSCRIPT exactly the failed commands must be sent again,
    and a Cluster pipeline neither exposes its commands nor keeps them once executed; the fast
    lane takes the same tuples as they are. Each command is one command on the wire: never
    give one command keys of two slots (a Cluster client refuses it).
    """

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self.commands)

    def script(self, name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> None:
        self.commands.append(("EVALSHA", script_sha(name), len(keys), *keys, *args))

    def command(self, *args: Any) -> None:
        self.commands.append(args)


class Scripts:
    """Runs named Lua scripts on one client by SHA, loading them on first NOSCRIPT.

    With a ``lane`` (aqsh.engine.fastlane) script calls, and batches made only of script calls,
    go over that connection instead of redis-py: a fraction of redis-py's CPU per call, which
    is most of a worker's Redis cost per task (dequeue, acks, lease extension). Other commands
    stay on redis-py, whose reply parsing their callers expect.
    """

    def __init__(self, client: RedisClient, lane: FastLane | None = None) -> None:
        self._client = client
        self._lane = lane

    async def run(self, name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Any:
        sha = script_sha(name)
        if self._lane is not None:
            reply = (await self._lane.execute_scripts(
                [("EVALSHA", sha, len(keys), *keys, *args)], [name]))[0]
            if isinstance(reply, Exception):
                raise reply
            return reply
        try:
            return await self._client.execute_command(
                "EVALSHA", sha, len(keys), *keys, *args
            )
        except NoScriptError:
            await self._client.script_load(script_source(name))
            return await self._client.execute_command(
                "EVALSHA", sha, len(keys), *keys, *args
            )

    async def load(self, names: Sequence[str]) -> None:
        for name in names:
            await self._client.script_load(script_source(name))

    async def execute(self, batch: Batch, names: Sequence[str]) -> list[Any]:
        """Run a batch in one pipeline and return every reply (errors as exception objects).

        A command that failed with NOSCRIPT had no effect, so after loading the scripts only
        those commands are sent again: a restarted or flushed Redis costs one extra round trip
        and never runs a transition twice. On a Cluster the pipeline goes out as one pipeline
        per node, concurrently.
        """
        if self._lane is not None and all(c[0] == "EVALSHA" for c in batch.commands):
            return await self._lane.execute_scripts(batch.commands, names)
        replies = await self._send(batch.commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.load(names)
            again = await self._send([batch.commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
