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
Lines are delayed, never dropped (the buffer may overshoot by one read chunk).

Faults: whatever a batch write raises — a lost connection, or an error reply (``OOM``,
``MISCONF``, ``READONLY``, ``BUSY``, ``LOADING``, ``NOPERM``, ...) — is logged with its kind,
backed off with jitter and retried; the flusher itself is supervised (restarted if it ever ends
early), so the readers never wait for room that nobody will make. If a batch cannot be written
for ``give_up_s`` the writer drops the buffer and records how many lines it lost in a final
marker line, so a dead or refusing Redis cannot hang a task forever.

Exactly once: each batch carries this writer's id and its number, and the append script skips a
batch it has already applied, so a retry after a lost reply never duplicates lines. The script
also chooses the entry ids (``<ms>-<n>``, ``n`` counting the stream's entries), which lets a
follower count the lines the stream's cap trimmed before it read them (``aqsh.api.sse``), and
keeps the attempt's start, end and exit code in a hash beside the stream
(``keys.log_meta_key``), so they outlive trimmed markers.
"""

from __future__ import annotations

import asyncio
import secrets

import structlog
from redis.crc import key_slot

from aqsh.clock import raise_if_cancelling
from aqsh.engine.connection import RedisClient
from aqsh.engine.fastlane import FastLane
from aqsh.engine.faults import Backoff, classify, redis_error_code
from aqsh.engine.keys import log_key, log_meta_key
from aqsh.engine.scripts import Scripts, evalsha

log = structlog.get_logger("aqsh.runner")

DEFAULT_MAX_LINE_BYTES = 16 * 1024
DEFAULT_MAX_STREAM_LEN = 100_000
DEFAULT_BATCH_LINES = 2000
DEFAULT_LINGER_S = 0.005
#: The supervised loop's name in logs.
LOOP_NAME = "log_writer"
_FIRST_RETRY_S = 0.05
_LONGEST_RETRY_S = 2.0


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
        meta = log_meta_key(task_id)
        # Both keys go in one script call: on a Cluster they must share a slot. Only an id
        # with an unmatched "}" gives a meta key that cannot; then the stream goes alone (no
        # repeat detection, no kept times: the API falls back to the stream's markers).
        self._keys = [self.key, meta] if key_slot(meta.encode()) == key_slot(
            self.key.encode()) else [self.key]
        self.retention_s = max(1, int(retention_s))
        self.max_stream_len = max_stream_len
        self.max_buffered = max_buffered
        self.batch_lines = batch_lines
        self.give_up_s = give_up_s
        self.linger_s = linger_s
        self.scripts = Scripts(redis)
        self.lines_written = 0
        self.lines_dropped = 0
        #: Batch writes that failed and were retried (a test and tuning figure).
        self.write_retries = 0
        #: Batches the script had already applied when they were sent again (a lost reply).
        self.repeats_skipped = 0
        self._writer_id = secrets.token_hex(8)
        self._batch_number = 0
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
            self._ensure_flusher()
            self._has_data.set()
        elif len(self._buffer) >= self.batch_lines:
            self._start_flusher()  # a full batch does not wait for the linger
        elif self._linger is None:
            self._arm()

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.max_buffered

    async def wait_for_room(self) -> None:
        """Returns once there is room, or once nothing can make room any more (the writer was
        aborted). Waits on the flusher too, so a flusher that ended is restarted instead of
        being waited for forever."""
        while self.full and not self._closing:
            self._start_flusher()
            flusher = self._flusher
            assert flusher is not None
            self._has_room.clear()
            room = asyncio.ensure_future(self._has_room.wait())
            try:
                await asyncio.wait({room, flusher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                room.cancel()

    def _arm(self) -> None:
        if self._flusher is None and self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.linger_s, self._start_flusher)

    def _start_flusher(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._ensure_flusher()
        self._has_data.set()

    def _ensure_flusher(self) -> None:
        """Start the flusher, or start it again if it ended while there is work: it only ends
        by itself when closing, so an end before that is a fault to recover from."""
        if self._flusher is not None and self._flusher.done():
            if not self._flusher.cancelled() and self._flusher.exception() is not None:
                log.error("logs.flusher_failed", loop=LOOP_NAME, key=self.key,
                          error=repr(self._flusher.exception()))
            self._flusher = None
        if self._flusher is None:
            self._flusher = asyncio.create_task(
                self._flush_loop(), name=f"aqsh-logs-{self._task_id}"
            )

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
        while self._buffer:
            self._ensure_flusher()
            self._has_data.set()
            flusher = self._flusher
            assert flusher is not None
            await asyncio.wait({flusher})

    async def abort(self) -> None:
        self._closing = True
        self._has_room.set()  # readers waiting for room: there will be none
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait({self._flusher})

    async def _flush_loop(self) -> None:
        """Supervised: anything but cancellation is logged, backed off and resumed."""
        backoff = Backoff(_FIRST_RETRY_S, _LONGEST_RETRY_S)
        while True:
            try:
                await self._flush_until_done()
                return
            except Exception as exc:  # a bug or a reply of a shape never seen: keep going
                log.error("logs.flusher_failed", loop=LOOP_NAME, key=self.key,
                          kind=classify(exc).kind, error=repr(exc), exc_info=True)
                await asyncio.sleep(backoff.next_delay_s())

    async def _flush_until_done(self) -> None:
        while True:
            # A cancel that redis-py swallowed inside the last write would leave this task
            # running after abort() (or wait_for_room) cancelled it: seen as a soak hang.
            raise_if_cancelling()
            if not self._buffer:
                if self._closing:
                    return
                self._has_data.clear()
                await self._has_data.wait()
                continue
            batch = self._buffer[: self.batch_lines]
            self._batch_number += 1
            args: list[str | int] = [self.max_stream_len, self.retention_s, self._writer_id,
                                     self._batch_number]
            for stream, line in batch:
                args += [stream, line]
            failure = await self._send(args)
            if failure is not None:
                lost = [entry for entry in self._buffer if entry[0] != "eof"]
                self.lines_dropped += len(lost)
                log.error("logs.dropped", loop=LOOP_NAME, key=self.key, lines=len(lost),
                          reason=failure)
                if self._closing:
                    self._buffer.clear()
                    return  # nothing more can be done for this attempt's log
                marker = f"[aqsh] {len(lost)} log lines lost: {failure}"
                self._buffer = [("stderr", marker)]
                self._has_room.set()
                continue
            self.lines_written += sum(1 for stream, _ in batch if stream not in ("eof", "start"))
            del self._buffer[: len(batch)]
            self._has_room.set()

    async def _append(self, args: list[str | int]) -> None:
        if self.lane is None:
            reply = await self.scripts.run("append_log_lines", self._keys, args)
        else:
            command = evalsha("append_log_lines", self._keys, args)
            reply = (await self.lane.execute_scripts([command], ["append_log_lines"]))[0]
            if isinstance(reply, Exception):
                raise reply
        if isinstance(reply, list) and len(reply) == 2 and reply[1] == 0:
            self.repeats_skipped += 1
            log.info("logs.repeat_skipped", loop=LOOP_NAME, key=self.key)

    async def _send(self, args: list[str | int]) -> str | None:
        """Write one batch, retrying whatever fails for up to ``give_up_s``; returns None once
        written, else why it could not be (for the lost-lines marker)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_s
        backoff = Backoff(_FIRST_RETRY_S, _LONGEST_RETRY_S)
        while True:
            try:
                await self._append(args)
                return None
            except Exception as exc:  # every failure is retried: a dead writer hangs the task
                fault = classify(exc)
                if loop.time() > deadline:
                    if fault.kind in ("connection", "timeout"):
                        return "Redis unreachable"
                    code = redis_error_code(exc)
                    return f"Redis refused the writes ({code or str(exc)[:120]})"
                self.write_retries += 1
                # Operator faults (NOPERM, WRONGTYPE) are retried too, but loudly.
                report = log.warning if fault.transient else log.error
                report("logs.write_retry", loop=LOOP_NAME, key=self.key, kind=fault.kind,
                       error=str(exc) or type(exc).__name__)
                raise_if_cancelling()
                await asyncio.sleep(backoff.next_delay_s())
