"""Redis over TLS (``rediss://``): a real TLS endpoint in front of the test Redis.

The Redis build the tests use has no TLS, so a TLS-terminating proxy (Python's ssl module, a
self-signed certificate made by the openssl CLI) sits in front of it: aqsh does a real TLS
handshake, verifies the server against the CA given in the URL, and speaks RESP inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from aqsh import errors
from aqsh.engine.client import Client
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.engine.inspect import Inspector
from aqsh.engine.models import TaskState
from aqsh.engine.rdb import RedisBroker
from aqsh.engine.server import Server
from aqsh.engine.task import Task, TaskContext
from aqsh.redis_process import RedisProcess, free_port
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class TlsRedis:
    url: str
    ca: Path
    handshakes: int = 0
    client_cert: tuple[Path, Path] | None = None

    def url_with_ca(self, ca: Path) -> str:
        return f"{self.url}?ssl_ca_certs={ca}"


@pytest.fixture
async def tls_redis(redis_server: RedisProcess, tmp_path: Path,
                    request: pytest.FixtureRequest) -> AsyncIterator[TlsRedis]:
    """Parametrize indirectly with ``"mutual"`` to require a client certificate."""
    cert, key = make_certificate(tmp_path, "server")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    port = free_port()
    endpoint = TlsRedis(url=f"rediss://127.0.0.1:{port}/0", ca=cert)
    if getattr(request, "param", None) == "mutual":
        endpoint.client_cert = make_certificate(tmp_path, "client")
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(endpoint.client_cert[0])

    writers: set[asyncio.StreamWriter] = set()
    relays: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        endpoint.handshakes += 1  # the handshake completed before this callback runs
        task = asyncio.current_task()
        assert task is not None
        relays.add(task)
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", redis_server.port)
        writers.update((client_w, redis_w))
        try:
            await asyncio.gather(pipe(client_r, redis_w), pipe(redis_r, client_w))
        finally:
            for writer in (client_w, redis_w):
                writer.close()
                writers.discard(writer)
            relays.discard(task)

    server = await asyncio.start_server(relay, "127.0.0.1", port, ssl=context)
    try:
        yield endpoint
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        if relays:
            await asyncio.wait(list(relays), timeout=5)
        await server.wait_closed()


async def test_engine_round_trip_over_tls(tls_redis: TlsRedis, redis: aioredis.Redis) -> None:
    client_redis = create_client(RedisSettings(url=tls_redis.url_with_ca(tls_redis.ca)))
    broker = RedisBroker(client_redis)
    ran = asyncio.Event()

    async def handler(task: Task, ctx: TaskContext) -> bytes | None:
        ran.set()
        return b"done over tls"

    # fast_lane=True is accepted and falls back to redis-py: the lane speaks plain TCP only.
    async with Client(broker, fast_lane=True) as client:
        info = await client.enqueue("tls:job", b"p", retention=60)
    assert (await Inspector(client_redis).find_task(info.id)).state is TaskState.PENDING
    server = Server(broker, handler, concurrency=2, queues={"default": 1})
    await server.start()
    try:
        await asyncio.wait_for(ran.wait(), 10)
        task_key = f"asynq:{{default}}:t:{info.id}"
        await wait_until(lambda: redis.hget(task_key, "state"), message="state")
        await wait_until(
            lambda: _equals(redis.hget(task_key, "state"), b"completed"), message="completed")
        assert await redis.hget(task_key, "result") == b"done over tls"
    finally:
        await server.stop(shutdown_timeout_s=1)
        await client_redis.aclose()
    assert tls_redis.handshakes >= 2  # every connection above went through TLS


async def _equals(value: object, expected: bytes) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_an_untrusted_server_certificate_is_refused(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    other_ca, _ = make_certificate(tmp_path, "other")
    client_redis = create_client(RedisSettings(url=tls_redis.url_with_ca(other_ca),
                                               socket_timeout_s=2))
    try:
        with pytest.raises(errors.BrokerUnavailable) as caught:
            await Client(client_redis).enqueue("tls:job", b"p")
        assert "certificate verify failed" in str(caught.value).lower()
    finally:
        await client_redis.aclose()


@pytest.mark.parametrize("tls_redis", ["mutual"], indirect=True)
async def test_mutual_tls_needs_the_client_certificate(tls_redis: TlsRedis) -> None:
    assert tls_redis.client_cert is not None
    cert, key = tls_redis.client_cert
    with_cert = create_client(RedisSettings(
        url=f"{tls_redis.url_with_ca(tls_redis.ca)}&ssl_certfile={cert}&ssl_keyfile={key}"))
    without = create_client(RedisSettings(url=tls_redis.url_with_ca(tls_redis.ca),
                                          socket_timeout_s=2))
    try:
        info = await Client(with_cert).enqueue("mtls:job", b"p")
        assert (await Inspector(with_cert).find_task(info.id)).state is TaskState.PENDING
        with pytest.raises(errors.BrokerUnavailable):
            await Client(without).enqueue("mtls:job", b"p")
    finally:
        await with_cert.aclose()
        await without.aclose()


async def test_service_runs_a_shell_task_over_tls(tls_redis: TlsRedis, tmp_path: Path) -> None:
    from tests.api.conftest import write_tasks

    config, scripts = write_tasks(tmp_path)
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": tls_redis.url_with_ca(tls_redis.ca),
           "AQSH_TASKS_CONFIG": str(config), "AQSH_TASKS_DIR": str(scripts),
           "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_MODE": "both", "AQSH_LOG_FORMAT": "json",
           "AQSH_RESULTS_DIR": str(tmp_path / "work")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aqsh", "serve", cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def request(method: str, path: str, **kwargs: object) -> tuple[int, dict]:
                try:
                    async with session.request(method, base + path, **kwargs) as resp:
                        return resp.status, await resp.json(content_type=None)
                except aiohttp.ClientConnectionError:
                    return 0, {}

            await wait_until(lambda: _status_is(request("GET", "/health/ready"), 200),
                             timeout_s=30, interval_s=0.1, message="service ready")
            status, accepted = await request("POST", "/tasks/echo", json={"name": "tls"})
            assert status == 202, accepted

            async def completed() -> dict | None:
                _, task = await request("GET", f"/tasks/{accepted['id']}")
                return task if task.get("state") == "completed" else None

            task = await wait_until(completed, timeout_s=15, interval_s=0.05, message="done")
            assert task["result"]["exit_code"] == 0
            async with session.get(f"{base}/tasks/{accepted['id']}/logs") as resp:
                events = await resp.text()
            assert "hello tls" in events
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr[-2000:]
    started = next(json.loads(line) for line in stderr.decode().splitlines()
                   if '"aqsh.started"' in line)
    assert started["mode"] == "both"
    assert tls_redis.handshakes >= 3


async def _status_is(response: object, expected: int) -> bool:
    status, _ = await response  # type: ignore[misc]
    return bool(status == expected)
