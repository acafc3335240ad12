"""Schema fuzzing: Schemathesis against /openapi.json of a live ``aqsh serve``.

A real ``aqsh serve --mode api`` subprocess (the example tasks, its own redis-server) is fuzzed by
Schemathesis' CLI through every phase — coverage (boundary and invalid values of every
parameter, unsupported methods), fuzzing, and stateful runs along the document's links (submit,
then read or cancel what was submitted) — with every check on: no 5xx, every status, header,
content type and body as documented, invalid input rejected, valid input accepted.
tests/security/schemathesis.toml says where OpenAPI cannot express the API and why.

Deterministic generation (no seed, no example database): the same cases on every run, so a
failure reproduces and a pass does not hide a flake. API mode: no script runs, so no response
depends on how fast a worker is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from aqsh.api.openapi import document
from aqsh.redis_process import RedisProcess, free_port
from tests.support import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
#: Per operation and phase; ~500 requests in all, under 15 s on an idle 2-core machine.
MAX_EXAMPLES = 40

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def live_service(tmp_path: Path) -> Iterator[str]:
    with RedisProcess() as redis_server:
        port = free_port()
        env = {**os.environ, "AQSH_REDIS_ADDR": redis_server.url,
               "AQSH_TASKS_CONFIG": str(ROOT / "examples" / "tasks.yaml"),
               "AQSH_TASKS_DIR": str(ROOT / "examples" / "scripts"),
               "AQSH_BIND": f"127.0.0.1:{port}", "AQSH_MODE": "api", "AQSH_LOG_FORMAT": "json",
               "AQSH_LOG_LEVEL": "warning", "AQSH_RESULTS_DIR": str(tmp_path / "work")}
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log_file:
            service = subprocess.Popen([sys.executable, "-m", "aqsh", "serve"], env=env,
                                       stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert service.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(url + "/health/ready", timeout=2) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_until_sync(ready, timeout_s=60, interval_s=0.1, message="aqsh serve ready")
            yield url
        finally:
            service.terminate()
            service.wait(timeout=30)
        log = log_path.read_text()
        assert "http.internal_error" not in log, log
        assert "Traceback" not in log, log


def test_the_api_matches_its_openapi_document(live_service: str, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
        "run", f"{live_service}/openapi.json",
        "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--request-timeout", "10",
        "--generation-database", "none", "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path / "report"),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                            timeout=240, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Every operation was exercised (Schemathesis leaves out the document's own path).
    documented = {f"{method.upper()} {path}" for path, item in document()["paths"].items()
                  for method in item if path != "/openapi.json"}
    (junit,) = (tmp_path / "report").glob("junit*.xml")
    tested = {case.get("name") for case in ElementTree.parse(junit).iter("testcase")}
    assert tested == documented | {"Stateful tests"}, output
    assert " failed" not in output, output
