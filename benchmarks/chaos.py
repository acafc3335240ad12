"""Chaos drills: aqsh's "a 202 is a stored task, nothing accepted is lost" under real faults.

``kill``: N short shell tasks (default 10,000) submitted at a steady rate through aqsh's
Client into one Redis with append-only persistence, run by 3 ``aqsh serve --mode worker``
processes. Every 2 s a random worker is SIGKILLed and a replacement started; when half the
tasks are submitted Redis itself is SIGKILLed and restarted on the same port and data dir.
Each run of the script appends a start and an end line (task id, worker, retry, wall time) to
a shared file: that side effect is what tells how often each task really ran.

``sentinel``: 1 master, 1 replica, 3 sentinels (``redis-server --sentinel``) and ``aqsh serve
--mode api`` on Sentinel; HTTP POSTs at a fixed rate; the master is SIGKILLed. Every 202's
task id must be on the new master afterwards.

Both print progress to stderr and one JSON line to stdout; ``--drill all`` (the default) runs
both and prints one line with both. Exit status 1 when a drill lost or stranded a task.

Usage: python benchmarks/chaos.py [--drill kill|sentinel|all] [--tasks N] [--seed S] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import _common
import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from aqsh import errors
from aqsh.engine import keys
from aqsh.engine.client import Client, new_task_id
from aqsh.redis_process import RedisProcess, find_redis_server, free_port

QUEUE = "default"
TASK = "chaos"
#: What the engine gives a running task before it counts as abandoned (aqsh.engine.processor);
#: the recovery wait is reported against it.
LEASE_S = 30.0

TASKS_YAML = """\
tasks:
  chaos:
    script: chaos.sh
    timeout: 60s
    max_retry: 25
    retry_delay: 0
"""

# bash for $EPOCHREALTIME: a timestamp without spawning date(1). Lines are far below PIPE_BUF
# and the file is opened O_APPEND, so concurrent runs never interleave within a line.
SCRIPT = """\
#!/bin/bash
printf 'S %s %s %s %s\\n' "$AQSH_TASK_ID" "$CHAOS_WORKER" "$AQSH_RETRY" "$EPOCHREALTIME" \\
  >> "$CHAOS_RUNS"
sleep "$CHAOS_SLEEP"
printf 'E %s %s %s %s\\n' "$AQSH_TASK_ID" "$CHAOS_WORKER" "$AQSH_RETRY" "$EPOCHREALTIME" \\
  >> "$CHAOS_RUNS"
"""


def say(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_tasks(tmp: Path) -> None:
    (tmp / "tasks.yaml").write_text(TASKS_YAML)
    script = tmp / "chaos.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)


def service_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AQSH_TASKS_CONFIG": str(tmp / "tasks.yaml"), "AQSH_TASKS_DIR": str(tmp),
        "AQSH_RESULTS_DIR": str(tmp / "work"), "AQSH_LOG_FORMAT": "json",
        "AQSH_LOG_LEVEL": "info", "AQSH_SCHEDULER": "false",
        "AQSH_ENV_ALLOWLIST": "PATH,CHAOS_WORKER,CHAOS_RUNS,CHAOS_SLEEP",
        "PYTHONPATH": str(_common.ROOT),
        **extra,
    }


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 40.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"max": None, "p50": None}
    return {"max": round(max(values), 3), "p50": round(_common.percentile(values, 50), 3)}


# ================================================================ kill/restart drill
@dataclass
class Submission:
    task_id: str
    attempts: int = 0
    acknowledged: bool = False
    #: The ack came as "this id already exists": an earlier attempt whose reply was lost had
    #: stored it.
    acknowledged_by_conflict: bool = False
    first_error: str | None = None
    acked_at: float | None = None


@dataclass
class Run:
    worker: str
    retry: int
    start: float
    end: float | None = None


class Workers:
    """The worker processes: each has a name (w1, w2, ...) its scripts write into the runs
    file, so a run is tied to the process that ran it and to that process's kill time."""

    def __init__(self, tmp: Path, redis_url: str, concurrency: int, sleep_s: float,
                 rng: random.Random) -> None:
        self.tmp, self.redis_url = tmp, redis_url
        self.concurrency, self.sleep_s, self.rng = concurrency, sleep_s, rng
        self.generation = 0
        self.live: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}
        self.killed_at: dict[str, float] = {}

    def start_one(self) -> str:
        self.generation += 1
        name = f"w{self.generation}"
        env = service_env(
            self.tmp, AQSH_REDIS_ADDR=self.redis_url, AQSH_MODE="worker",
            AQSH_BIND=f"127.0.0.1:{free_port()}",
            AQSH_WORKER_CONCURRENCY=str(self.concurrency),
            CHAOS_WORKER=name, CHAOS_RUNS=str(self.tmp / "runs.log"),
            CHAOS_SLEEP=f"{self.sleep_s:g}")
        log = (self.tmp / f"{name}.log").open("wb")
        self.logs[name] = log
        self.live[name] = subprocess.Popen(
            [sys.executable, "-m", "aqsh", "serve", "--mode", "worker"], env=env,
            stdout=subprocess.DEVNULL, stderr=log)
        return name

    def kill_random(self) -> str:
        name = self.rng.choice(sorted(self.live))
        proc = self.live.pop(name)
        proc.send_signal(signal.SIGKILL)
        self.killed_at[name] = time.time()
        proc.wait()
        return name

    def stop_all(self) -> None:
        for proc in self.live.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.live.values():
            stop_process(proc)
        self.live.clear()
        for log in self.logs.values():
            log.close()

    def log_events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for name in self.logs:
            for line in (self.tmp / f"{name}.log").read_text(errors="replace").splitlines():
                if f'"{event}"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == event:
                        record["worker"] = name
                        out.append(record)
        return out


def iso_s(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_runs(path: Path) -> dict[str, list[Run]]:
    """task id → its runs in start order, each matched with its end line (same task, worker
    and retry count) when the script got that far."""
    runs: dict[str, list[Run]] = defaultdict(list)
    open_runs: dict[tuple[str, str, int], list[Run]] = defaultdict(list)
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue  # a line cut short by a kill mid-write (never seen: writes are atomic)
        kind, task_id, worker, retry_text, ts_text = parts
        retry, ts = int(retry_text), float(ts_text)
        if kind == "S":
            run = Run(worker=worker, retry=retry, start=ts)
            runs[task_id].append(run)
            open_runs[(task_id, worker, retry)].append(run)
        elif kind == "E":
            pending = open_runs.get((task_id, worker, retry))
            if pending:
                pending.pop(0).end = ts
    for task_runs in runs.values():
        task_runs.sort(key=lambda run: run.start)
    return runs


class KillDrill:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.rng = random.Random(args.seed)
        extra: tuple[str, ...] = ()
        if args.appendfsync == "always":  # RedisProcess(persistent=True) says everysec
            extra = ("--appendfsync", args.appendfsync)
        # "off": no persistence at all, so the restart comes back empty. Not a setting to
        # run aqsh with: it shows that the drill does see lost tasks.
        self.redis_proc = RedisProcess(persistent=args.appendfsync != "off",
                                       data_dir=str(tmp / "redis"), extra_args=extra)
        self.submissions: list[Submission] = []
        self.submitted_all = asyncio.Event()
        self.redis_killed_at: float | None = None
        self.redis_back_at: float | None = None
        self.active_without_lease_max = 0
        self.active_without_lease_samples = 0
        self.stale_lease_max = 0
        self.pending_max = 0
        self.kills = 0
        self.errors: Counter[str] = Counter()

    async def run(self) -> dict[str, Any]:
        args = self.args
        write_tasks(self.tmp)
        self.redis_proc.start()
        url = self.redis_proc.url
        self.workers = Workers(self.tmp, url, args.concurrency, args.task_sleep_s, self.rng)
        redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        client = Client(redis)
        try:
            for _ in range(args.workers):
                self.workers.start_one()
            await asyncio.to_thread(self._wait_worker_ready)
            say(f"kill drill: {args.tasks} tasks at {args.rate:g}/s, {args.workers} workers "
                f"x {args.concurrency}, appendfsync {args.appendfsync}")
            started = time.time()
            sampler = asyncio.create_task(self._sample(redis))
            killer = asyncio.create_task(self._kill_workers())
            await self._submit(client)
            submit_end = time.time()
            await killer
            last_kill = max(self.workers.killed_at.values(), default=submit_end)
            settled_at = await self._settle(redis, deadline_s=args.settle_deadline_s)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            final = await self._final_state(redis)
        finally:
            self.workers.stop_all()
            await client.aclose()
            await redis.aclose()
            self.redis_proc.stop_keep_data()
        return self._figures(final, started, submit_end, last_kill, settled_at)

    def _wait_worker_ready(self) -> None:
        # The first workers must be up before the clock starts, or the first kills hit
        # processes still importing. Their server state in Redis says they are serving.
        import redis as sync_redis

        client = sync_redis.Redis(port=self.redis_proc.port)
        try:
            deadline = time.monotonic() + 60
            while client.zcard(keys.ALL_SERVERS) < self.args.workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not start within 60 s")
                time.sleep(0.1)
        finally:
            client.close()

    async def _submit(self, client: Client) -> None:
        """One enqueue every 1/rate s, each in its own task so a slow or failing one does not
        hold the rate; the Redis kill comes when half are out."""
        args = self.args
        half = args.tasks // 2
        pending: set[asyncio.Task[None]] = set()
        t0 = time.monotonic()
        for i in range(args.tasks):
            delay = t0 + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == half and not args.no_redis_kill:
                pending.add(asyncio.create_task(self._kill_redis()))
            submission = Submission(task_id=new_task_id())
            self.submissions.append(submission)
            task = asyncio.create_task(self._enqueue(client, submission))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        self.submitted_all.set()

    async def _enqueue(self, client: Client, submission: Submission) -> None:
        """Retries reuse the task id, as the API does: an attempt whose reply was lost is met
        by the next one as TaskIdConflict, so a task is never stored twice."""
        deadline = time.monotonic() + 120
        delay_s = 0.05
        while True:
            submission.attempts += 1
            try:
                await client.enqueue(TASK, b"{}", queue=QUEUE, max_retry=25, timeout=60,
                                     retention=3600, task_id=submission.task_id)
                submission.acknowledged = True
            except errors.TaskIdConflict:
                submission.acknowledged = submission.acknowledged_by_conflict = True
            except (errors.BrokerUnavailable, errors.BrokerFault, RedisError,
                    OSError) as exc:
                kind = type(exc).__name__
                self.errors[kind] += 1
                submission.first_error = submission.first_error or kind
                if time.monotonic() + delay_s > deadline:
                    return
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)
                continue
            submission.acked_at = time.time()
            return

    async def _kill_redis(self) -> None:
        self.redis_killed_at = time.time()
        self.redis_proc.kill()
        say("redis SIGKILLed")
        await asyncio.sleep(self.args.redis_down_s)
        await asyncio.to_thread(self.redis_proc.start, 60.0)
        self.redis_back_at = time.time()
        say(f"redis back after {self.redis_back_at - self.redis_killed_at:.2f} s")

    async def _kill_workers(self) -> None:
        while not self.submitted_all.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.submitted_all.wait(), self.args.kill_every_s)
            if self.submitted_all.is_set():
                return
            name = self.workers.kill_random()
            self.kills += 1
            replacement = self.workers.start_one()
            say(f"SIGKILLed {name}, started {replacement}")

    async def _snapshot(self, redis: aioredis.Redis) -> dict[str, Any]:
        q = keys.queue_keys(QUEUE)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.lrange(q.active, 0, -1)
            pipe.zrange(q.lease, 0, -1, withscores=True)
            pipe.llen(q.pending)
            pipe.zcard(q.retry)
            pipe.zcard(q.scheduled)
            pipe.zcard(q.completed)
            pipe.zcard(q.archived)
            active, leases, pending, retry, scheduled, completed, archived = await pipe.execute()
        lease_by_id = {member: score for member, score in leases}
        now = time.time()
        return {
            "active": len(active), "pending": pending, "retry": retry, "scheduled": scheduled,
            "completed": completed, "archived": archived,
            # One script moves a task into active and gives it a lease, one takes both away:
            # an active task without a lease would never be recovered.
            "active_without_lease": sum(1 for task_id in active if task_id not in lease_by_id),
            # Expired by more than the recoverer's interval + grace: someone should have
            # recovered it already.
            "stale_leases": sum(1 for score in lease_by_id.values() if score < now - 10),
            "orphan_leases": len(set(lease_by_id) - set(active)),
        }

    async def _sample(self, redis: aioredis.Redis) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                snap = await self._snapshot(redis)
            except (RedisError, OSError) as exc:
                say(f"sample failed: {type(exc).__name__} (Redis down?)")
                continue
            if snap["active_without_lease"]:
                self.active_without_lease_samples += 1
            self.active_without_lease_max = max(self.active_without_lease_max,
                                                snap["active_without_lease"])
            self.stale_lease_max = max(self.stale_lease_max, snap["stale_leases"])
            self.pending_max = max(self.pending_max, snap["pending"])
            acked = sum(1 for s in self.submissions if s.acknowledged)
            say(f"submitted {len(self.submissions)} acked {acked} | pending {snap['pending']} "
                f"active {snap['active']} retry {snap['retry']} completed {snap['completed']} "
                f"archived {snap['archived']} | no-lease {snap['active_without_lease']} | "
                f"workers {len(self.workers.live)} kills {self.kills}")

    async def _settle(self, redis: aioredis.Redis, *, deadline_s: float) -> float | None:
        """Until nothing is pending, active or waiting to retry (twice in a row, 1 s apart),
        or the deadline passes (then None)."""
        deadline = time.monotonic() + deadline_s
        quiet = 0
        while time.monotonic() < deadline:
            try:
                snap = await self._snapshot(redis)
            except (RedisError, OSError):
                await asyncio.sleep(1.0)
                continue
            idle = not (snap["pending"] or snap["active"] or snap["retry"] or snap["scheduled"])
            quiet = quiet + 1 if idle else 0
            if quiet >= 2:
                return time.time()
            await asyncio.sleep(1.0)
        return None

    async def _final_state(self, redis: aioredis.Redis) -> dict[str, Any]:
        q = keys.queue_keys(QUEUE)
        states: dict[str, str | None] = {}
        ids = [s.task_id for s in self.submissions]
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            async with redis.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.hget(q.task(task_id), "state")
                replies = await pipe.execute()
            for task_id, state in zip(chunk, replies, strict=True):
                states[task_id] = state.decode() if state else None
        snap = await self._snapshot(redis)
        return {"states": states, "snapshot": snap}

    def _figures(self, final: dict[str, Any], started: float, submit_end: float,
                 last_kill: float, settled_at: float | None) -> dict[str, Any]:
        states: dict[str, str | None] = final["states"]
        snap = final["snapshot"]
        runs = read_runs(self.tmp / "runs.log")
        acked = [s for s in self.submissions if s.acknowledged]
        unacked = [s for s in self.submissions if not s.acknowledged]
        not_completed = [s.task_id for s in acked if states.get(s.task_id) != "completed"]
        # Lost: the work never happened. A task that ran to its end but whose record is gone
        # (or not completed) lost its state and result instead; both must be 0.
        lost = [t for t in not_completed if not any(r.end is not None for r in runs[t])]
        lost_set = set(lost)
        record_lost = [t for t in not_completed if t not in lost_set]
        completed = sum(1 for state in states.values() if state == "completed")
        # A completion the script never reached its end for would be a false success.
        completed_without_end = [
            task_id for task_id, state in states.items()
            if state == "completed" and not any(run.end is not None for run in runs[task_id])]
        recovered_at: dict[str, list[float]] = defaultdict(list)
        for record in self.workers.log_events("task.recovered"):
            recovered_at[record["task_id"]].append(iso_s(record["timestamp"]))
        reasons: Counter[str] = Counter()
        waits: list[float] = []
        kill_to_recovered: list[float] = []
        outlived = 0
        #: script end → worker kill, for runs whose script had ended but whose ack had not
        #: landed when the worker died: how long a finished run stays unacknowledged.
        unacked_for: list[float] = []
        unexplained: list[dict[str, Any]] = []
        killed_at = self.workers.killed_at
        redis_window = redis_down = None
        if self.redis_killed_at is not None:
            # Down, plus half a second either side: an ack in flight at the kill, and the
            # clients' reconnection after the restart.
            redis_down = (self.redis_killed_at - 0.5,
                          (self.redis_back_at or self.redis_killed_at) + 0.5)
            redis_window = (self.redis_killed_at - 1.0,
                            (self.redis_back_at or self.redis_killed_at) + 2.0)
        for task_id, task_runs in runs.items():
            for prev, nxt in itertools.pairwise(task_runs):
                kill_t = killed_at.get(prev.worker)
                if kill_t is not None and prev.start - 0.05 <= kill_t <= nxt.start:
                    if prev.end is None:
                        reasons["worker_killed_mid_run"] += 1
                    elif prev.end > kill_t:
                        reasons["worker_killed_mid_run"] += 1
                        outlived += 1  # the script carried on after its worker died
                    elif redis_down is not None and (
                            redis_down[0] <= prev.end <= redis_down[1]):
                        # The ack had nowhere to go: the worker died before its retry landed.
                        reasons["script_ended_while_redis_down_worker_killed_before_ack"] += 1
                    else:
                        reasons["worker_killed_after_script_ended_before_ack"] += 1
                        unacked_for.append(kill_t - prev.end)
                    waits.append(nxt.start - kill_t)
                    after = [t - kill_t for t in recovered_at.get(task_id, []) if t >= kill_t]
                    if after:
                        kill_to_recovered.append(min(after))
                    continue
                if redis_window is not None and prev.start <= redis_window[1] and (
                        prev.end is None or prev.end >= redis_window[0]):
                    reasons["redis_killed_during_run_or_ack"] += 1
                    continue
                reasons["unexplained"] += 1
                if len(unexplained) < 5:
                    unexplained.append({"task_id": task_id, "runs": [
                        vars(run) for run in task_runs]})
        wait = summary(waits)
        recovered = summary(kill_to_recovered)
        # A recovered task whose script never started before its recovery was dequeued by a
        # worker that died before the spawn: recovered all the same, but no run ties it to a
        # kill time.
        # Recovered → re-run start: the forwarder's interval (retry → pending, every 5 s) plus
        # the wait behind whatever is pending (a recovered task joins the back of the queue).
        to_rerun = []
        for task_id, times in recovered_at.items():
            later = [run.start for run in runs.get(task_id, []) if run.start > min(times)]
            if later:
                to_rerun.append(min(later) - min(times))
        recovered_without_run = sum(
            1 for task_id, times in recovered_at.items()
            if not any(run.start < min(times) for run in runs.get(task_id, [])))
        state_counts = Counter(state or "missing" for state in states.values())
        duration = (settled_at or time.time()) - started
        figures: dict[str, Any] = {
            "drill": "kill_restart",
            "tasks": self.args.tasks,
            "workers": self.args.workers,
            "worker_concurrency": self.args.concurrency,
            "task_sleep_s": self.args.task_sleep_s,
            "submit_rate_per_s": self.args.rate,
            "appendfsync": self.args.appendfsync,
            "submitted": len(self.submissions),
            "acknowledged": len(acked),
            "acknowledged_after_retry": sum(1 for s in acked if s.attempts > 1),
            "acknowledged_by_id_conflict": sum(1 for s in acked if s.acknowledged_by_conflict),
            "unacknowledged": len(unacked),
            "unacknowledged_stored_anyway": sum(1 for s in unacked if states.get(s.task_id)),
            "submit_errors": dict(self.errors),
            "completed": completed,
            "lost": len(lost),
            "lost_ids": lost[:10],
            "ran_but_not_recorded_completed": len(record_lost),
            "final_states": dict(state_counts),
            "completed_without_script_end": len(completed_without_end),
            "stuck_active": snap["active"] + snap["active_without_lease"],
            "active_without_lease_max_seen": self.active_without_lease_max,
            "active_without_lease_samples": self.active_without_lease_samples,
            "stale_lease_max_seen": self.stale_lease_max,
            "ran_more_than_once": sum(1 for r in runs.values() if len(r) > 1),
            "extra_runs": sum(len(r) - 1 for r in runs.values() if len(r) > 1),
            "rerun_reasons": dict(reasons),
            "unexplained_examples": unexplained,
            "scripts_outlived_worker": outlived,
            "ended_but_unacked_at_kill_s": summary(unacked_for),
            "worker_kills": self.kills,
            "redis_kills": 0 if self.redis_killed_at is None else 1,
            "redis_outage_s": (round(self.redis_back_at - self.redis_killed_at, 3)
                               if self.redis_back_at and self.redis_killed_at else None),
            "recovered_tasks": len(recovered_at),
            "recoveries": sum(len(times) for times in recovered_at.values()),
            "recovered_without_prior_run": recovered_without_run,
            "recovered_to_rerun_s": summary(to_rerun),
            "pending_max_seen": self.pending_max,
            "max_recovery_wait_s": wait["max"],
            "p50_recovery_wait_s": wait["p50"],
            "max_kill_to_recovered_s": recovered["max"],
            "p50_kill_to_recovered_s": recovered["p50"],
            "recovery_wait_over_lease_ratio": (round(wait["max"] / LEASE_S, 3)
                                               if wait["max"] is not None else None),
            # The bound, lease 30 s + a recoverer every 2 s with a 1 s grace, for the
            # recovery itself (out of active, into retry) and for the re-run's start, which
            # also waits for the forwarder (every 5 s) to move it from retry to pending.
            "recovered_within_35s": recovered["max"] is None or recovered["max"] <= 35.0,
            "rerun_started_within_35s": wait["max"] is None or wait["max"] <= 35.0,
            "orphan_leases": snap["orphan_leases"],
            "submit_s": round(submit_end - started, 1),
            "settle_after_last_kill_s": (round(settled_at - last_kill, 1)
                                         if settled_at else None),
            "settled_within_deadline": settled_at is not None,
            "duration_s": round(duration, 1),
            "completed_per_s": round(completed / duration, 1),
        }
        figures["ok"] = (figures["lost"] == 0 and figures["stuck_active"] == 0
                         and figures["ran_but_not_recorded_completed"] == 0
                         and figures["settled_within_deadline"]
                         and figures["completed_without_script_end"] == 0)
        return figures


# ================================================================ Sentinel failover drill
@dataclass
class Post:
    sent: float
    done: float | None = None
    status: int | None = None
    task_id: str | None = None
    error: str | None = None


@dataclass
class SentinelSetup:
    tmp: Path
    master: RedisProcess = field(init=False)
    replica: RedisProcess = field(init=False)
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.master = RedisProcess().start()
        self.replica = RedisProcess(
            extra_args=("--replicaof", "127.0.0.1", str(self.master.port))).start()
        binary = find_redis_server()
        for i in range(3):
            port = free_port()
            conf = self.tmp / f"sentinel{i}.conf"
            # Sentinel rewrites its config file, so each gets its own writable one. Quorum 2
            # of 3; a master silent for 1 s is down (the default, 30 s, would make the
            # drill mostly waiting).
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.tmp}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 10000\n"
                "sentinel parallel-syncs mymaster 1\n")
            log = (self.tmp / f"sentinel{i}.log").open("wb")
            self.sentinels.append(subprocess.Popen([binary, str(conf), "--sentinel"],
                                                   stdout=log, stderr=subprocess.STDOUT))
            log.close()
            self.sentinel_ports.append(port)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Every sentinel knows the replica and both other sentinels, and the replica is in
        sync: only then is a failover possible at once."""
        import redis as sync_redis

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ready = True
                for port in self.sentinel_ports:
                    with sync_redis.Redis(port=port, socket_timeout=1,
                                          decode_responses=True) as sentinel:
                        master = sentinel.sentinel_master("mymaster")
                        replicas = sentinel.sentinel_slaves("mymaster")
                        ready = ready and master["num-other-sentinels"] == 2 and any(
                            r["master-link-status"] == "ok" for r in replicas)
                with sync_redis.Redis(port=self.replica.port, decode_responses=True) as rep:
                    ready = ready and rep.info("replication")["master_link_status"] == "up"
                if ready:
                    return
            except (sync_redis.RedisError, OSError, KeyError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the Sentinel setup was not ready within {timeout_s} s")

    def master_port(self) -> int | None:
        import redis as sync_redis

        for port in self.sentinel_ports:
            try:
                with sync_redis.Redis(port=port, socket_timeout=0.5) as sentinel:
                    addr = sentinel.sentinel_get_master_addr_by_name("mymaster")
                    if addr:
                        return int(addr[1])
            except (sync_redis.RedisError, OSError):
                continue
        return None

    def stop(self) -> None:
        """Whatever of the setup got started (a failed start stops the rest too)."""
        for proc in self.sentinels:
            stop_process(proc, timeout_s=10)
        for name in ("replica", "master"):
            node: RedisProcess | None = getattr(self, name, None)
            if node is not None:
                node.stop()


class SentinelDrill:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.posts: list[Post] = []
        self.killed_at: float | None = None
        self.failover_at: float | None = None

    async def run(self) -> dict[str, Any]:
        args = self.args
        write_tasks(self.tmp)
        setup = SentinelSetup(self.tmp)
        api: subprocess.Popen[bytes] | None = None
        try:
            setup.start()
            await asyncio.to_thread(setup.wait_ready)
            old_master = setup.master.port
            api, url = self._start_api(setup)
            await asyncio.to_thread(wait_http, url + "/health/ready", api)
            say(f"sentinel drill: POST /tasks/{TASK} at {args.post_rate:g}/s, master "
                f"{old_master}, replica {setup.replica.port}")
            await self._load(url, setup)
            new_master = await asyncio.to_thread(setup.master_port)
            lost, checked = await self._check_on(new_master)
        finally:
            if api is not None:
                await asyncio.to_thread(stop_process, api, 30)
            await asyncio.to_thread(setup.stop)
        return self._figures(old_master, new_master, setup.replica.port, lost, checked)

    def _start_api(self, setup: SentinelSetup) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        env = service_env(
            self.tmp, AQSH_MODE="api", AQSH_BIND=f"127.0.0.1:{port}",
            AQSH_REDIS_SENTINEL_ADDRS=",".join(f"127.0.0.1:{p}" for p in setup.sentinel_ports),
            AQSH_REDIS_SENTINEL_MASTER="mymaster",
            AQSH_SUBMIT_RETRY=f"{round(self.args.submit_retry_s * 1000)}ms")
        log = (self.tmp / "api.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve", "--mode", "api"],
                                env=env, stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        return proc, f"http://127.0.0.1:{port}"

    async def _load(self, url: str, setup: SentinelSetup) -> None:
        """POSTs every 1/rate s, each on its own (a request waiting out the failover does not
        hold the rate back); the master dies after ``--steady-s``; the load goes on until
        submissions have succeeded again for ``--after-s`` (at most 60 s after the kill)."""
        args = self.args
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=500)
        inflight: set[asyncio.Task[None]] = set()
        watcher: asyncio.Task[None] | None = None
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            t0 = time.monotonic()
            i = 0
            while True:
                delay = t0 + i / args.post_rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                i += 1
                now = time.time()
                if self.killed_at is None and self.posts and (
                        now - self.posts[0].sent >= args.steady_s):
                    self.killed_at = time.time()
                    setup.master.kill()
                    say("master SIGKILLed")
                    watcher = asyncio.create_task(self._watch_failover(setup))
                if self.killed_at is not None:
                    first = self._first_success_after_kill()
                    if (first is not None and now - first >= args.after_s) or (
                            now - self.killed_at > 60):
                        break
                post = Post(sent=now)
                self.posts.append(post)
                task = asyncio.create_task(self._post(session, url, post))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            await asyncio.gather(*inflight)
        if watcher is not None:
            await watcher

    def _first_success_after_kill(self) -> float | None:
        assert self.killed_at is not None
        done = [p.done for p in self.posts
                if p.status == 202 and p.done is not None and p.sent >= self.killed_at]
        return min(done) if done else None

    async def _watch_failover(self, setup: SentinelSetup) -> None:
        old = setup.master.port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            port = await asyncio.to_thread(setup.master_port)
            if port is not None and port != old:
                self.failover_at = time.time()
                say(f"sentinels name {port} the master after "
                    f"{self.failover_at - (self.killed_at or 0):.2f} s")
                return
            await asyncio.sleep(0.05)

    async def _post(self, session: aiohttp.ClientSession, url: str, post: Post) -> None:
        try:
            async with session.post(f"{url}/tasks/{TASK}", json={}) as resp:
                body = await resp.read()
                post.status = resp.status
                if resp.status == 202:
                    post.task_id = json.loads(body)["id"]
                elif len(self.posts) < 100_000:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        post.error = json.loads(body)["error"]["code"]
        except (aiohttp.ClientError, TimeoutError) as exc:
            post.error = type(exc).__name__
        post.done = time.time()

    async def _check_on(self, port: int | None) -> tuple[list[str], int]:
        """Every 202's task hash must be on the master the sentinels name now."""
        accepted = [p.task_id for p in self.posts if p.status == 202 and p.task_id]
        if port is None:
            return accepted, 0
        q = keys.queue_keys(QUEUE)
        redis = aioredis.Redis(port=port)
        lost: list[str] = []
        try:
            for start in range(0, len(accepted), 1000):
                chunk = accepted[start:start + 1000]
                async with redis.pipeline(transaction=False) as pipe:
                    for task_id in chunk:
                        pipe.exists(q.task(task_id))
                    found = await pipe.execute()
                lost += [tid for tid, ok in zip(chunk, found, strict=True) if not ok]
        finally:
            await redis.aclose()
        return lost, len(accepted)

    def _figures(self, old_master: int, new_master: int | None, replica: int,
                 lost: list[str], checked: int) -> dict[str, Any]:
        kill = self.killed_at or 0.0
        statuses = Counter(str(p.status) if p.status else (p.error or "none")
                           for p in self.posts)
        after = [p for p in self.posts if p.sent >= kill]
        first = self._first_success_after_kill()
        ok_done = sorted(p.done for p in self.posts if p.status == 202 and p.done)
        gaps = [b - a for a, b in itertools.pairwise(ok_done)]
        spanning = [b - a for a, b in itertools.pairwise(ok_done)
                    if a <= kill + 1 and b >= kill]
        latencies_during = [p.done - p.sent for p in after if p.status == 202 and p.done]
        failover_s = self.failover_at - kill if self.failover_at else None
        to_success = first - kill if first else None
        figures: dict[str, Any] = {
            "drill": "sentinel_failover",
            "post_rate_per_s": self.args.post_rate,
            "submit_retry_s": self.args.submit_retry_s,
            "posts": len(self.posts),
            "accepted": checked,
            "lost": len(lost),
            "lost_ids": lost[:10],
            "status_counts": dict(statuses),
            "rejected_503": sum(1 for p in self.posts if p.status == 503),
            "rejected_503_after_kill": sum(1 for p in after if p.status == 503),
            "other_failures": sum(1 for p in self.posts if p.status not in (202, 503)),
            "promoted_replica": new_master == replica,
            "old_master_port": old_master,
            "new_master_port": new_master,
            "sentinel_failover_s": round(failover_s, 3) if failover_s else None,
            "time_to_submissions_succeed_s": round(to_success, 3) if to_success else None,
            "longest_gap_between_202s_s": round(max(spanning or gaps or [0.0]), 3),
            "max_latency_202_after_kill_s": summary(latencies_during)["max"],
            "p50_latency_202_after_kill_s": summary(latencies_during)["p50"],
            "recovery_over_failover_ratio": (round(to_success / failover_s, 3)
                                             if to_success and failover_s else None),
        }
        figures["ok"] = figures["lost"] == 0 and figures["promoted_replica"] and (
            to_success is not None)
        return figures


# ================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drill", choices=("kill", "sentinel", "all"), default="all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, runs)")
    kill = parser.add_argument_group("kill/restart drill")
    kill.add_argument("--tasks", type=int, default=10_000)
    kill.add_argument("--rate", type=float, default=200.0, help="submissions per second")
    kill.add_argument("--workers", type=int, default=3)
    kill.add_argument("--concurrency", type=int, default=10, help="per worker")
    kill.add_argument("--task-sleep-s", type=float, default=0.05,
                      help="how long each script sleeps between its two lines")
    kill.add_argument("--kill-every-s", type=float, default=2.0)
    kill.add_argument("--redis-down-s", type=float, default=1.0,
                      help="how long Redis stays dead before its restart")
    kill.add_argument("--no-redis-kill", action="store_true")
    kill.add_argument("--appendfsync", choices=("everysec", "always", "off"),
                      default="everysec",
                      help="AOF fsync policy; off: no persistence (the drill's self-check: "
                           "the restarted Redis is empty, so it must report lost tasks)")
    kill.add_argument("--settle-deadline-s", type=float, default=120.0,
                      help="after the last kill, every task must be finished within this")
    sentinel = parser.add_argument_group("Sentinel drill")
    sentinel.add_argument("--post-rate", type=float, default=50.0, help="POSTs per second")
    sentinel.add_argument("--steady-s", type=float, default=3.0,
                          help="load before the master is killed")
    sentinel.add_argument("--after-s", type=float, default=5.0,
                          help="load after submissions succeed again")
    sentinel.add_argument("--submit-retry-s", type=float, default=5.0,
                          help="AQSH_SUBMIT_RETRY of the API process (its default: 5 s)")
    return parser.parse_args(argv)


async def run_drill(name: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"aqsh-chaos-{name}-"))
    try:
        if name == "kill":
            return await KillDrill(args, tmp).run()
        return await SentinelDrill(args, tmp).run()
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = ["kill", "sentinel"] if args.drill == "all" else [args.drill]
    results = {name: asyncio.run(run_drill(name, args)) for name in names}
    ok = all(result["ok"] for result in results.values())
    if len(results) == 1:
        figures = next(iter(results.values()))
    else:
        figures = {"drill": "all", "ok": ok, "kill_restart": results["kill"],
                   "sentinel_failover": results["sentinel"]}
    _common.report("chaos", figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
