"""Run one script: exec (never a shell), explicit environment, its own session and process group,
closed stdin, output read line by line as it comes.

Stopping (timeout or cancel): SIGTERM to the whole group, SIGKILL after a grace period. After the
script exits, whatever it left running in its group is killed too, so forked children cannot
outlive the task (or keep its output pipes open). The group is signalled while the leader is
still an unreaped zombie, so its pgid cannot have been reused by an unrelated process. A child
that calls setsid() itself leaves the group and is out of reach; that is documented, not hidden.

A script never outlives its worker: every group is registered with a keeper process (see
``GroupKeeper``) that SIGKILLs the groups still registered when the worker dies, however it dies.

Why not ``asyncio.create_subprocess_exec``: its transports, protocols, stream readers, reader
tasks and child watcher cost the worker about as much CPU per run as the exec itself (measured
~260 µs vs ~145 µs here for a one-line script at concurrency 10), and on a worker that runs many
short scripts that CPU is taken from the scripts. Here the script is spawned by
``subprocess.Popen`` (vfork + exec: no preexec_fn, so CPython never falls back to fork) straight
onto two pipes, the pipes are read by event-loop callbacks, and the exit is seen through a pidfd
(Linux 5.3+) that this module reaps itself; no thread, no task per stream.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Protocol

import msgspec
import structlog

log = structlog.get_logger("aqsh.runner")

READ_CHUNK = 64 * 1024
#: How long the readers may take to drain the pipes once the group has been killed.
DRAIN_TIMEOUT_S = 5.0
#: The pipes are watched by the event loop only once a script has run this long; a script
#: that exits sooner has its output read in one go after its exit (usually up to end of file),
#: which spares each short run two fd registrations with epoll, their removals, and an
#: event-loop wake-up per chunk. A longer script's output is read live from then on, and one
#: that writes more than a pipe holds (64 KiB on Linux) before then waits at most this long.
#: The log's first batch lingers about as long anyway (aqsh.runner.logs.DEFAULT_LINGER_S).
READ_AFTER_S = 0.005
#: Without a pidfd (old kernels, non-Linux) the exit is polled, backing off up to this.
POLL_MAX_S = 0.05


class LineSink(Protocol):
    """Where output lines go. ``put_lines`` always takes the lines; while ``full`` is true the
    readers stop reading, so the kernel pipe fills and the script blocks on write (lines are
    delayed, never dropped), until ``wait_for_room`` returns."""

    def put_lines(self, stream: str, lines: list[str]) -> None: ...

    @property
    def full(self) -> bool: ...

    async def wait_for_room(self) -> None: ...


class ProcessExit(msgspec.Struct, frozen=True):
    """How the script ended. ``exit_code`` is negative (−signal) when a signal ended it;
    ``killed_after_grace``: it outlived SIGTERM by the grace period and SIGKILL ended it."""

    exit_code: int
    signal_name: str | None = None
    killed_after_grace: bool = False

    def describe(self) -> str:
        """How it ended, in words: "exit code 3", "killed by signal SIGKILL after the grace
        period"."""
        if self.signal_name is None:
            return f"exit code {self.exit_code}"
        if self.killed_after_grace:
            return f"killed by signal {self.signal_name} after the grace period"
        return f"killed by signal {self.signal_name}"


class ExitRecord:
    """Filled by ``run_process`` before it re-raises CancelledError, so a caller that cancelled
    it (timeout, cancel, shutdown) can still report how the script really ended."""

    exit: ProcessExit | None = None


#: The keeper: reads "+pgid" / "-pgid" lines on stdin; at end of file — the worker has exited,
#: whatever killed it, since only the worker holds the write end — it SIGKILLs every group
#: still registered, then exits. Plain sh with builtins only (no fork per line, ~1 MB, no
#: interpreter path the worker might not be able to exec). Its own session keeps terminal and
#: group signals meant for the worker (Ctrl-C, ``kill -- -pgid``) from killing it first, and it
#: ignores the usual stop signals for the same reason.
KEEPER_SH = """\
trap '' INT TERM HUP QUIT
g=" "
while read -r line; do
  case $line in
    +*) g="$g${line#+} " ;;
    -*) p=${line#-}
        case $g in *" $p "*) g="${g%% "$p" *} ${g#* "$p" }" ;; esac ;;
  esac
done
for p in $g; do kill -s KILL -- "-$p" 2>/dev/null; done
"""


class GroupKeeper:
    """Kills the scripts' process groups when the worker dies, even by SIGKILL.

    Why a keeper, not a parent-death signal on each script: PR_SET_PDEATHSIG needs either
    ``preexec_fn`` (CPython then forks instead of vfork: spawn measured 2.8–3.2 ms wall and
    720–870 µs of the worker's CPU, vs 1.0 ms and 145 µs) or a ``setpriv --pdeathsig`` exec in
    front of every script (2.3–2.6 ms, 250–350 µs), and it reaches the leader only, not the
    children it forked. The keeper is one small process per worker, started once; registering
    a group is one pipe write (~2 µs), and it kills whole groups. It is ``/bin/sh`` (scripts need
    one anyway) running ``KEEPER_SH``.

    Not covered: a worker killed in the microseconds between a script's exec and the write that
    registers it; a process that left its group with setsid(); a keeper killed together with
    the worker (``kill -9 -1``, a container or cgroup kill — where the scripts die with them).
    If the keeper dies alone it is restarted, at the next script start or exit, and told every
    live group again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd = -1
        self._groups: set[int] = set()

    def add(self, pgid: int) -> None:
        with self._lock:
            self._groups.add(pgid)
            self._send(f"+{pgid}\n".encode())

    def discard(self, pgid: int) -> None:
        with self._lock:
            if pgid in self._groups:
                self._groups.discard(pgid)
                self._send(f"-{pgid}\n".encode())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def groups(self) -> frozenset[int]:
        """The groups registered now (running scripts)."""
        with self._lock:
            return frozenset(self._groups)

    def close(self) -> None:
        """End the keeper (it kills whatever is still registered, normally nothing)."""
        with self._lock:
            self._stop()

    def _send(self, line: bytes) -> None:
        for _ in range(2):
            if self._proc is None or self._proc.poll() is not None:
                if not self._groups:  # nothing to keep: no keeper needed until the next script
                    self._stop()
                    return
                self._start()
                line = b"".join(f"+{g}\n".encode() for g in self._groups)
            try:
                os.write(self._write_fd, line)
                return
            except BrokenPipeError:  # it died: restart it, tell it every group again
                self._stop()
        log.error("process.keeper_unavailable", groups=len(self._groups))

    def _start(self) -> None:
        self._stop()
        read_fd, write_fd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", KEEPER_SH], stdin=read_fd,
                stdout=subprocess.DEVNULL, cwd="/", start_new_session=True, close_fds=True,
                env={},  # it needs nothing, and is dumpable: it must hold no secret
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._write_fd = write_fd
        log.debug("process.keeper_started", pid=self._proc.pid)

    def _stop(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5.0)
            self._proc = None


_keeper = GroupKeeper()
# A process that exits normally ends its keeper itself and waits for it: left to the garbage
# collector, the keeper's Popen would be dropped while the shell still reads its pipe.
atexit.register(_keeper.close)


def group_keeper() -> GroupKeeper:
    """This process's keeper (started with the first script)."""
    return _keeper


def install_child_watcher() -> str:
    """Pick the child watcher deliberately: pidfd (one fd per child, no thread) where the kernel
    has it, measured ~30% faster than 3.11's default thread-per-child watcher. ``run_process``
    does not need it (it reaps its own children), but anything else in the process that uses
    asyncio's subprocesses does. Python 3.12+ chooses pidfd itself, so this only acts on 3.11.
    Returns the watcher in use."""
    if sys.version_info >= (3, 12):
        return "default"
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return "threaded"
    os.close(fd)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        asyncio.set_child_watcher(watcher)
        with contextlib.suppress(RuntimeError):
            watcher.attach_loop(asyncio.get_running_loop())
    return "pidfd"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _text(raw: bytes, max_line_bytes: int) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if len(raw) > max_line_bytes:
        cut = len(raw) - max_line_bytes
        return raw[:max_line_bytes].decode("utf-8", "replace") + f" …[line truncated: {cut}+ bytes]"
    return raw.decode("utf-8", "replace")


class _OutputReader:
    """Reads one pipe from an event-loop callback and splits it into lines; an over-long line is
    cut with a marker, not buffered. ``closed`` resolves at end of file.

    It starts idle: ``start`` registers the callback, ``read_now`` reads what the pipe holds
    at once (see ``READ_AFTER_S``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, stream: str, sink: LineSink,
                 max_line_bytes: int) -> None:
        self._loop = loop
        self._fd = fd
        self._stream = stream
        self._sink = sink
        self._max_line_bytes = max_line_bytes
        self._pending = b""
        self._skipping = False
        self._reading = False
        self._resumer: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)

    def start(self) -> None:
        """Read from the event loop as output comes (unless paused for room or closed)."""
        if self._resumer is None:
            self._resume()

    def read_now(self) -> None:
        """Read everything the pipe holds now; then, unless that reached end of file (or the
        sink is full and a resumer waits for room), go on reading from the event loop."""
        while self._read_once():
            pass
        self.start()

    def _resume(self) -> None:
        self._resumer = None
        if not self.closed.done() and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """One read; True when there may be more to read right away."""
        if self.closed.done() or self._resumer is not None:
            return False
        try:
            chunk = os.read(self._fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("process.output_error", stream=self._stream, error=str(exc))
            chunk = b""
        try:
            if chunk:
                self._feed(chunk)
            else:
                self._finish()
                return False
        except Exception as exc:  # a broken sink must not leave a callback spinning on the fd
            log.warning("process.output_error", stream=self._stream, error=repr(exc))
            self.close()
            return False
        if self._sink.full:
            if self._reading:
                self._loop.remove_reader(self._fd)
                self._reading = False
            self._resumer = self._loop.create_task(self._resume_when_room())
            return False
        return True

    async def _resume_when_room(self) -> None:
        await self._sink.wait_for_room()
        self._resume()

    def _feed(self, chunk: bytes) -> None:
        pending = self._pending + chunk if self._pending else chunk
        *raw_lines, pending = pending.split(b"\n")
        lines: list[str] = []
        limit = self._max_line_bytes
        for raw in raw_lines:
            if self._skipping:
                self._skipping = False
                continue
            lines.append(_text(raw, limit))
        if len(pending) > limit:
            if not self._skipping:
                lines.append(_text(pending, limit))
            self._skipping = True
            pending = b""
        self._pending = pending
        if lines:
            self._sink.put_lines(self._stream, lines)

    def _finish(self) -> None:
        if self._pending and not self._skipping:
            self._sink.put_lines(self._stream, [_text(self._pending, self._max_line_bytes)])
        self._pending = b""
        self.close()

    def close(self) -> None:
        """Stop reading (end of file, or giving up on a pipe a stray process keeps open)."""
        if self.closed.done():
            return
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._resumer is not None:
            self._resumer.cancel()
            self._resumer = None
        os.close(self._fd)
        self.closed.set_result(None)


class _Child:
    """The script's process: its exit is a future set when the pidfd becomes readable (or a
    poll sees it), after this module has killed what is left of its group and reaped it.

    The script leads its own process group (new session), so the group's id is its pid. While
    the leader is an unreaped zombie that id cannot be handed to another process; the group is
    therefore SIGKILLed between the exit and ``waitpid``, never after."""

    def __init__(self, loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes]) -> None:
        self._loop = loop
        self._popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid
        self.exited: asyncio.Future[int] = loop.create_future()
        #: One future per waiting caller, resolved by ``_reap`` itself: the caller wakes in
        #: the next loop pass, where waiting on ``exited`` through ``asyncio.wait`` took two.
        self._waiters: list[asyncio.Future[None]] = []
        self._pidfd = -1
        self._poller: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._poller = loop.create_task(self._poll())
        else:
            loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> bool:
        try:
            exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            group_keeper().discard(self.pgid)
            pid, status = self.pid, 255 << 8  # reaped by someone else: the code is lost
        else:
            if exited is None:
                return False
            # Children left behind in the group would keep running and hold the pipes open.
            _signal_group(self.pgid, signal.SIGKILL)
            # Unregistered while the pgid is still ours (the zombie holds it), never after.
            group_keeper().discard(self.pgid)
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 255 << 8
            if pid == 0:  # cannot happen after WNOWAIT saw the exit; poll again rather than hang
                return False
        code = os.waitstatus_to_exitcode(status)
        self._popen.returncode = code  # so Popen never thinks it still runs
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if not self.exited.done():
            self.exited.set_result(code)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    async def _poll(self) -> None:
        delay_s = 0.001
        while not self._reap():
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, POLL_MAX_S)

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the group, unless the leader has been reaped (its pgid may be reused)."""
        if not self.exited.done():
            _signal_group(self.pgid, sig)

    async def wait(self, timeout_s: float | None = None) -> bool:
        """True once the script has exited; False if ``timeout_s`` passed first. Cancelling
        the caller leaves the exit future intact for the next wait."""
        if self.exited.done():
            return True
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            if timeout_s is None:
                await waiter  # a cancel cancels this waiter only, never ``exited``
            else:
                await asyncio.wait((waiter,), timeout=timeout_s)
        finally:
            waiter.cancel()
            self._waiters.remove(waiter)
        return self.exited.done()


@functools.cache
def _devnull() -> int:
    """/dev/null, opened once for every script's stdin: ``subprocess.DEVNULL`` would open and
    close it again for each spawn. Read-only, close-on-exec (the child gets it as fd 0 only)."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _spawn(argv: list[str], env: Mapping[str, str], cwd: str) -> tuple[subprocess.Popen[bytes],
                                                                       int, int]:
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        popen = subprocess.Popen(
            argv,
            stdin=_devnull(),
            stdout=out_write,
            stderr=err_write,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        for fd in (out_read, err_read):
            os.close(fd)
        raise
    finally:
        # Only the child may hold the write ends, or the readers would never see end of file.
        os.close(out_write)
        os.close(err_write)
    return popen, out_read, err_read


async def run_process(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    sink: LineSink,
    kill_grace_s: float = 10.0,
    max_line_bytes: int = 16 * 1024,
    record: ExitRecord | None = None,
) -> ProcessExit:
    """Run to completion. If the caller cancels, the group is stopped (TERM, then KILL after
    the grace period) before CancelledError propagates; ``record.exit`` then says how the
    script really ended."""
    loop = asyncio.get_running_loop()
    popen, out_fd, err_fd = _spawn(argv, env, cwd)
    # Registered before anything can await: from here on the worker's death kills the group.
    group_keeper().add(popen.pid)
    readers = (
        _OutputReader(loop, out_fd, "stdout", sink, max_line_bytes),
        _OutputReader(loop, err_fd, "stderr", sink, max_line_bytes),
    )
    start_reading = loop.call_later(READ_AFTER_S, _start_readers, readers)
    child = _Child(loop, popen)
    try:
        await child.wait()
    except asyncio.CancelledError:
        after_grace = await _stop_group(child, kill_grace_s)
        start_reading.cancel()
        await _finish_readers(readers)
        if record is not None:
            record.exit = _exit(child.exited.result(), after_grace)
        raise
    start_reading.cancel()
    await _finish_readers(readers)
    return _exit(child.exited.result())


def _start_readers(readers: tuple[_OutputReader, ...]) -> None:
    for reader in readers:
        reader.start()


async def _stop_group(child: _Child, kill_grace_s: float) -> bool:
    """TERM, then KILL after the grace period; True when the KILL was needed."""
    child.signal_group(signal.SIGTERM)
    if await child.wait(kill_grace_s):
        return False
    log.warning("process.kill", pid=child.pid, grace_s=kill_grace_s)
    child.signal_group(signal.SIGKILL)
    await child.wait()
    return True


async def _finish_readers(readers: tuple[_OutputReader, ...]) -> None:
    """Wait for end of file on both pipes; a pipe still held open by a process outside the
    group (one that called setsid) is abandoned after ``DRAIN_TIMEOUT_S``."""
    for reader in readers:
        reader.read_now()  # a script that exited early: its whole output, usually with EOF
    pending = [reader.closed for reader in readers if not reader.closed.done()]
    if pending:
        try:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
        finally:
            for reader in readers:
                reader.close()


def _exit(returncode: int, after_grace: bool = False) -> ProcessExit:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return ProcessExit(exit_code=returncode, signal_name=name,
                           killed_after_grace=after_grace and returncode == -signal.SIGKILL)
    return ProcessExit(exit_code=returncode)
