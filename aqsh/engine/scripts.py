"""Loads ``lua/*.lua`` once and runs them by EVALSHA, reloading on NOSCRIPT.

The scripts live in the top-level ``lua/`` folder of the source tree (editable installs) and are
shipped as ``aqsh/_lua`` inside the wheel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

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


class Scripts:
    """One registered script object per Lua file, bound to a client.

    redis-py's ``AsyncScript`` sends EVALSHA and falls back to SCRIPT LOAD on NOSCRIPT;
    pipelines preload the scripts they contain before executing.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, AsyncScript] = {}

    def get(self, name: str) -> AsyncScript:
        script = self._scripts.get(name)
        if script is None:
            script = self._client.register_script(script_source(name))
            self._scripts[name] = script
        return script

    async def run(
        self,
        name: str,
        keys: Sequence[KeyT],
        args: Sequence[ArgT],
        client: Any = None,
    ) -> Any:
        return await self.get(name)(keys=list(keys), args=list(args), client=client)
