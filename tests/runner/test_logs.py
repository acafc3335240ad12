"""The log writer and its append script against a real Redis: each batch applied once, ids that
count entries across attempts, the start/end/exit code kept beside the stream, a flusher that
comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from aqsh.engine.keys import log_meta_key
from aqsh.engine.scripts import ArgT, KeyT, Scripts
from aqsh.runner.logs import LogWriter, log_key
from tests.support import wait_until


async def _ids(redis: aioredis.Redis, task_id: str) -> list[tuple[int, int]]:
    out = []
    for raw_id, _ in await redis.xrange(log_key(task_id)):
        ms, seq = raw_id.decode().split("-")
        out.append((int(ms), int(seq)))
    return out


async def test_a_repeated_batch_is_skipped_by_the_script(redis: aioredis.Redis) -> None:
    """What a retry after a lost reply sends: the same writer id and batch number."""
    scripts = Scripts(redis)
    keys = [log_key("t"), log_meta_key("t")]
    args = [1000, 60, "writer-1", 1, "stdout", "a", "stdout", "b"]
    first = await scripts.run("append_log_lines", keys, args)
    again = await scripts.run("append_log_lines", keys, args)
    assert first[1] == 1
    assert again == [first[0], 0]  # nothing written, the stream's last id answered
    nxt = await scripts.run("append_log_lines", keys, [1000, 60, "writer-1", 2, "stdout", "c"])
    assert nxt[1] == 1
    other = await scripts.run("append_log_lines", keys, [1000, 60, "writer-2", 1, "stdout", "d"])
    assert other[1] == 1  # another attempt's writer has numbers of its own
    lines = [f[b"line"] for _, f in await redis.xrange(log_key("t"))]
    assert lines == [b"a", b"b", b"c", b"d"]
    assert 0 < await redis.ttl(log_meta_key("t")) <= 60


async def test_ids_count_entries_across_attempts_and_times_are_kept(
    redis: aioredis.Redis,
) -> None:
    first = LogWriter(redis, "t", retention_s=60)
    first.mark_start(0)
    first.put_lines("stdout", ["a", "b"])
    await first.close(1)
    meta = await redis.hgetall(log_meta_key("t"))
    assert meta[b"exit_code"] == b"1"
    started_ms = int(meta[b"started_ms"])
    second = LogWriter(redis, "t", retention_s=60)
    second.mark_start(1)
    await wait_until(lambda: _has_entries(redis, 5), message="second start written")
    meta = await redis.hgetall(log_meta_key("t"))
    assert b"finished_ms" not in meta  # the task is running again: no end yet
    assert int(meta[b"started_ms"]) == started_ms  # the first attempt's start stays
    second.put_lines("stdout", ["c"])
    await second.close(0)
    ids = await _ids(redis, "t")
    assert [seq for _, seq in ids] == list(range(1, 8))
    assert ids == sorted(ids)
    meta = await redis.hgetall(log_meta_key("t"))
    assert meta[b"exit_code"] == b"0"
    assert int(meta[b"finished_ms"]) == ids[-1][0]


async def _has_entries(redis: aioredis.Redis, count: int) -> bool:
    return bool(await redis.xlen(log_key("t")) >= count)


@pytest.mark.parametrize("task_id", ["3f2b-uuid-like", "a{b}c", "{tagged}", "a{b"])
def test_the_meta_key_shares_the_streams_slot(task_id: str) -> None:
    assert key_slot(log_meta_key(task_id).encode()) == key_slot(log_key(task_id).encode())


@pytest.mark.parametrize("task_id", ["odd}id", "x{}y{z}"])
async def test_an_id_whose_keys_cannot_share_a_slot_writes_the_stream_alone(
    redis: aioredis.Redis, task_id: str,
) -> None:
    writer = LogWriter(redis, task_id, retention_s=60)
    assert writer._keys == [log_key(task_id)]
    writer.mark_start(0)
    writer.put_lines("stdout", ["a"])
    await writer.close(0)
    lines = [f.get(b"line") for _, f in await redis.xrange(log_key(task_id))]
    assert lines == [None, b"a", None]


class SwallowingScripts(Scripts):
    """Real Redis, with a flaw seen under load in redis-py 8: a cancel that lands during a
    command is swallowed and the command returns normally. The first call holds until the test
    cancels it, so the cancel lands exactly there."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.holding = asyncio.Event()
        self.swallowed = 0

    async def run(self, name: str, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Any:
        if self.swallowed == 0:
            self.holding.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.swallowed += 1  # and carry on, as if nothing had happened
        return await super().run(name, keys, args)


async def test_a_flusher_whose_cancel_was_swallowed_still_ends(redis: aioredis.Redis) -> None:
    """Seen in the soak: the cancelled flusher went on waiting for lines, and what awaited its
    end (abort, this test's predecessor) hung for ever."""
    writer = LogWriter(redis, "t", retention_s=60, batch_lines=5, linger_s=0)
    scripts = writer.scripts = SwallowingScripts(redis)
    writer.put_lines("stdout", ["first"])
    await asyncio.wait_for(scripts.holding.wait(), 10)
    flusher = writer._flusher
    assert flusher is not None
    flusher.cancel()
    await asyncio.wait({flusher}, timeout=10)
    assert scripts.swallowed == 1
    assert flusher.done()
    assert flusher.cancelled()
    lines = [f[b"line"] for _, f in await redis.xrange(log_key("t")) if b"line" in f]
    assert lines == [b"first"]  # the write that was under way when the cancel came stands
    await asyncio.wait_for(writer.abort(), 10)


async def test_a_flusher_that_ended_is_started_again(redis: aioredis.Redis) -> None:
    """Whatever ends the flusher early, the readers waiting for room must not wait forever."""
    writer = LogWriter(redis, "t", retention_s=60, max_buffered=10, batch_lines=5, linger_s=0)
    writer.put_lines("stdout", ["first"])
    await wait_until(lambda: writer._flusher is not None, message="flusher started")
    assert writer._flusher is not None
    writer._flusher.cancel()
    await asyncio.wait({writer._flusher}, timeout=30)
    assert writer._flusher.done()
    writer.put_lines("stdout", [f"n {i}" for i in range(20)])
    assert writer.full
    await asyncio.wait_for(writer.wait_for_room(), 30)
    await asyncio.wait_for(writer.close(0), 30)
    lines = [f[b"line"] for _, f in await redis.xrange(log_key("t")) if b"line" in f]
    assert lines == [b"first"] + [f"n {i}".encode() for i in range(20)]
