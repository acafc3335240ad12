"""A real worker process (``python -m aqsh serve --mode worker``) for attacks by scripts: started
as an unprivileged user when the tests run as root, so that what a same-uid script can or cannot
do is what an ordinary deployment sees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis.asyncio as aioredis

from aqsh.engine import keys
from aqsh.engine.client import Client
from aqsh.redis_process import RedisProcess, free_port
from tests.support import wait_until, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-redis-password-for-tests"
NOBODY = (65534, 65534)


@pytest.fixture(scope="session")
def password_redis() -> Iterator[RedisProcess]:
    """A Redis that requires a password, so the worker really holds one a script could steal."""
    with RedisProcess(extra_args=("--requirepass", PASSWORD)) as server:
        yield server


@pytest.fixture
async def secured_redis(password_redis: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(password_redis.url, password=PASSWORD)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    base: Path
    port: int
    redis: aioredis.Redis
    log_path: Path
    out: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def run(self, name: str, payload: dict[str, Any] | None = None,
                  timeout_s: float = 60) -> dict[str, Any]:
        """Enqueue ``name``, wait for it to finish (completed or archived), return its result."""
        info = await Client(self.redis).enqueue(name, json.dumps(payload or {}).encode(),
                                                max_retry=0, retention=600)
        q = keys.queue_keys("default")

        async def finished() -> bool:
            return bool(await self.redis.zscore(q.completed, info.id) is not None
                        or await self.redis.zscore(q.archived, info.id) is not None)

        await wait_until(finished, timeout_s=timeout_s, interval_s=0.05,
                         message=f"task {name} finished; worker log:\n{self.log()[-3000:]}")
        raw = await self.redis.hget(q.task(info.id), "result")
        assert raw is not None, self.log()[-3000:]
        result: dict[str, Any] = json.loads(raw)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WorkerFactory(Protocol):
    async def __call__(self, scripts: dict[str, str], *, user: tuple[int, int] | None = ...,
                       env: dict[str, str] | None = ..., wrapper: list[str] | None = ...,
                       password_file: bool = ..., no_password: bool = ...) -> Worker: ...


@dataclass
class _Started:
    workers: list[Worker] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)


def unprivileged() -> tuple[int, int] | None:
    """The uid/gid to run the worker as: nobody when the tests run as root (a root worker's
    scripts hold CAP_SYS_PTRACE, so nothing of this would be meaningful), else ourselves."""
    return NOBODY if os.geteuid() == 0 else None


def setpriv(user: tuple[int, int]) -> list[str]:
    tool = shutil.which("setpriv")
    if tool is None:
        pytest.skip("util-linux setpriv is needed to run the worker as another user")
    return [tool, f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", "--"]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
async def start_worker(
    password_redis: RedisProcess, secured_redis: aioredis.Redis
) -> AsyncIterator[WorkerFactory]:
    started = _Started()

    async def factory(scripts: dict[str, str], *, user: tuple[int, int] | None = None,
                      env: dict[str, str] | None = None, wrapper: list[str] | None = None,
                      password_file: bool = False, no_password: bool = False) -> Worker:
        # Under /tmp, not pytest's tmp_path: an unprivileged worker must be able to reach it.
        base = Path(tempfile.mkdtemp(prefix="aqsh-security-"))
        started.dirs.append(base)
        base.chmod(0o755)
        script_dir = base / "scripts"
        script_dir.mkdir(mode=0o755)
        lines = ["defaults: {timeout: 1m, max_retry: 0, retry_delay: 1s}", "tasks:"]
        for name, body in scripts.items():
            path = script_dir / f"{name}.sh"
            path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
            path.chmod(0o755)
            lines.append(f"  {name}:")
            lines.append(f"    script: {name}.sh")
        (base / "tasks.yaml").write_text("\n".join(lines) + "\n")
        work = base / "work"
        work.mkdir(mode=0o700)
        out = base / "out"  # where scripts leave side effects for the test to look at
        out.mkdir()
        out.chmod(0o1777)
        if user is not None:
            os.chown(work, *user)
        port = free_port()
        worker_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "PYTHONPATH": str(ROOT), "AQSH_REDIS_ADDR": password_redis.url,
            "AQSH_TASKS_CONFIG": str(base / "tasks.yaml"), "AQSH_TASKS_DIR": str(script_dir),
            "AQSH_RESULTS_DIR": str(work), "AQSH_BIND": f"127.0.0.1:{port}",
            "AQSH_LOG_FORMAT": "json", "AQSH_SCHEDULER": "false", "AQSH_KILL_GRACE": "1s",
            "AQSH_SHUTDOWN_TIMEOUT": "2s", "OUT": str(out),
            # What scripts may see of the worker's environment (CANARY, for one, is not).
            "AQSH_ENV_ALLOWLIST": "PATH,LANG,HOME,TZ,OUT,SECRET_PATTERN",
        }
        if password_file:
            secret = base / "redis-password"
            secret.write_text(PASSWORD + "\n")
            secret.chmod(0o400)
            if user is not None:
                os.chown(secret, *user)
            worker_env["AQSH_REDIS_PASSWORD_FILE"] = str(secret)
        elif not no_password:
            worker_env["AQSH_REDIS_PASSWORD"] = PASSWORD
        worker_env.update(env or {})
        argv = [sys.executable, "-m", "aqsh", "serve", "--mode", "worker"]
        prefix = list(wrapper or [])
        if user is not None:
            prefix = setpriv(user) + prefix
        log_path = base / "worker.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(prefix + argv, env=worker_env, cwd=base,
                                    stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT)
        worker = Worker(proc=proc, base=base, port=port, redis=secured_redis, log_path=log_path,
                        out=out)
        started.workers.append(worker)
        wait_until_sync(lambda: proc.poll() is not None or _ready(port), timeout_s=60,
                        interval_s=0.1, message="worker ready")
        assert proc.poll() is None, f"worker exited: {worker.log()[-3000:]}"
        return worker

    yield factory
    for worker in started.workers:
        worker.stop()
    for base in started.dirs:
        shutil.rmtree(base, ignore_errors=True)
