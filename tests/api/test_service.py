"""The service as operators run it: settings, check-config, `make run`'s command with an embedded
Redis, SIGHUP reload, and Sentinel."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from aqsh.engine.client import Client
from aqsh.engine.connection import RedisSettings, create_client
from aqsh.errors import ConfigError
from aqsh.redis_process import RedisProcess, find_redis_server, free_port
from aqsh.settings import load_settings
from tests.support import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]


def test_settings_defaults_and_parsing() -> None:
    settings = load_settings({"AQSH_LOG_FORMAT": "json"})
    assert (settings.mode, settings.redis_addr, settings.worker_concurrency) == (
        "both", "127.0.0.1:6379", 10)
    assert settings.result_retention_s == 72 * 3600
    custom = load_settings({
        "AQSH_MODE": "worker", "AQSH_WORKER_QUEUES": "critical:6, default:3,low",
        "AQSH_REQUIRE_IDENTITY": "true", "AQSH_LOG_RETENTION": "1h30m",
        "AQSH_REDIS_SENTINEL_ADDRS": "a:26379,b:26379", "AQSH_BIND": "127.0.0.1:9000",
    })
    assert custom.worker_queues == (("critical", 6), ("default", 3), ("low", 1))
    assert custom.require_identity is True
    assert custom.log_retention_s == 5400
    assert custom.redis_sentinel_addrs == ("a:26379", "b:26379")
    assert custom.host_port == ("127.0.0.1", 9000)


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("AQSH_MODE", "sideways", "api, worker or both"),
    ("AQSH_WORKER_CONCURRENCY", "0", "a positive integer"),
    ("AQSH_REQUIRE_IDENTITY", "maybe", "true or false"),
    ("AQSH_RESULT_RETENTION", "forever", "a duration like 72h"),
    ("AQSH_BIND", "8080", "host:port"),
    ("AQSH_WORKER_QUEUES", "a:x", "name[:weight]"),
    ("AQSH_EVENT_LOOP", "trio", "auto, asyncio or uvloop"),
])
def test_bad_setting_names_variable_and_accepted_values(name: str, value: str,
                                                       accepts: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})
    message = caught.value.message
    assert message.startswith(f"{name}={value!r} is not valid")
    assert accepts in message
    assert "\n" not in message


def test_uvloop_only_where_no_scripts_are_spawned_unless_asked() -> None:
    def uvloop_for(**env: str) -> bool:
        return load_settings({"AQSH_LOG_FORMAT": "json", **env}).uses_uvloop

    assert uvloop_for(AQSH_MODE="api")
    assert not uvloop_for(AQSH_MODE="worker")
    assert not uvloop_for(AQSH_MODE="both")
    assert not uvloop_for(AQSH_MODE="api", AQSH_EVENT_LOOP="asyncio")
    assert uvloop_for(AQSH_MODE="both", AQSH_EVENT_LOOP="uvloop")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aqsh", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, check=False)


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", "examples/tasks.yaml", "--tasks-dir", "examples/scripts")
    assert ok.returncode == 0, ok.stderr
    assert "4 task(s)" in ok.stdout
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks:\n  a:\n    script: nope.sh\n    colour: red\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3: task 'a': field 'script'" in result.stderr
    assert f"{bad}:4: task 'a': field 'colour': unknown key" in result.stderr


def test_bad_env_stops_startup_with_one_line() -> None:
    env = {**os.environ, "AQSH_WORKER_CONCURRENCY": "lots"}
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "aqsh: AQSH_WORKER_CONCURRENCY='lots' is not valid: expected a positive integer")


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def sse_to_eof(url: str, on_data: Callable[[list[str]], None] | None = None) -> list[str]:
    """The data lines of an SSE log stream up to its eof (as ``eof:<code>``); ``on_data`` sees
    the list after every line, while the stream is still open."""
    lines: list[str] = []
    with urllib.request.urlopen(url, timeout=60) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                lines.append(("eof:" if event == "eof" else "") + line[5:].strip())
                if event == "eof":
                    return lines
                if on_data is not None:
                    on_data(lines)
    return lines


def test_make_run_command_serves_the_examples_with_embedded_redis(tmp_path: Path) -> None:
    """What `make run` starts, in a temporary directory: submit, follow logs, read result."""
    work = tmp_path / "run"
    shutil.copytree(ROOT / "examples", work / "examples")
    port = free_port()
    env = {**os.environ, "AQSH_REDIS_ADDR": "embedded", "AQSH_TASKS_CONFIG":
           "examples/tasks.yaml", "AQSH_TASKS_DIR": "examples/scripts",
           "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_DATA_DIR": str(work / "data"),
           "AQSH_RESULTS_DIR": str(work / "results"), "AQSH_LOG_FORMAT": "json",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve", "--mode", "both"],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_sync(lambda: http("GET", base + "/health")[0] == 200, timeout_s=30,
                        interval_s=0.1, message="service up")
        status, accepted = http("POST", base + "/tasks/report", {"environment": "staging"})
        assert status == 202, accepted
        lines = sse_to_eof(base + accepted["links"]["logs"])
        assert lines == ["building report for staging", "report written", "eof:0"]

        def done() -> Any:
            _, task = http("GET", base + accepted["links"]["self"])
            return task if task and task["state"] == "completed" else None

        task = wait_until_sync(done, timeout_s=10, message="completed")
        data = json.loads(task["result"]["data"])
        assert data["environment"] == "staging"
        assert data["task"] == accepted["id"]
        assert (work / "data" / "redis" / "appendonly.aof").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-2000:]
    assert "aqsh.stopped" in stderr


def test_sighup_reloads_tasks_yaml_and_keeps_the_old_one_on_error(tmp_path: Path) -> None:
    from tests.api.conftest import write_tasks

    config, scripts = write_tasks(tmp_path)
    port = free_port()
    with RedisProcess() as redis_proc:
        env = {**os.environ, "AQSH_REDIS_ADDR": redis_proc.url, "AQSH_TASKS_CONFIG": str(config),
               "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{port}",
               "AQSH_MODE": "api", "AQSH_LOG_FORMAT": "json"}
        log_path = tmp_path / "aqsh.log"
        log_file = log_path.open("w")
        proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        base = f"http://127.0.0.1:{port}"

        def names() -> set[str]:
            status, body = http("GET", base + "/tasks")
            return {t["name"] for t in body["tasks"]} if status == 200 else set()

        try:
            wait_until_sync(names, timeout_s=30, interval_s=0.1, message="api up")
            assert "extra" not in names()
            config.write_text(config.read_text() + "  extra:\n    script: echo.sh\n")
            proc.send_signal(signal.SIGHUP)
            wait_until_sync(lambda: "extra" in names(), timeout_s=10, message="reloaded")
            config.write_text("tasks:\n  broken:\n    script: missing.sh\n")
            proc.send_signal(signal.SIGHUP)
            wait_until_sync(lambda: "config.reload_rejected" in log_path.read_text(),
                            timeout_s=10, message="rejection logged")
            assert "extra" in names()
            assert "broken" not in names()
            started = next(json.loads(line) for line in log_path.read_text().splitlines()
                           if '"aqsh.started"' in line)
            assert started["event_loop"] == "uvloop"  # mode api, AQSH_EVENT_LOOP unset
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            log_file.close()
        assert "missing.sh does not exist" in log_path.read_text()


async def test_sentinel_connection_finds_the_master(tmp_path: Path) -> None:
    with RedisProcess() as master:
        sentinel_port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 5000\n")
        sentinel = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = create_client(RedisSettings(sentinel_addrs=(f"127.0.0.1:{sentinel_port}",),
                                                 sentinel_master="mymaster"))

            async def reachable() -> bool:
                try:
                    return bool(await client.ping())
                except Exception:
                    return False

            from tests.support import wait_until

            await wait_until(reachable, timeout_s=15, interval_s=0.2, message="sentinel")
            info = await Client(client).enqueue("via:sentinel", b"x")
            direct = aioredis.Redis.from_url(master.url)
            assert await direct.hget(f"asynq:{{default}}:t:{info.id}", "state") == b"pending"
            await direct.aclose()
            await client.aclose()
            for sentinel_client in client.connection_pool.sentinel_manager.sentinels:
                await sentinel_client.aclose()
        finally:
            sentinel.terminate()
            sentinel.wait()


def test_k8s_manifests_probe_real_routes_and_real_settings() -> None:
    import yaml

    from aqsh.settings import _FIELDS

    routes = {"/health", "/health/live", "/health/ready", "/metrics"}
    for path in (ROOT / "k8s" / "base").glob("*.yaml"):  # rendered overlays: tests/deploy
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    assert container[probe]["httpGet"]["path"] in routes
                for env in container["env"]:
                    assert env["name"].removeprefix("AQSH_") in _FIELDS, env["name"]


def test_split_deployment_api_on_uvloop_and_a_separate_worker(tmp_path: Path) -> None:
    """The k8s topology: an API process (uvloop, shared SSE reader) and a worker process on
    one Redis. A submitted task runs on the worker; its log is followed live through the API."""
    from tests.api.conftest import write_tasks

    config, scripts = write_tasks(tmp_path)
    with RedisProcess() as redis_proc:
        procs: dict[str, subprocess.Popen[str]] = {}
        urls: dict[str, str] = {}
        for mode in ("api", "worker"):
            port = free_port()
            env = {**os.environ, "AQSH_REDIS_ADDR": redis_proc.url,
                   "AQSH_TASKS_CONFIG": str(config), "AQSH_TASKS_DIR": str(scripts),
                   "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_MODE": mode,
                   "AQSH_LOG_FORMAT": "json", "AQSH_RESULTS_DIR": str(tmp_path / "work")}
            procs[mode] = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT,
                                           env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True)
            urls[mode] = f"http://127.0.0.1:{port}"
        try:
            for url in urls.values():
                wait_until_sync(lambda u=url: http("GET", u + "/health/ready")[0] == 200,
                                timeout_s=30, interval_s=0.1, message="ready")
            assert http("POST", urls["worker"] + "/tasks/echo", {"name": "x"})[0] == 404
            status, accepted = http("POST", urls["api"] + "/tasks/echo",
                                    {"name": "split", "times": 3})
            assert status == 202, accepted
            lines = sse_to_eof(f"{urls['api']}/tasks/{accepted['id']}/logs")
            assert lines == ["hello split"] * 3 + ["eof:0"]
            _, task = http("GET", f"{urls['api']}/tasks/{accepted['id']}")
            assert (task["state"], task["result"]["exit_code"]) == ("completed", 0)
            # Live: follow a running script, cancel it through the API, see the stream end.
            _, slow = http("POST", urls["api"] + "/tasks/slow", {})

            def cancel_once_started(lines: list[str]) -> None:
                if lines == ["started"]:
                    # 200 once the script has stopped (it does on SIGTERM), else 202.
                    assert http("DELETE", f"{urls['api']}/tasks/{slow['id']}")[0] in (200, 202)

            seen = sse_to_eof(f"{urls['api']}/tasks/{slow['id']}/logs", cancel_once_started)
            assert seen == ["started", "eof:-15"]
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            outputs = {mode: proc.communicate(timeout=30)[1] for mode, proc in procs.items()}
    for mode, proc in procs.items():
        assert proc.returncode == 0, outputs[mode][-2000:]
    started = [json.loads(line) for line in outputs["api"].splitlines()
               if '"aqsh.started"' in line]
    assert started[0]["event_loop"] == "uvloop"
    worker_started = [json.loads(line) for line in outputs["worker"].splitlines()
                      if '"aqsh.started"' in line]
    assert worker_started[0]["event_loop"] == "asyncio.unix_events"
