"""The ``--@include`` splice of aqsh/engine/scripts.py: every script Redis gets is whole."""

from __future__ import annotations

import redis.asyncio as aioredis

from aqsh.engine.scripts import FLOW_VARIANT, lua_dir, script_sha, script_source

SCRIPTS = sorted(p.stem for p in lua_dir().glob("*.lua") if not p.stem.startswith("_")) + [
    f"{transition}{FLOW_VARIANT}" for transition in ("done", "mark_complete", "retry", "archive")]


async def test_every_script_is_spliced_and_accepted_by_redis(redis: aioredis.Redis) -> None:
    for name in SCRIPTS:
        source = script_source(name)
        assert not any(line.startswith("--@") for line in source.splitlines()), name
        assert await redis.script_load(source) == script_sha(name), name


def test_the_run_index_helper_is_spliced_where_it_is_called() -> None:
    callers = [name for name in SCRIPTS if FLOW_VARIANT not in name and "index_run(" in
               (lua_dir() / f"{name}.lua").read_text(encoding="utf-8")]
    assert set(callers) >= {"enqueue", "enqueue_unique", "schedule", "schedule_unique"}
    for name in callers:
        assert "local function index_run" in script_source(name), name
    # The batch scripts index a whole batch at once (lua/_enqueue_packed.lua).
    for name in ("enqueue_batch", "webhook_enqueue"):
        assert "local function enqueue_packed" in script_source(name), name
