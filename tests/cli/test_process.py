"""Process commands as a container runs them: ``python -m aqsh worker | api | serve``.

A start that cannot succeed prints one line, exits non-zero and leaves no child behind; the
embedded Redis dies with a SIGKILLed aqsh."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from aqsh.redis_process import free_port
from tests.cli.conftest import ROOT, aqsh, http_status, service_env
from tests.support import json_log_events, wait_until_sync


def _embedded_port(stderr: str) -> int:
    """The embedded Redis's port, from its ``redis.embedded`` log line."""
    line = next(line for line in stderr.splitlines() if '"redis.embedded"' in line)
    return int(json.loads(line)["url"].rsplit(":", 1)[1].split("/")[0])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _start(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aqsh", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120, check=False)


def test_port_in_use_is_one_line_and_leaves_no_embedded_redis(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = service_env(tmp_path, "embedded", port, AQSH_DATA_DIR=str(tmp_path / "data"))
        result = _start(["serve"], env)
    assert result.returncode == 1, result.stderr
    assert _last_line(result.stderr) == (
        f"aqsh: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "Traceback" not in result.stderr
    redis_port = _embedded_port(result.stderr)  # the embedded Redis did start …
    assert not _answers(redis_port)  # … and is gone


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = _start(["worker"], service_env(tmp_path, dead, free_port()))
    assert result.returncode == 1
    assert _last_line(result.stderr).startswith(f"aqsh: cannot reach Redis at {dead}: ")
    assert "Traceback" not in result.stderr


def test_bad_tasks_yaml_and_bad_setting_are_one_line(tmp_path: Path) -> None:
    env = service_env(tmp_path, "127.0.0.1:1", free_port())
    Path(env["AQSH_TASKS_CONFIG"]).write_text("tasks:\n  a:\n    script: missing.sh\n")
    broken = _start(["api"], env)
    assert broken.returncode == 2
    # The config's own report: a heading, then one "file:line: problem" line per error.
    assert broken.stderr.startswith("aqsh: ")
    assert "missing.sh does not exist" in _last_line(broken.stderr)
    assert "Traceback" not in broken.stderr
    bad = _start(["worker"], {**env, "AQSH_WORKER_CONCURRENCY": "lots"})
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "aqsh: AQSH_WORKER_CONCURRENCY='lots' is not valid: expected a positive integer")


def test_embedded_redis_dies_when_aqsh_is_sigkilled(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path, "embedded", port, AQSH_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_sync(lambda: http_status(f"http://127.0.0.1:{port}/health/ready") == 200,
                        timeout_s=60, interval_s=0.1, message="service ready")
        children = [child for child in psutil.Process(proc.pid).children()
                    if "redis-server" in child.name()]
        assert len(children) == 1
        redis_pid = children[0].pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until_sync(lambda: _gone(redis_pid), timeout_s=30, interval_s=0.05,
                        message="embedded redis-server gone")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in children if "children" in locals() else []:
            if not _gone(leftover.pid):
                leftover.kill()


@pytest.mark.parametrize("command", ["worker", "api"])
def test_process_commands_run_their_mode(command: str, tmp_path: Path) -> None:
    from aqsh.redis_process import RedisProcess

    port = free_port()
    with RedisProcess() as redis_proc:
        env = service_env(tmp_path, redis_proc.url, port)
        proc = subprocess.Popen([sys.executable, "-m", "aqsh", command], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_sync(lambda: http_status(f"http://127.0.0.1:{port}/health/ready") == 200,
                            timeout_s=60, interval_s=0.1, message="ready")
            # Only the API serves /tasks; a worker answers health and metrics alone.
            expected = 200 if command == "api" else 404
            assert http_status(f"http://127.0.0.1:{port}/tasks") in (expected, 0)
            if command == "api":
                assert http_status(f"http://127.0.0.1:{port}/tasks") == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-2000:]
    assert command in {event.get("mode") for event in json_log_events(stderr)}, stderr[-2000:]


def test_help_has_examples_and_completion_works() -> None:
    helped = aqsh("run", "--help")
    assert helped.returncode == 0
    assert "aqsh run deploy version=1.2.3" in helped.stdout
    completion = subprocess.run([sys.executable, "-m", "aqsh"], capture_output=True,
                                text=True, cwd=ROOT, timeout=60, check=False,
                                env={**os.environ, "_AQSH_COMPLETE": "bash_source"})
    assert "complete" in completion.stdout
