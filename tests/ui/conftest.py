"""A live ``aqsh serve`` on a real Redis, and Debian's chromium driven by Playwright's sync API.

The sync API runs its own event loop in a thread and refuses to start inside a running asyncio
loop, so the browser tests are plain (non-async) test functions against a service in a
subprocess — exactly what a person at the console talks to.

Identity: the service trusts loopback as its proxy (the default), so a browser context's extra
HTTP headers play the authenticating proxy's part.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, expect, sync_playwright

from aqsh.redis_process import RedisProcess, free_port
from tests.cli.conftest import ROOT, http_status
from tests.support import wait_until_sync

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
#: The README's screenshots are refreshed by `make screenshots` (AQSH_SCREENSHOTS=docs/screenshots);
#: an ordinary run writes them to a scratch directory, leaving the work tree clean.
SCREENSHOTS = Path(os.environ.get("AQSH_SCREENSHOTS")
                   or tempfile.mkdtemp(prefix="aqsh-screenshots-"))
#: Generous: the machine is shared and loaded; nothing here measures time.
WAIT_MS = 30_000
expect.set_options(timeout=WAIT_MS)

TASKS_YAML = """\
defaults: {timeout: 2m, max_retry: 0, retry_delay: 1s}
tasks:
  echo:
    script: echo.sh
    description: "Greet someone, then wait for the test's gate before saying goodbye"
    input:
      - {name: name, env: NAME, required: true, pattern: '[a-z]+', description: "Who to greet"}
      - {name: times, env: TIMES, type: int, min: 1, max: 5, default: 1}
      - {name: loud, env: LOUD, type: bool, default: false}
      - {name: colour, env: COLOUR, enum: [red, green, blue], default: green}
  slow:
    script: slow.sh
    description: "Prints a line, then sleeps for five minutes"
  secret:
    script: secret.sh
    description: "Only for ops"
    allowed_groups: [ops]
    input:
      - {name: name, env: NAME, required: true}
  lines:
    script: lines.sh
    description: "Prints many lines, waits for the gate, prints as many again"
    input:
      - {name: count, env: COUNT, type: int, min: 1, max: 2000, default: 200}
  xss:
    script: xss.sh
    description: "Prints what it is given, and markup on stderr"
    input:
      - {name: note, env: NOTE, required: true}
"""


def scripts(gates: Path) -> dict[str, str]:
    return {
        # The gate (a file per name) makes "lines arrive live" observable: the first lines are
        # on the page while the script still runs.
        "echo.sh": f"""\
            i=0
            while [ $i -lt "$TIMES" ]; do
              if [ "$LOUD" = true ]; then echo "HELLO $NAME"; else echo "hello $NAME"; fi
              i=$((i+1))
            done
            echo "colour $COLOUR" >&2
            while [ ! -e "{gates}/$NAME" ]; do sleep 0.05; done
            echo "bye $NAME"
            printf '{{"greeted":"%s","times":%s}}' "$NAME" "$TIMES" > "$AQSH_RESULT_FILE"
        """,
        "slow.sh": "echo started\nsleep 300\n",
        "lines.sh": f"""\
            seq 1 "$COUNT" | sed 's/^/first /'
            while [ ! -e "{gates}/lines" ]; do sleep 0.05; done
            seq 1 "$COUNT" | sed 's/^/second /'
        """,
        "secret.sh": 'echo "secret for $NAME"\n',
        "xss.sh": """\
            printf '%s\\n' "$NOTE"
            printf '\\033[31m<img src=x onerror="window.__xss=1">red\\033[0m\\n' >&2
            printf '{"html":"<script>window.__xss=1</script>"}' > "$AQSH_RESULT_FILE"
        """,
    }


@dataclass
class Service:
    url: str
    redis_url: str
    root: Path
    gates: Path
    #: The service's environment (to start more of its processes), and its port.
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0

    def release(self, name: str) -> None:
        (self.gates / name).touch()


def prepare(root: Path, redis_url: str) -> tuple[dict[str, str], Path]:
    """The tasks, scripts and environment of a service under ``root``; and its gates dir."""
    gates = root / "gates"
    gates.mkdir()
    scripts_dir = root / "scripts"
    scripts_dir.mkdir()
    for name, body in scripts(gates).items():
        path = scripts_dir / name
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        path.chmod(0o755)
    config = root / "tasks.yaml"
    config.write_text(TASKS_YAML)
    env = {**os.environ, "AQSH_REDIS_ADDR": redis_url, "AQSH_TASKS_CONFIG": str(config),
           "AQSH_TASKS_DIR": str(scripts_dir), "AQSH_RESULTS_DIR": str(root / "work"),
           "AQSH_LOG_FORMAT": "json", "AQSH_ADMIN_GROUPS": "admins",
           "AQSH_WORKER_CONCURRENCY": "8", "AQSH_SHUTDOWN_TIMEOUT": "2s",
           "AQSH_KILL_GRACE": "1s"}
    return env, gates


def start_aqsh(command: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "aqsh", command], cwd=ROOT,
                                env={**env, "AQSH_BIND": f"127.0.0.1:{port}"},
                                stdout=subprocess.DEVNULL, stderr=out)
    url = f"http://127.0.0.1:{port}"
    wait_until_sync(lambda: http_status(url + "/health/ready") == 200, timeout_s=60,
                    interval_s=0.1, message=f"aqsh {command} ready")
    return proc


def stop_aqsh(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("ui-service")
    with RedisProcess() as redis_proc:
        env, gates = prepare(root, redis_proc.url)
        port = free_port()
        proc = start_aqsh("serve", env, port, root / "aqsh.log")
        try:
            yield Service(url=f"http://127.0.0.1:{port}", redis_url=redis_proc.url, root=root,
                          gates=gates)
        finally:
            stop_aqsh(proc)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not Path(CHROMIUM).exists():
        # Never skipped: CI installs chromium (.ci/setup); a missing browser is a failure.
        pytest.fail(f"{CHROMIUM} is missing: run `bash .ci/setup` (apt-get install chromium)")
    # Playwright spawns its driver through asyncio on a loop of its own. A service test earlier
    # in the session may have left aqsh's pidfd watcher (install_child_watcher) as the
    # process-wide child watcher, bound to a loop that is now closed, and asyncio then refuses
    # every subprocess; the threaded watcher works on any loop.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_child_watcher(asyncio.ThreadedChildWatcher())
    with sync_playwright() as pw:
        yield pw


Console = Callable[..., Page]


@pytest.fixture
def console(playwright: Playwright, service: Service, tmp_path: Path) -> Iterator[Console]:
    """``console(user, groups)`` opens a page as that user, in a browser of its own with a
    fresh profile (no cookie, cache or storage carried between identities)."""
    contexts: list[BrowserContext] = []
    #: What the browser refused under the pages' Content-Security-Policy: must stay empty (the
    #: console needs no inline script or style, and loads nothing from elsewhere).
    refused: list[str] = []

    def open_page(user: str = "alice", groups: str = "") -> Page:
        headers = {"X-Forwarded-User": user}
        if groups:
            headers["X-Forwarded-Groups"] = groups
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(contexts)}"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, base_url=service.url, extra_http_headers=headers,
            viewport={"width": 1280, "height": 860})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", lambda message: refused.append(message.text)
                if "Content Security Policy" in message.text else None)
        return page

    try:
        yield open_page
    finally:
        for context in contexts:
            context.close()
    assert refused == []


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0, path
