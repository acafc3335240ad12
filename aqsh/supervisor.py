"""``AQSH_WORKER_PROCESSES=N`` / ``--processes N``: N aqsh processes under one supervisor.

Why processes: a Python process runs on one core at a time; Go asynq's server uses every core of
the machine. N children, each a complete ``aqsh serve`` of its own (own Redis connections, own
server id and heartbeat, own event loop), use N cores. The container default stays 1 (in
Kubernetes, scale pods); on a VM one command uses the machine.

The supervisor does nothing but keep the children:

* starts N children (``python -m aqsh serve`` with ``AQSH_WORKER_PROCESSES=1``, the same
  settings otherwise) in its own process group, so a terminal's Ctrl-C reaches only the
  supervisor and each child gets exactly one forwarded signal;
* restarts a child that exits while it is not stopping, after a back-off that grows (0.5 s
  doubling to 30 s) while children keep dying young (under 10 s), so a broken configuration
  does not spin the machine;
* forwards SIGTERM / SIGINT (a second one makes the children force, as in one process) and
  SIGHUP (reload tasks.yaml) to every child; exits once all have stopped — 0 when every child
  stopped cleanly.

The children share the listening port with ``SO_REUSEPORT``: the kernel hands each connection
to one child, as gunicorn's or uvicorn's workers share theirs. ``/health`` and ``/metrics`` are
therefore per child: a probe hears from whichever child took the connection (any child serving
shows the pod serving; a dead child is replaced by the supervisor), and each scrape is one
child's counters. Scrape per-child figures with one process per pod.

A child dies with its supervisor (``PR_SET_PDEATHSIG``): a supervisor killed with SIGKILL leaves
no orphan worker behind to hold tasks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("aqsh.supervisor")

#: Set in each child's environment: the supervisor's pid (the child checks it is still its
#: parent) and the child's slot number (for logs).
SUPERVISOR_ENV = "AQSH_SUPERVISOR_PID"
INDEX_ENV = "AQSH_PROCESS_INDEX"

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_FORWARDED = (*_STOP_SIGNALS, signal.SIGHUP)


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    delay_s: float = 0.0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Keeps ``processes`` copies of ``command`` running; ``run`` blocks until all stopped."""

    def __init__(self, command: Sequence[str], processes: int, *,
                 env: Mapping[str, str] | None = None, min_uptime_s: float = 10.0,
                 restart_delay_s: float = 0.5, max_restart_delay_s: float = 30.0) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.min_uptime_s = min_uptime_s
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.slots = [_Slot(i) for i in range(processes)]
        self.stopping = False
        self.clean = True

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None]

    def _start(self, slot: _Slot) -> None:
        env = {**self.env, SUPERVISOR_ENV: str(os.getpid()), INDEX_ENV: str(slot.index),
               "AQSH_WORKER_PROCESSES": "1"}
        # process_group=0: the child's own group, so a terminal's SIGINT is not delivered
        # twice (directly and forwarded), which a child would read as "force".
        slot.proc = subprocess.Popen(self.command, env=env, process_group=0)
        slot.started_at = time.monotonic()
        slot.restart_at = None
        log.info("child.started", index=slot.index, pid=slot.proc.pid)

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None or (code := slot.proc.poll()) is None:
                continue
            pid, slot.proc = slot.proc.pid, None
            slot.exit_codes.append(code)
            if self.stopping:
                if code != 0:
                    self.clean = False
                log.info("child.stopped", index=slot.index, pid=pid, exit_code=code)
                continue
            lived_s = now - slot.started_at
            # Dying young again and again means something is broken: back off.
            slot.delay_s = (self.restart_delay_s if lived_s >= self.min_uptime_s or not
                            slot.delay_s else min(slot.delay_s * 2, self.max_restart_delay_s))
            slot.restart_at = now + slot.delay_s
            log.warning("child.exited", index=slot.index, pid=pid, exit_code=code,
                        lived_s=round(lived_s, 1), restart_in_s=slot.delay_s)

    def _forward(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def _on_signal(self, sig: int) -> None:
        if sig in _STOP_SIGNALS:
            if not self.stopping:
                log.info("supervisor.stopping", signal=signal.Signals(sig).name)
            self.stopping = True
            for slot in self.slots:
                slot.restart_at = None
        self._forward(sig)

    def run(self) -> int:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        os.set_blocking(read_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd)
        watched = (*_FORWARDED, signal.SIGCHLD)
        # A Python-level handler is needed for the wakeup fd to hear the signal; the work is
        # done in the loop below, never inside a handler.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in watched}
        try:
            for slot in self.slots:
                self._start(slot)
            log.info("supervisor.started", processes=len(self.slots), pids=self.pids())
            while True:
                due = [s.restart_at for s in self.slots if s.restart_at is not None]
                # The 1 s poll covers SIGCHLDs merged into one and a start that failed.
                timeout_s = max(0.0, min([*due, time.monotonic() + 1.0]) - time.monotonic())
                with contextlib.suppress(InterruptedError):
                    select.select([read_fd], [], [], timeout_s)
                try:
                    received = os.read(read_fd, 512)
                except BlockingIOError:
                    received = b""
                for sig in received:
                    if sig in _FORWARDED:
                        self._on_signal(sig)
                self._reap()
                now = time.monotonic()
                for slot in self.slots:
                    if (not self.stopping and slot.proc is None and slot.restart_at is not None
                            and slot.restart_at <= now):
                        self._start(slot)
                if self.stopping and not self.pids():
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(read_fd)
            os.close(write_fd)
        log.info("supervisor.stopped", clean=self.clean)
        return 0 if self.clean else 1


def supervised_child() -> bool:
    """In a child: tie its life to the supervisor's (SIGTERM when the supervisor dies, however
    it dies) and say whether this process is one of N sharing a port. A child whose supervisor
    is already gone exits at once."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent:
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(parent):  # the supervisor died before the prctl took hold
        sys.exit(1)
    return True


def child_command() -> list[str]:
    """How a child is started: this interpreter, ``-m aqsh serve``; the mode and every other
    setting travel in the environment."""
    return [sys.executable, "-m", "aqsh", "serve"]


def run_supervisor(processes: int, mode: str) -> int:
    """The ``aqsh serve`` hook for ``AQSH_WORKER_PROCESSES`` > 1."""
    env = {**os.environ, "AQSH_MODE": mode}
    return Supervisor(child_command(), processes, env=env).run()
