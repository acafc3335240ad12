"""Loads ``lua/*.lua`` once and runs them by EVALSHA, reloading on NOSCRIPT.

The scripts live in the top-level ``lua/`` folder of the source tree (editable installs) and are
shipped as ``aqsh/_lua`` inside the wheel. EVALSHA goes through ``execute_command`` directly:
redis-py's ``Script.__call__`` costs several times more CPU per call, which matters on the
enqueue/dequeue/ack hot paths.

On a Redis Cluster the client routes each EVALSHA to the node owning its keys' slot (every
script's KEYS share one), and SCRIPT LOAD goes to every primary, so a NOSCRIPT from whichever
node owns the slot — a fresh node after a failover included — is healed by the same reload.

This module is the one place that builds an EVALSHA call (``evalsha``) and the one place that
heals a NOSCRIPT (``execute_reloading``), for redis-py and for the fast lane alike; it imports
nothing of the lane (the lane imports it), so the two stay free of a cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from redis.exceptions import NoScriptError, ResponseError

from aqsh.engine.connection import RedisClient

KeyT = str | bytes
ArgT = str | bytes | int | float
Command = tuple[Any, ...]
#: Sends commands in one round trip; replies in order, Redis error replies as exception objects.
Send = Callable[[Sequence[Command]], Awaitable[list[Any]]]
#: Loads script sources (SCRIPT LOAD), raising when Redis refuses.
Load = Callable[[Sequence[str]], Awaitable[None]]


def lua_dir() -> Path:
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir.parent / "lua", package_dir / "_lua"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"aqsh Lua scripts not found next to {package_dir}")


#: A script ``<transition>+flow`` is the finishing transition ``<transition>`` that also frees
#: the task's concurrency slot and promotes the next waiter, in the same call
#: (lua/_flow_release.lua).
FLOW_VARIANT = "+flow"
_INCLUDE = "--@include "
_TRANSITION = "--@transition\n"


def _read(name: str) -> str:
    """A script file with each ``--@include <part>`` line replaced by lua/_<part>.lua. Redis
    scripts cannot load one another, so what a family of scripts shares (the run index's
    insert and trim, the held-run functions) is written once and spliced (one level); files
    named ``_*.lua`` are such parts, never scripts. The spliced source is hashed and loaded."""
    lines = (lua_dir() / f"{name}.lua").read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(
        (lua_dir() / f"_{line[len(_INCLUDE):].strip()}.lua").read_text(encoding="utf-8")
        if line.startswith(_INCLUDE) else line
        for line in lines)


@cache
def script_source(name: str) -> str:
    if name.endswith(FLOW_VARIANT):
        # The transition runs as a function, so its early error returns skip the release.
        release = _read("_flow_release")
        body = _read(name[:-len(FLOW_VARIANT)])
        head, tail = release.split(_TRANSITION, 1)
        return f"{head}local function flow_transition()\n{body}\nend\n{tail}"
    return _read(name)


@cache
def script_sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode()).hexdigest()


def evalsha(name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Command:
    """The EVALSHA call of script ``name``, as both transports send it."""
    return ("EVALSHA", script_sha(name), len(keys), *keys, *args)


async def execute_reloading(
    send: Send, load: Load, commands: Sequence[Command], names: Sequence[str]
) -> list[Any]:
    """Send ``commands`` and return every reply; after a NOSCRIPT (a restarted or flushed
    Redis) load the scripts ``names`` and send again only the commands that failed with it.

    A command that failed with NOSCRIPT had no effect, so a restarted Redis costs one extra
    round trip and never runs a transition twice.
    """
    replies = await send(commands)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        await load([script_source(name) for name in names])
        again = await send([commands[i] for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


class ScriptLane(Protocol):
    """What ``Scripts`` needs of a fast lane (aqsh.engine.fastlane.FastLane)."""

    async def execute_many(self, commands: Sequence[Command]) -> list[Any]: ...

    async def load_scripts(self, sources: Sequence[str]) -> None: ...


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
        self.commands.append(evalsha(name, keys, args))

    def command(self, *args: Any) -> None:
        self.commands.append(args)


class Scripts:
    """Runs named Lua scripts on one client by SHA, loading them on first NOSCRIPT.

    With a ``lane`` (aqsh.engine.fastlane) script calls, and batches made only of script calls,
    go over that connection instead of redis-py: a fraction of redis-py's CPU per call, which
    is most of a worker's Redis cost per task (dequeue, acks, lease extension). Other commands
    stay on redis-py, whose reply parsing their callers expect.
    """

    def __init__(self, client: RedisClient, lane: ScriptLane | None = None) -> None:
        self._client = client
        self._lane = lane
        # How script calls travel, bound once: the hot path does not rebuild them per call.
        self._scripts_via: tuple[Send, Load] = (
            (lane.execute_many, lane.load_scripts) if lane is not None
            else (self._send, self._load_sources))

    async def run(self, name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Any:
        """The script's reply; an error reply raises (redis-py's exception classes on both
        transports)."""
        send, load = self._scripts_via
        reply = (await execute_reloading(send, load, [evalsha(name, keys, args)], [name]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def load(self, names: Sequence[str]) -> None:
        await self._load_sources([script_source(name) for name in names])

    async def _load_sources(self, sources: Sequence[str]) -> None:
        for source in sources:  # on a Cluster, to every primary
            await self._client.script_load(source)

    async def execute(self, batch: Batch, names: Sequence[str]) -> list[Any]:
        """Run a batch in one pipeline and return every reply (errors as exception objects),
        NOSCRIPT healed as ``execute_reloading`` says. On a Cluster the pipeline goes out as
        one pipeline per node, concurrently.
        """
        if self._lane is not None and all(c[0] == "EVALSHA" for c in batch.commands):
            send, load = self._scripts_via
        else:  # other commands expect redis-py's reply parsing
            send, load = self._send, self._load_sources
        return await execute_reloading(send, load, batch.commands, names)

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        if len(commands) == 1:
            # A lone command skips the pipeline (several times redis-py's CPU per call).
            try:
                return [await self._client.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
