"""Live log streams: script output lines → the Redis Stream ``logs:{task_id}``.

Entries: ``{start: 1, retry: <n>}`` when an attempt begins, then ``{stream: stdout|stderr,
line: <text>}`` per line, and ``{eof: 1, exit_code: <n>}`` when it ends (``exit_code`` is the
script's code, or ``-<signal>`` when a signal ended it). Entry ids are Redis stream ids, whose
first part is the time in ms: the start and eof markers date the attempt.

Batching: lines go into an in-memory buffer; one flusher sends everything buffered in one script
call (``append_log_lines.lua``), so while a call is in flight the next batch builds up and a fast
script costs a few calls per second, not one per line. The first batch of an attempt lingers for
``linger_s`` (5 ms) before it goes: most short scripts have exited by then, so their start
marker, output and eof marker travel in a single call instead of three (a script call costs the
worker more CPU than a whole short script's output). A longer script's first lines, and the
start marker of one that prints nothing, reach the stream at most ``linger_s`` late.

Back-pressure: when the buffer holds ``max_buffered`` lines (Redis slow or away), the pipe
readers stop reading until there is room, the kernel pipe fills and the script blocks on write.
Lines are delayed, never dropped (the buffer may overshoot by one read chunk). If Redis is away
for longer than ``give_up_s`` the writer drops the buffer and records how many lines it lost in
a final marker line, so a dead Redis cannot hang a task forever.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from aqsh.engine.connection import RedisClient
from aqsh.engine.fastlane import FastLane
from aqsh.engine.keys import log_key
from aqsh.engine.rdb import REDIS_DOWN
from aqsh.engine.scripts import Scripts, script_sha

log = structlog.get_logger("aqsh.runner")

DEFAULT_MAX_LINE_BYTES = 16 * 1024
DEFAULT_MAX_STREAM_LEN = 100_000
DEFAULT_BATCH_LINES = 2000
DEFAULT_LINGER_S = 0.005


class LogWriter:
    def __init__(
        self,
        redis: RedisClient,
        task_id: str,
        *,
        retention_s: float,
        max_stream_len: int = DEFAULT_MAX_STREAM_LEN,
        max_buffered: int = 20_000,
        batch_lines: int = DEFAULT_BATCH_LINES,
        give_up_s: float = 60.0,
        linger_s: float = DEFAULT_LINGER_S,
        lane: FastLane | None = None,
    ) -> None:
        """``lane``: send batches over this fast lane instead of redis-py (see ShellRunner)."""
        self.redis = redis
        self.lane = lane
        self.key = log_key(task_id)
        self.retention_s = max(1, int(retention_s))
        self.max_stream_len = max_stream_len
        self.max_buffered = max_buffered
        self.batch_lines = batch_lines
        self.give_up_s = give_up_s
        self.linger_s = linger_s
        self.scripts = Scripts(redis)
        self.lines_written = 0
        self.lines_dropped = 0
        self._buffer: list[tuple[str, str]] = []
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._closing = False
        # No flusher task until the linger runs out (or a batch fills): a short script's single
        # batch is sent by ``close`` itself.
        self._flusher: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._task_id = task_id

    def mark_start(self, retry: int) -> None:
        """Starts the linger: the marker goes with the first batch, within ``linger_s``, so its
        stream id dates the attempt to within that (the API's ``started_at``)."""
        self._buffer.append(("start", str(retry)))
        self._arm()

    def put_lines(self, stream: str, lines: list[str]) -> None:
        """Always takes the lines (a reader's chunk at most); readers check ``full`` after."""
        self._buffer.extend([(stream, line) for line in lines])
        if self._flusher is not None:
            self._has_data.set()
        elif len(self._buffer) >= self.batch_lines:
            self._start_flusher()  # a full batch does not wait for the linger
        elif self._linger is None:
            self._arm()

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.max_buffered

    async def wait_for_room(self) -> None:
        while self.full:
            self._start_flusher()
            self._has_room.clear()
            await self._has_room.wait()

    def _arm(self) -> None:
        if self._flusher is None and self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.linger_s, self._start_flusher)

    def _start_flusher(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._flusher is None:
            self._flusher = asyncio.create_task(
                self._flush_loop(), name=f"aqsh-logs-{self._task_id}"
            )
        self._has_data.set()

    @property
    def closed(self) -> bool:
        return self._closing

    async def close(self, exit_code: int) -> None:
        """Flush everything, then write the eof marker."""
        self._buffer.append(("eof", str(exit_code)))
        self._closing = True
        if self._flusher is None:
            # Still lingering: everything left is one batch (usually start, output, eof),
            # sent from here without a task of its own.
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            await self._flush_loop()
            return
        self._has_data.set()
        await self._flusher

    async def abort(self) -> None:
        self._closing = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

    async def _flush_loop(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._has_data.clear()
                await self._has_data.wait()
                continue
            batch = self._buffer[: self.batch_lines]
            args: list[str | int] = [self.max_stream_len, self.retention_s]
            for stream, line in batch:
                args += [stream, line]
            if not await self._send(args):
                lost = [entry for entry in self._buffer if entry[0] != "eof"]
                self.lines_dropped += len(lost)
                log.error("logs.dropped", key=self.key, lines=len(lost))
                if self._closing:
                    return  # Redis has been away for give_up_s: nothing more can be done
                marker = f"[aqsh] {len(lost)} log lines lost: Redis unreachable"
                self._buffer = [("stderr", marker)]
                self._has_room.set()
                continue
            self.lines_written += sum(1 for stream, _ in batch if stream not in ("eof", "start"))
            del self._buffer[: len(batch)]
            self._has_room.set()

    async def _append(self, args: list[str | int]) -> None:
        if self.lane is None:
            await self.scripts.run("append_log_lines", [self.key], args)
            return
        command = ("EVALSHA", script_sha("append_log_lines"), 1, self.key, *args)
        reply = (await self.lane.execute_scripts([command], ["append_log_lines"]))[0]
        if isinstance(reply, Exception):
            raise reply

    async def _send(self, args: list[str | int]) -> bool:
        """Retry a batch while Redis is away, for up to ``give_up_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_s
        delay_s = 0.05
        while True:
            try:
                await self._append(args)
                return True
            except REDIS_DOWN as exc:
                if loop.time() > deadline:
                    return False
                log.warning("logs.write_retry", key=self.key, error=str(exc))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
