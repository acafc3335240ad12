"""The shell-task engine handler: validate again, run the script, stream its logs, store its result.

Outcomes, as the engine sees them:
- exit 0 → success; the result JSON is returned (the processor stores it with the ack);
- exit ≠ 0 or killed by a signal → ScriptFailed → retried after the task's fixed retry_delay
  until max_retry, then archived (``shell_retry_delay`` gives the engine that delay);
- payload that fails validation → SkipRetry: archived, never run;
- a task type that is not in tasks.yaml → HandlerNotFound, retried with asynq's back-off, exactly
  as a Go server without the handler answers: another server on the queue (a Go service) may
  have it. ``unknown_tasks="archive"`` archives it at once instead (SkipRetry);
- cancelled through ``asynq:cancel`` (API DELETE, Inspector CancelProcessing) → the group is
  stopped and the task ends for good (SkipRetry "canceled"): a human asked for it to stop;
- timeout (the task's own or the engine deadline) → group stopped, ScriptFailed → retry rules;
- shutdown or lost lease → group stopped, CancelledError propagates (the engine requeues or
  leaves the task to its new owner).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import msgspec
import structlog

from aqsh.engine.connection import RedisClient
from aqsh.engine.fastlane import FastLane
from aqsh.engine.processor import default_retry_delay
from aqsh.engine.task import CancelReason, SkipRetry, Task, TaskContext, TaskError
from aqsh.runner.batches import HEADER_BATCH_GROUP, batch_inputs
from aqsh.runner.logs import DEFAULT_LINGER_S, LogWriter
from aqsh.runner.process import ExitRecord, ProcessExit, run_process
from aqsh.runner.result import ScriptResult, encode_result, read_result_file_async
from aqsh.runner.spec import TasksConfig, TaskSpec
from aqsh.runner.validate import DEFAULT_MAX_STRING_LEN, InvalidInput, to_env, validate_input
from aqsh.runner.workdirs import WorkDirs

log = structlog.get_logger("aqsh.runner")

DEFAULT_ENV_ALLOWLIST = ("PATH", "LANG", "HOME", "TZ")
CANCELED_ERROR = "canceled"
RESULT_NAME = ".aqsh-result"
#: A batch's inputs, one JSON object a line, in the work directory ($AQSH_BATCH_FILE).
BATCH_NAME = ".aqsh-batch.jsonl"


class ScriptFailed(TaskError):
    """The script exited non-zero or was killed; retried by the task's rules."""


class HandlerNotFound(TaskError):
    """No script for this task type; retried by asynq's default rules, like Go's NotFound."""


def go_quote(text: str) -> str:
    """``text`` as Go's ``%q`` prints it, so the error of an unknown type reads exactly as a Go
    server's (``handler not found for task "x"``), whatever the type contains."""
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
             "\t": "\\t", "\v": "\\v", "\\": "\\\\", '"': '\\"'}
    out = []
    for char in text:
        code = ord(char)
        if char in named:
            out.append(named[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif char != " " and unicodedata.category(char)[0] in "CZ":
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


class RunnerSettings(msgspec.Struct, frozen=True, kw_only=True):
    #: Must be private to the worker (see aqsh.runner.workdirs.check_work_root), so never the
    #: shared temporary directory itself.
    work_root: str = os.path.join(tempfile.gettempdir(), f"aqsh-{os.geteuid()}")
    keep_work_dirs: bool = False
    env_allowlist: tuple[str, ...] = DEFAULT_ENV_ALLOWLIST
    #: Values for allowlisted variables; defaults to the worker's own values for those names.
    base_env: Mapping[str, str] | None = None
    kill_grace_s: float = 10.0
    max_string_len: int = DEFAULT_MAX_STRING_LEN
    max_line_bytes: int = 16 * 1024
    max_stream_len: int = 100_000
    #: How long the first log batch of an attempt waits for more lines (see LogWriter).
    log_linger_s: float = DEFAULT_LINGER_S
    #: A type not in tasks.yaml: "retry" (as asynq does) or "archive" at once.
    unknown_tasks: Literal["retry", "archive"] = "retry"


class ShellRunner:
    """Engine handler for every task declared in tasks.yaml. ``config`` is read on each task,
    so a reloaded tasks.yaml takes effect for the next task without a restart."""

    def __init__(
        self,
        config: Callable[[], TasksConfig],
        redis: RedisClient,
        settings: RunnerSettings | None = None,
        on_finished: Callable[[str, str, float], None] | None = None,
        *,
        fast_lane: bool = False,
    ) -> None:
        """``fast_lane=True``: log batches go over one multiplexed connection of the runner's
        own (``aqsh.engine.fastlane``; plain TCP Redis only, otherwise redis-py is used), which
        costs the worker ~60 µs less CPU per batch than redis-py — for a short script, a tenth of
        its whole run. It never spins: the worker's CPU belongs to the scripts. Call ``aclose``
        when done."""
        self.config = config
        self.redis = redis
        self.settings = settings or RunnerSettings()
        #: (task name, outcome, duration_s) after every run: succeeded, failed, timeout, canceled.
        self.on_finished = on_finished
        source = self.settings.base_env if self.settings.base_env is not None else os.environ
        self.base_env = {k: source[k] for k in self.settings.env_allowlist if k in source}
        self._lane = FastLane.from_redis(redis, spin_us=0) if fast_lane else None
        self.work_dirs = WorkDirs(self.settings.work_root, keep=self.settings.keep_work_dirs)

    async def aclose(self) -> None:
        """Closes the fast lane, if any, and removes the spare work directories; the redis
        client stays the caller's to close."""
        self.work_dirs.close()
        if self._lane is not None:
            await self._lane.aclose()

    def spec_for(self, task_type: str) -> TaskSpec | None:
        return self.config().tasks.get(task_type)

    async def __call__(self, task: Task, ctx: TaskContext) -> bytes | None:
        spec = self.spec_for(task.type)
        if spec is None:
            if self.settings.unknown_tasks == "retry":
                # No result is written: the task may belong to another server on the queue, and
                # its result is that server's to write.
                raise HandlerNotFound(f"handler not found for task {go_quote(task.type)}")
            await self._fail_without_running(ctx, f"unknown task type {task.type!r}")
            raise SkipRetry(f"no script is configured for task {task.type!r}")
        if spec.aggregate is not None:
            return await self._run_batch(spec, task, ctx)
        try:
            payload = msgspec.json.decode(task.payload) if task.payload else {}
            values = validate_input(spec, payload, max_string_len=self.settings.max_string_len)
        except (msgspec.DecodeError, InvalidInput) as exc:
            message = f"invalid payload: {exc}"
            await self._fail_without_running(ctx, message)
            raise SkipRetry(message) from None
        return await self._run(spec, task, ctx, to_env(spec, values))

    async def _run_batch(self, spec: TaskSpec, task: Task, ctx: TaskContext) -> bytes:
        """A task that aggregates runs once for its batch, its inputs in $AQSH_BATCH_FILE;
        one invalid run (from a foreign enqueuer: aqsh checked its own at submit) fails the
        whole batch before the script starts."""
        lines = bytearray()
        problem: str | None = None
        runs: list[object] = []
        try:
            runs = batch_inputs(task)
        except msgspec.DecodeError as exc:
            problem = f"invalid payload: {exc}"
        for number, raw in enumerate(runs, start=1):
            try:
                values = validate_input(spec, raw, max_string_len=self.settings.max_string_len)
            except InvalidInput as exc:
                problem = f"invalid payload: run {number} of {len(runs)}: {exc}"
                break
            lines += msgspec.json.encode(values) + b"\n"
        if problem is not None:
            await self._fail_without_running(ctx, problem)
            raise SkipRetry(problem)
        return await self._run(spec, task, ctx, {}, batch=(bytes(lines), len(runs)))

    async def _fail_without_running(self, ctx: TaskContext, error: str) -> None:
        await ctx.result_writer.write(encode_result(ScriptResult(exit_code=-1, error=error)))

    def environment(self, spec: TaskSpec, task: Task, inputs: Mapping[str, str],
                    work_dir: str, result_file: str) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(inputs)
        env.update({
            "AQSH_TASK_ID": task.id,
            "AQSH_TASK_NAME": spec.name,
            "AQSH_QUEUE": task.queue,
            "AQSH_RETRY": str(task.retried),
            "AQSH_RESULT_FILE": result_file,
            "AQSH_WORK_DIR": work_dir,
        })
        return env

    async def _run(self, spec: TaskSpec, task: Task, ctx: TaskContext,
                   inputs: Mapping[str, str], batch: tuple[bytes, int] | None = None) -> bytes:
        work_dir = self.work_dirs.create(task.id)
        result_file = os.path.join(work_dir, RESULT_NAME)
        env = self.environment(spec, task, inputs, work_dir, result_file)
        if batch is not None:
            batch_file = os.path.join(work_dir, BATCH_NAME)
            await asyncio.to_thread(_write_new_file, batch_file, batch[0])
            env.update({"AQSH_BATCH_FILE": batch_file, "AQSH_BATCH_SIZE": str(batch[1]),
                        "AQSH_BATCH_GROUP": task.headers.get(HEADER_BATCH_GROUP, "")})
        logs = LogWriter(self.redis, task.id, retention_s=spec.log_retention_s,
                         max_stream_len=self.settings.max_stream_len, lane=self._lane,
                         linger_s=self.settings.log_linger_s)
        logs.mark_start(task.retried)
        bound = log.bind(task_id=task.id, name=spec.name, queue=task.queue)
        bound.info("task.started", retry=task.retried)
        loop = asyncio.get_running_loop()
        started = loop.time()
        started_wall_s = time.time()
        timed_out = False
        #: The engine's deadline (the task message's own timeout or deadline, e.g. Go's
        #: asynq.Timeout) fired rather than tasks.yaml's timeout.
        enqueuer_deadline = False
        record = ExitRecord()
        # Held while the script runs: the result is read through it, whatever the script does
        # to the path of its directory.
        work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        #: The last log batch (for a short script, its whole log: start, output, eof) in
        #: flight while the result is read, the directory recycled and the end logged; the
        #: handler still returns only once it is written.
        closing: asyncio.Task[None] | None = None
        try:
            try:
                async with asyncio.timeout(spec.timeout_s):
                    outcome = await run_process(
                        [spec.script], env=env, cwd=work_dir, sink=logs,
                        kill_grace_s=self.settings.kill_grace_s,
                        max_line_bytes=self.settings.max_line_bytes, record=record,
                    )
            except TimeoutError:
                timed_out = True
                outcome = record.exit or _STOPPED
            except asyncio.CancelledError:
                # run_process has already stopped the process group and noted how it ended.
                outcome = record.exit or _STOPPED
                await logs.close(outcome.exit_code)
                if ctx.cancel_reason is CancelReason.CANCELED:
                    await self._store(ctx, ScriptResult(exit_code=outcome.exit_code,
                                                        error=CANCELED_ERROR))
                    bound.info("task.canceled", exit_code=outcome.exit_code)
                    self._report(spec.name, "canceled", loop.time() - started)
                    raise SkipRetry(CANCELED_ERROR) from None
                if ctx.cancel_reason is not CancelReason.DEADLINE:
                    raise  # shutdown or lost lease: the engine decides what happens next
                timed_out = True
                # aqsh's own submissions carry tasks.yaml's timeout, so the two fire together;
                # a deadline well before it was set by whoever enqueued the task.
                enqueuer_deadline = (ctx.deadline_s
                                     < started_wall_s + spec.timeout_s - _DEADLINE_SLACK_S)
            if not logs.closed:
                closing = asyncio.create_task(logs.close(outcome.exit_code))
                await asyncio.sleep(0)  # let it send the batch before the work it overlaps
            data, file_error = await read_result_file_async(RESULT_NAME, dir_fd=work_fd)
        except BaseException:
            if closing is not None:
                await closing  # whatever ended the run here, its log is written first
            raise
        finally:
            try:
                if not logs.closed:
                    await logs.abort()
                await self.work_dirs.release(work_dir, result_file, dir_fd=work_fd)
            finally:
                os.close(work_fd)
        duration_s = loop.time() - started
        error = _error_text(outcome, file_error, timed_out, spec.timeout_s,
                            loop.time() - started if enqueuer_deadline else None)
        result = ScriptResult(exit_code=outcome.exit_code)
        if data is not None:
            result.data = data
        if error is not None:
            result.error = error
        bound.info("task.finished", exit_code=outcome.exit_code, duration_s=round(duration_s, 3),
                   error=error)
        encoded = encode_result(result)
        outcome_name = "succeeded" if error is None else "timeout" if timed_out else "failed"
        self._report(spec.name, outcome_name, duration_s)
        if closing is not None:
            await closing
        if error is None:
            return encoded
        await self._store(ctx, result)
        raise ScriptFailed(error)

    def _report(self, name: str, outcome: str, duration_s: float) -> None:
        if self.on_finished is not None:
            self.on_finished(name, outcome, duration_s)

    async def _store(self, ctx: TaskContext, result: ScriptResult) -> None:
        await ctx.result_writer.write(encode_result(result))


def _write_new_file(path: str, data: bytes) -> None:
    """Into a fresh work directory: never through a link, never over a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


#: Stands in if run_process was cancelled before it could record an exit (it always records
#: one once the script has started).
_STOPPED = ProcessExit(exit_code=-15, signal_name="SIGTERM")


#: How much earlier than tasks.yaml's timeout the engine's deadline must fall to be reported
#: as the enqueuer's (the engine computes its deadline a moment before the script starts).
_DEADLINE_SLACK_S = 1.0


def _error_text(outcome: ProcessExit, file_error: str | None, timed_out: bool,
                timeout_s: float, deadline_after_s: float | None = None) -> str | None:
    """``deadline_after_s``: set when the task's own timeout/deadline fired (after that many
    seconds), which is then named with asynq's words, not tasks.yaml's timeout."""
    if deadline_after_s is not None:
        return (f"context deadline exceeded: the task's own timeout or deadline (set when it "
                f"was enqueued) passed after {deadline_after_s:.1f}s; process group stopped: "
                f"{outcome.describe()}")
    if timed_out:
        return f"timed out after {timeout_s:g}s; process group stopped: {outcome.describe()}"
    if outcome.signal_name is not None or outcome.exit_code != 0:
        return outcome.describe()
    return file_error


def shell_retry_delay(
    config: Callable[[], TasksConfig],
) -> Callable[[int, BaseException, Task], float]:
    """The engine's retry delay for shell tasks: the task's fixed ``retry_delay`` from
    tasks.yaml; asynq's default curve for anything else sharing the server."""

    def delay(retried: int, error: BaseException, task: Task) -> float:
        spec = config().tasks.get(task.type)
        if spec is None:
            return default_retry_delay(retried, error, task)
        return spec.retry_delay_s

    return delay


def task_names(config: TasksConfig) -> Sequence[str]:
    return sorted(config.tasks)
