"""What the image runs, proven without a Docker engine: the wheel, built from this tree and
installed into a fresh virtualenv, runs ``python -m aqsh worker`` and ``python -m aqsh api``
from a directory outside the repository, and a task goes end to end. A file the package needs
at run time but the wheel lacks (the Lua scripts) fails here, not in production.

The fresh virtualenv takes aqsh only from the wheel (checked), and its third-party dependencies
from the test environment's site-packages through a .pth file: installing them from the package
index on every run would cost minutes and the network, and prove nothing about aqsh's files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

from aqsh.redis_process import RedisProcess, free_port
from tests.cli.conftest import ROOT, http_status, service_env
from tests.support import wait_until_sync


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    (built,) = out.glob("aqsh-*.whl")
    return built


def test_wheel_holds_the_lua_scripts_and_the_cli(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).name for n in names if n.startswith("aqsh/_lua/")}
    assert shipped == {p.name for p in (ROOT / "lua").glob("*.lua")}
    assert "aqsh/cli/__init__.py" in names
    # The console's templates and static files are package data, not Python modules.
    for page in ("base.html", "tasks.html", "form.html", "run.html", "history.html",
                 "queues.html", "error.html"):
        assert f"aqsh/api/ui/templates/{page}" in names, page
    for static in ("console.css", "form.js", "run.js"):
        assert f"aqsh/api/ui/static/{static}" in names, static
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "aqsh = aqsh.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True).stdout
    # Appended after the venv's own site-packages: aqsh itself still resolves to the wheel's.
    Path(site.strip(), "test_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _post(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def test_installed_wheel_runs_worker_and_api_outside_the_repository(
    fresh_venv: Path, tmp_path: Path
) -> None:
    python = fresh_venv / "bin" / "python"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(python), "-c", "import aqsh, aqsh.engine.scripts as s; "
         "print(aqsh.__file__); print(s.lua_dir())"],
        cwd=outside, env=clean, check=True, capture_output=True, text=True).stdout.split()
    assert all(path.startswith(str(fresh_venv)) for path in where), where
    assert str(ROOT) not in " ".join(where)

    with RedisProcess() as redis_proc:
        ports = {"api": free_port(), "worker": free_port()}
        procs = {}
        for command, port in ports.items():
            env = {**service_env(tmp_path / command, redis_proc.url, port), **clean}
            env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            procs[command] = subprocess.Popen(
                [str(python), "-m", "aqsh", command], cwd=outside, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        api = f"http://127.0.0.1:{ports['api']}"
        try:
            for port in ports.values():
                wait_until_sync(lambda p=port: http_status(
                    f"http://127.0.0.1:{p}/health/ready") == 200, timeout_s=60,
                    interval_s=0.1, message="ready")
            accepted = _post(api + "/tasks/echo", {"name": "wheel", "times": 2})
            # The installed console script follows it to its end.
            followed = subprocess.run(
                [str(fresh_venv / "bin" / "aqsh"), "logs", accepted["id"], "--follow"],
                cwd=outside, env={**clean, "AQSH_URL": api}, capture_output=True, text=True,
                timeout=120, check=False)
            assert followed.returncode == 0, followed.stderr
            assert followed.stdout.splitlines() == ["hello wheel", "hello wheel"]
            with urllib.request.urlopen(f"{api}/tasks/{accepted['id']}", timeout=10) as resp:
                task = json.loads(resp.read())
            assert task["state"] == "completed"
            assert json.loads(task["result"]["data"]) == {"greeted": "wheel"}
            # The console renders from the installed package's templates and static files.
            with urllib.request.urlopen(f"{api}/ui/runs/{accepted['id']}", timeout=10) as resp:
                page = resp.read().decode()
            assert 'data-task-id="' + accepted["id"] + '"' in page
            assert "completed" in page
            with urllib.request.urlopen(f"{api}/ui/static/run.js", timeout=10) as resp:
                assert b"EventSource" in resp.read()
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            errors = {c: p.communicate(timeout=30)[1] for c, p in procs.items()}
    for command, proc in procs.items():
        assert proc.returncode == 0, errors[command][-2000:]


def test_dockerfile_builds_from_the_wheel_non_root_under_tini() -> None:
    """No Docker engine here: check the Dockerfile's shape, and that what it copies exists."""
    text = (ROOT / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2, stages
    final = text.split(stages[1], 1)[1]
    assert "*.whl" in final
    assert "USER 10001" in final
    assert "HEALTHCHECK" in final
    assert 'ENTRYPOINT ["tini", "--"' in final
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
            for source in parts[1:-1]:
                assert (ROOT / source).exists(), source
