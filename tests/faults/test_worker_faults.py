"""Faults from Redis itself, against a real worker: OOM, MISCONF, READONLY, BUSY, NOPERM, LOADING.

For each fault and on both transports (redis-py and the broker's fast lane), the worker's
fetcher and heartbeat must record the fault (so ``/health/ready`` reports it), keep trying, and
once the fault clears: run a task enqueued afterwards within 10 s, finish a task whose
acknowledgement fell into the fault without running it twice, leave no task active without a
lease, and report ready again. Each test has a private ``redis-server`` because it changes the
server's configuration (and, for LOADING and READONLY, its role or its life).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.engine.faults import Loops
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from aqsh.redis_process import RedisProcess, server_version
from tests.support import wait_until

Q = keys.queue_keys("default")
FAULTS = ["oom", "misconf", "readonly", "busy", "noperm", "loading"]


@dataclass
class Rig:
    """One fault on one private Redis: ``client`` is what the worker uses, ``admin`` a
    privileged connection for injecting and clearing the fault."""

    kind: str
    primary: RedisProcess
    admin: aioredis.Redis
    client: aioredis.Redis
    #: What the worker's client connects to (with the ACL user's credentials for NOPERM).
    url: str
    cleanup: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    spare: RedisProcess | None = None
    busy: asyncio.Task[Any] | None = None
    tmp: str = ""

    async def inject(self) -> None:
        admin = self.admin
        if self.kind == "oom":
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)
        elif self.kind == "misconf":
            # A save that fails (its directory is gone) with stop-writes-on-bgsave-error: Redis
            # refuses writes until a save succeeds again.
            gone = Path(self.tmp) / "gone"
            gone.mkdir()
            await admin.config_set("stop-writes-on-bgsave-error", "yes")
            await admin.config_set("save", "3600 1")  # the rule applies only with save points
            await admin.config_set("dir", str(gone))
            gone.rmdir()
            await admin.bgsave()
            await wait_until(lambda: self._bgsave_status("err"), message="failed bgsave")
        elif self.kind == "readonly":
            # A failover seen from a worker that stays on the old primary: a copy of the data
            # is promoted elsewhere and our node is made a replica of it.
            assert self.spare is not None
            async with aioredis.Redis(port=self.spare.port) as spare:
                await spare.replicaof("127.0.0.1", self.primary.port)
                await wait_until(lambda: self._in_sync(spare), message="spare synced")
                await spare.replicaof("NO", "ONE")
            await admin.replicaof("127.0.0.1", self.spare.port)
            await wait_until(lambda: self._in_sync(admin), message="demoted and synced")
        elif self.kind == "busy":
            await admin.config_set("lua-time-limit", 50)
            self.busy = asyncio.create_task(self._long_script())
            await wait_until(self._answers_busy, message="script running, Redis busy")
        elif self.kind == "noperm":
            await admin.execute_command("ACL", "SETUSER", "worker", "-@scripting")
        elif self.kind == "loading":
            await self._restart_loading()
        else:
            raise AssertionError(self.kind)

    async def clear(self) -> None:
        admin = self.admin
        if self.kind == "oom":
            await admin.config_set("maxmemory", 0)
        elif self.kind == "misconf":
            await admin.config_set("dir", self.tmp)
            await admin.bgsave()
            await wait_until(lambda: self._bgsave_status("ok"), message="good bgsave")
        elif self.kind == "readonly":
            await admin.replicaof("NO", "ONE")
        elif self.kind == "busy":
            assert self.busy is not None
            await asyncio.wait_for(self.busy, 30)  # the script ends by itself
        elif self.kind == "noperm":
            await admin.execute_command("ACL", "SETUSER", "worker", "+@all")
        elif self.kind == "loading":
            await wait_until(self._loaded, timeout_s=60, message="load finished")

    async def _bgsave_status(self, want: str) -> bool:
        info = await self.admin.info("persistence")
        return bool(info.get("rdb_last_bgsave_status") == want
                    and not info.get("rdb_bgsave_in_progress"))

    @staticmethod
    async def _in_sync(node: aioredis.Redis) -> bool:
        info = await node.info("replication")
        return bool(info.get("role") == "slave" and info.get("master_link_status") == "up"
                    and not info.get("master_sync_in_progress"))

    async def _long_script(self) -> None:
        """A read-only script that spins for 3–4 s: every other client gets BUSY meanwhile."""
        async with aioredis.Redis(port=self.primary.port, socket_timeout=30) as conn:
            await conn.eval(
                "local t = tonumber(redis.call('TIME')[1]) "
                "while tonumber(redis.call('TIME')[1]) < t + 4 do end return 1", 0)

    async def _answers_busy(self) -> bool:
        async with aioredis.Redis(port=self.primary.port) as probe:
            try:
                await probe.get("probe")
            except aioredis.ResponseError as exc:
                return str(exc).startswith("BUSY")
        return False

    async def _restart_loading(self) -> None:
        """Restart with enough data and a per-key load delay that loading takes seconds."""
        # Redis answers clients (with LOADING) only between 2 MB chunks of the file (6.2 has
        # no setting for it): incompressible values make the file 20 MB.
        pipe = self.admin.pipeline(transaction=False)
        for i in range(20_000):
            pipe.set(f"filler:{i}", os.urandom(1000))
        await pipe.execute()
        await self.admin.save()
        self.primary.stop_keep_data()
        command = self.primary.command()
        command[command.index("--save") + 1] = "3600 1"
        command += ["--key-load-delay", "150", "--dbfilename", "dump.rdb"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.primary._proc = proc  # stopped with the rig
        await wait_until(self._answers_loading, message="restart began loading")

    async def _answers_loading(self) -> bool:
        # No retries (redis-py's default retries LOADING until the load ends), and not PING,
        # which Redis answers while loading.
        async with aioredis.Redis(port=self.primary.port, retry=Retry(NoBackoff(), 0)) as probe:
            try:
                await probe.get("filler:0")
            except aioredis.BusyLoadingError:
                return True
            except aioredis.ConnectionError:
                return False
        return False

    async def _loaded(self) -> bool:
        try:
            return bool(await self.admin.get("filler:0"))
        except (aioredis.BusyLoadingError, aioredis.ConnectionError):
            return False


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    kind = request.param
    tmp = tempfile.mkdtemp(prefix="aqsh-fault-")
    extra: tuple[str, ...] = ()
    if kind == "loading":
        extra = ("--dbfilename", "dump.rdb")
    if kind == "misconf" and server_version() >= (7,):
        # The drill moves ``dir`` with CONFIG SET, which Redis >= 7 and Valkey allow only
        # when the server opts in (6.2 has no such guard and would refuse the option).
        extra = ("--enable-protected-configs", "local")
    primary = RedisProcess(data_dir=tmp + "/data", extra_args=extra).start()
    spare = RedisProcess().start() if kind == "readonly" else None
    admin = aioredis.Redis(port=primary.port, socket_timeout=30)
    url = primary.url
    if kind == "noperm":
        await admin.execute_command("ACL", "SETUSER", "worker", "on", ">pw", "~*", "&*",
                                    "+@all")
        url = url.replace("redis://", "redis://worker:pw@")
    client = create_client(RedisSettings(url=url))  # the worker's client, as aqsh serve makes it
    assert isinstance(client, aioredis.Redis)
    r = Rig(kind, primary, admin, client, url, spare=spare, tmp=tmp)
    try:
        yield r
    finally:
        if r.busy is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.busy, 30)
        await client.aclose()
        await admin.aclose()
        primary.stop()
        if spare is not None:
            spare.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _no_active_without_lease(redis: aioredis.Redis) -> None:
    active = set(await redis.lrange(Q.active, 0, -1))
    leased = set(await redis.zrange(Q.lease, 0, -1))
    assert active <= leased, f"active without a lease: {active - leased}"


@pytest.mark.parametrize("fast_lane", [False, True], ids=["redis-py", "fast-lane"])
@pytest.mark.parametrize("rig", FAULTS, indirect=True)
async def test_worker_rides_out_a_redis_fault(rig: Rig, fast_lane: bool) -> None:
    runs: dict[str, int] = {}
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        runs[task.id] = runs.get(task.id, 0) + 1
        if task.type == "held":
            started.set()
            await release.wait()
        return None

    loops = Loops()
    broker = RedisBroker(rig.client, fast_lane=fast_lane)
    server = Server(broker, handler, queues={"default": 1}, loops=loops, poll_interval_s=0.2,
                    heartbeat_interval_s=0.3, forward_interval_s=0.5)
    client = Client(RedisBroker(rig.admin))
    await server.start()
    try:
        held = None
        if rig.kind != "readonly":  # a demotion resyncs the node: writes in flight are lost
            held = await client.enqueue("held", b"", queue="default", retention=3600)
            await wait_until(started.wait, message="held task running")

        await rig.inject()
        monitors = loops.monitors
        await wait_until(lambda: monitors["fetcher"].consecutive_errors > 0,
                         message="fetcher saw the fault")
        await wait_until(lambda: monitors["heartbeat"].consecutive_errors > 0,
                         message="heartbeat saw the fault")
        ready, live, detail = loops.report()
        assert not ready, detail
        assert live, detail
        expected_kind = {"loading": {"loading", "connection"}}.get(rig.kind, {rig.kind})
        assert monitors["fetcher"].last_kind in expected_kind
        if held is not None:
            release.set()  # its acknowledgement falls into the fault
            if rig.kind == "noperm":
                # (Redis 6.2 lets a script that has already written go on writing under OOM,
                # so there the ack may well succeed; a missing permission always refuses it.)
                await wait_until(lambda: monitors["acks"].errors_by_kind, message="ack failed")

        await rig.clear()
        after = await client.enqueue("after", b"", queue="default", retention=3600)
        await wait_until(lambda: runs.get(after.id) == 1, timeout_s=10,
                         message="task after the fault ran")
        if held is not None:
            completed = await wait_until(
                lambda: rig.admin.zscore(Q.completed, held.id), timeout_s=10,
                message="held task acknowledged")
            assert completed
            assert runs[held.id] == 1
        await wait_until(lambda: loops.report()[0], timeout_s=10,
                         message=f"ready again ({loops.report()[2]})")
        await _no_active_without_lease(rig.admin)
        assert await rig.admin.llen(Q.pending) == 0
    finally:
        release.set()
        await server.stop(shutdown_timeout_s=1)
        await broker.close_fast_lane()
        await client.aclose()


@pytest.mark.parametrize("rig", ["oom", "noperm"], indirect=True)
async def test_scheduler_keeps_firing_after_a_redis_fault(rig: Rig) -> None:
    from aqsh.engine.scheduler import PeriodicTask, Scheduler

    loops = Loops()
    scheduler = Scheduler(RedisBroker(rig.client), heartbeat_interval_s=0.3, loops=loops)
    scheduler.register(PeriodicTask(spec="@every 1s", type="tick", payload=b"",
                                    queue="default", retention_s=3600))
    await rig.inject()
    await scheduler.start()
    try:
        monitor = loops.monitors["scheduler"]
        await wait_until(lambda: monitor.consecutive_errors > 0, message="scheduler saw it")
        assert not loops.report()[0]
        await rig.clear()
        async def fired() -> int:
            return int(await rig.admin.llen(Q.pending))

        await wait_until(fired, timeout_s=10, message="a fire stored after the fault")
        await wait_until(lambda: loops.report()[0], timeout_s=10, message="ready again")
    finally:
        await scheduler.stop()
