"""Concurrency limits across real worker processes (``aqsh serve --mode worker``) on a real
Redis, checked from the scripts' own start and end timestamps.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from aqsh.engine import flow, keys
from aqsh.engine.broker import LEASE_DURATION_S
from aqsh.engine.client import Client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskState
from aqsh.redis_process import free_port
from aqsh.runner.spec import TaskSpec, flow_headers, load_tasks
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]

TASKS_YAML = """
tasks:
  deploy:
    script: deploy.sh
    max_retry: 0
    timeout: 15m
    concurrency: {limit: 1, key: "{environment}"}
    input:
      - {name: environment, env: ENVIRONMENT, required: true, type: string}
      - {name: out, env: OUT_DIR, required: true, type: string}
      - {name: seconds, env: HOLD_S, type: float, default: 0.02}
      - {name: barrier, env: BARRIER, type: int, default: 0}
      - {name: gate, env: GATE, type: string, default: ""}
  ping:
    script: deploy.sh
    max_retry: 0
    rate_limit: {limit: 2, per: 4s}
    input:
      - {name: out, env: OUT_DIR, required: true, type: string}
      - {name: seconds, env: HOLD_S, type: float, default: 0}
      - {name: barrier, env: BARRIER, type: int, default: 0}
"""

#: Writes its own start and end times (ns). With a barrier it waits (60 s at most) until that
#: many runs have started: runs that may not overlap never pass it. With a gate it waits
#: (120 s at most) until that file exists.
DEPLOY_SH = """\
#!/bin/sh
echo "$(date +%s%N)" > "$OUT_DIR/$AQSH_TASK_ID.start"
if [ "$BARRIER" -gt 0 ]; then
  i=0
  while [ "$(ls "$OUT_DIR" | grep -c '\\.start$')" -lt "$BARRIER" ] && [ $i -lt 600 ]; do
    sleep 0.1; i=$((i + 1))
  done
fi
if [ -n "$GATE" ]; then
  i=0
  while [ ! -e "$GATE" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
fi
sleep "$HOLD_S"
echo "$(date +%s%N)" > "$OUT_DIR/$AQSH_TASK_ID.end"
"""


class Rig:
    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp, self.redis_url = tmp, redis_url
        scripts = tmp / "scripts"
        scripts.mkdir()
        (scripts / "deploy.sh").write_text(DEPLOY_SH)
        (scripts / "deploy.sh").chmod(0o755)
        self.config = tmp / "tasks.yaml"
        self.config.write_text(textwrap.dedent(TASKS_YAML))
        self.scripts = scripts
        loaded = load_tasks(self.config, scripts).tasks
        self.spec: TaskSpec = loaded["deploy"]
        self.ping: TaskSpec = loaded["ping"]
        self.out = tmp / "out"
        self.out.mkdir()
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        env = {**os.environ, "AQSH_REDIS_ADDR": self.redis_url,
               "AQSH_TASKS_CONFIG": str(self.config), "AQSH_TASKS_DIR": str(self.scripts),
               "AQSH_BIND": f"127.0.0.1:{free_port()}",
               "AQSH_RESULTS_DIR": str(self.tmp / f"work{n}"), "AQSH_LOG_FORMAT": "json",
               "AQSH_SCHEDULER": "false"}
        with (self.tmp / f"worker{n}.log").open("wb") as log:
            # Its own session: a SIGKILL to the group takes the running scripts too.
            proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve", "--mode", "worker"],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.workers.append(proc)
        return proc

    async def submit(self, client: Client, task_id: str, environment: str,
                     **extra: object) -> None:
        values = {"environment": environment, "out": str(self.out), **extra}
        await client.enqueue("deploy", msgspec.json.encode(values), queue="default",
                             max_retry=0, task_id=task_id,
                             headers=flow_headers(self.spec, values))

    async def submit_ping(self, client: Client, task_id: str) -> None:
        values = {"out": str(self.out)}
        await client.enqueue("ping", msgspec.json.encode(values), queue="default",
                             max_retry=0, task_id=task_id,
                             headers=flow_headers(self.ping, values))

    def times(self, task_id: str) -> tuple[int, int] | None:
        start, end = self.out / f"{task_id}.start", self.out / f"{task_id}.end"
        if not end.exists():
            return None
        return int(start.read_text()), int(end.read_text())

    def started(self, task_id: str) -> bool:
        return (self.out / f"{task_id}.start").exists()

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def rig(tmp_path: Path, redis_url: str, redis: aioredis.Redis) -> Iterator[Rig]:
    made = Rig(tmp_path, redis_url)
    try:
        yield made
    finally:
        made.stop()


async def test_runs_of_one_key_never_overlap_and_start_in_submission_order(
        rig: Rig, redis: aioredis.Redis) -> None:
    for _ in range(3):
        rig.start_worker()
    ids = [f"prod-{n:02d}" for n in range(50)]
    async with Client(redis) as client:
        # The first holds the slot until the gate opens, so the others all meet a busy key.
        gate = rig.tmp / "gate"
        await rig.submit(client, ids[0], "prod", gate=str(gate))
        await wait_until(lambda: rig.started(ids[0]), timeout_s=60, interval_s=0.05,
                         message="the first deploy started")
        for task_id in ids[1:]:
            await rig.submit(client, task_id, "prod")

    async def second_waits() -> bool:
        held = (await flow.waiting_many(redis, [("default", ids[1])]))[0]
        return held is not None and (held.reason, held.key) == ("concurrency", "deploy:prod")

    await wait_until(second_waits, timeout_s=60, interval_s=0.05,
                     message="the second deploy waiting")

    async def all_in_line() -> bool:
        line = keys.flow_wait_key("default", "deploy:prod")
        return int(await redis.zcard(line)) == len(ids) - 1

    await wait_until(all_in_line, timeout_s=60, interval_s=0.05, message="49 runs in line")
    gate.touch()
    assert await wait_until(lambda: all(rig.times(i) for i in ids), timeout_s=240,
                            interval_s=0.2, message="all 50 deploys ended")
    runs = [(rig.times(i), i) for i in ids]
    spans = sorted((t, i) for t, i in runs if t is not None)
    for (before, first), (after, second) in itertools.pairwise(spans):
        assert after[0] >= before[1], f"{first} and {second} overlapped: {spans}"
    assert [i for _, i in spans] == ids, f"not in submission order: {spans}"
    # Nothing is left holding or waiting.
    assert await redis.zcard(keys.flow_slots_key("default", "deploy:prod")) == 0
    assert await redis.zcard(keys.flow_wait_key("default", "deploy:prod")) == 0


async def test_different_keys_run_in_parallel(rig: Rig, redis: aioredis.Redis) -> None:
    for _ in range(2):
        rig.start_worker()
    envs = ["dev", "staging", "prod"]
    async with Client(redis) as client:
        for env in envs:
            await rig.submit(client, env, env, barrier=3)
        await rig.submit(client, "prod-again", "prod", barrier=3)  # same key as "prod"
    ids = [*envs, "prod-again"]
    await wait_until(lambda: all(rig.times(i) for i in ids), timeout_s=120, interval_s=0.2,
                     message="the four deploys ended")
    spans = {i: rig.times(i) for i in ids}
    starts = [s[0] for e, s in spans.items() if s is not None and e in envs]
    ends = [s[1] for e, s in spans.items() if s is not None and e in envs]
    # Each passed the barrier: all three environments had started before any ended ...
    assert max(starts) < min(ends)
    # ... while the two prod deploys did not overlap (which one went first is a race: both
    # met a free slot at once).
    prod, again = spans["prod"], spans["prod-again"]
    assert prod is not None
    assert again is not None
    assert again[0] >= prod[1] or prod[0] >= again[1]


async def test_a_killed_slot_holder_frees_its_slot_after_the_lease(
        rig: Rig, redis: aioredis.Redis) -> None:
    first = rig.start_worker()
    async with Client(redis) as client:
        await rig.submit(client, "holder", "prod", seconds=600)
        await wait_until(lambda: rig.started("holder"), timeout_s=60, interval_s=0.05,
                         message="the holder running")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        await rig.submit(client, "next", "prod")
    rig.start_worker()
    inspector = Inspector(redis)

    async def next_waits() -> bool:
        info = await inspector.find_task("next", ["default"])
        return info.state is TaskState.SCHEDULED

    # The new worker meets a slot whose holder's lease is still live: the run waits.
    await wait_until(next_waits, timeout_s=30, interval_s=0.1, message="the run held")
    assert not rig.started("next")
    # Once the lease lapses the slot is freed and the waiter runs (the dead holder is
    # recovered: archived, as it has no retries left).
    await wait_until(lambda: rig.times("next") is not None,
                     timeout_s=LEASE_DURATION_S + 90, interval_s=0.2,
                     message="the waiter ran after the lease")
    # The slot is freed as soon as the lease lapses; the recoverer takes the holder back a
    # grace second later, on its own 2 s round, so that may come after the waiter started.
    async def holder_recovered() -> bool:
        holder = await inspector.find_task("holder", ["default"])
        return holder.state in (TaskState.ARCHIVED, TaskState.RETRY)

    await wait_until(holder_recovered, timeout_s=60, interval_s=0.2,
                     message="the dead holder recovered")


async def test_a_rate_window_admits_its_limit_and_delays_the_rest(
        rig: Rig, redis: aioredis.Redis) -> None:
    """2 runs per 4 s window: 5 runs need three windows, so the fifth starts at least a whole
    window after the first (all five start within a second without the limit)."""
    for _ in range(2):
        rig.start_worker()
    ids = [f"ping-{n}" for n in range(5)]
    async with Client(redis) as client:
        for task_id in ids:
            await rig.submit_ping(client, task_id)

    async def some_wait_for_the_window() -> bool:
        held = await flow.waiting_many(redis, [("default", i) for i in ids])
        return sum(1 for w in held if w is not None and w.reason == "rate") >= 1

    await wait_until(some_wait_for_the_window, timeout_s=30, interval_s=0.02,
                     message="runs delayed by the window")
    await wait_until(lambda: all(rig.times(i) for i in ids), timeout_s=120, interval_s=0.2,
                     message="all five ran")
    starts = sorted(t[0] for t in (rig.times(i) for i in ids) if t is not None)
    assert len(starts) == 5
    # Not failed, delayed: every run completed (its end time is there) ...
    # ... and the fifth started at least one window (less a second of start-up) after the first.
    assert starts[4] - starts[0] >= 3 * 1_000_000_000
