"""A live ``aqsh serve`` (a real process on a free port, on a real Redis) and the ``aqsh``
command line run as a subprocess against it, as a person or a CI job would run both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aqsh.redis_process import RedisProcess, free_port
from tests.services import write_tasks
from tests.support import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]

TASKS_YAML = """\
defaults: {timeout: 2m, max_retry: 0, retry_delay: 1s}
tasks:
  echo:
    script: echo.sh
    description: "Echo a name"
    input:
      - {name: name, env: NAME, required: true, pattern: '[a-z]+'}
      - {name: times, env: TIMES, type: int, min: 1, max: 5, default: 1}
      - {name: loud, env: LOUD, type: bool, default: false}
  exit:
    script: exit.sh
    input:
      - {name: code, env: CODE, type: int, min: 0, max: 255, required: true}
  gated:
    script: gated.sh
    input:
      - {name: gate, env: GATE, required: true}
      - {name: code, env: CODE, type: int, min: 0, max: 255, default: 0}
  slow:
    script: slow.sh
  secret:
    script: echo.sh
    allowed_groups: [ops]
    input:
      - {name: name, env: NAME, required: true}
      - {name: times, env: TIMES, type: int, default: 1}
"""

SCRIPTS = {
    "echo.sh": """\
        i=0
        while [ $i -lt "$TIMES" ]; do
          if [ "$LOUD" = true ]; then echo "HELLO $NAME"; else echo "hello $NAME"; fi
          i=$((i+1))
        done
        printf '{"greeted":"%s"}' "$NAME" > "$AQSH_RESULT_FILE"
    """,
    "exit.sh": 'echo "exiting with $CODE"\nexit "$CODE"\n',
    # Prints a line, waits for the test to create the gate file, prints more, exits.
    "gated.sh": """\
        echo before
        while [ ! -e "$GATE" ]; do sleep 0.05; done
        echo after-1
        echo after-2
        exit "$CODE"
    """,
    "slow.sh": "echo started\nsleep 300\n",
}


@dataclass
class LiveService:
    url: str
    redis_url: str
    root: Path


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except Exception:
        return 0


def service_env(root: Path, redis_url: str, port: int, **extra: str) -> dict[str, str]:
    config, scripts = write_tasks(root, SCRIPTS, TASKS_YAML)
    return {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_TASKS_CONFIG": str(config),
            "AQSH_TASKS_DIR": str(scripts), "AQSH_BIND": f"127.0.0.1:{port}",
            "AQSH_RESULTS_DIR": str(root / "work"), "AQSH_LOG_FORMAT": "json",
            "AQSH_SHUTDOWN_TIMEOUT": "2s", "AQSH_KILL_GRACE": "1s", **extra}


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    root = tmp_path_factory.mktemp("cli-service")
    with RedisProcess() as redis_proc:
        port = free_port()
        log = (root / "aqsh.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], cwd=ROOT,
                                env=service_env(root, redis_proc.url, port),
                                stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_sync(lambda: http_status(url + "/health/ready") == 200, timeout_s=60,
                            interval_s=0.1, message="aqsh serve ready")
            yield LiveService(url=url, redis_url=redis_proc.url, root=root)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def cli_env(url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQSH_")}
    if url is not None:
        env["AQSH_URL"] = url
    return {**env, **extra}


def aqsh(*args: str, url: str | None = None, env: dict[str, str] | None = None,
         timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh process, as a shell would."""
    return subprocess.run([sys.executable, "-m", "aqsh", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env if env is not None else cli_env(url),
                          timeout=timeout_s, check=False)


def aqsh_json(*args: str, url: str | None = None, env: dict[str, str] | None = None) -> object:
    result = aqsh(*args, "--json", url=url, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
