"""The console's HTTP-level defences, against the same live service as the browser tests:
the CSRF header on browser writes, and the headers of every /ui response."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tests.ui.conftest import Service


def send(service: Service, method: str, path: str, headers: dict[str, str],
         body: Any = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        service.url + path, method=method,
        headers={"X-Forwarded-User": "mallory", "Content-Type": "application/json", **headers},
        data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_browser_write_without_the_csrf_header_is_refused(service: Service) -> None:
    # What a form or fetch on another site makes the signed-in user's browser send.
    for browser_header in ({"Origin": "https://evil.example"}, {"Cookie": "_oauth2_proxy=s"},
                           {"Sec-Fetch-Site": "cross-site"}):
        status, _, body = send(service, "POST", "/tasks/slow", browser_header, {})
        assert status == 403, body
        assert json.loads(body)["error"]["code"] == "csrf_header_missing"
    status, _, body = send(service, "POST", "/tasks/slow", {"Origin": "https://evil.example",
                                                            "X-Aqsh-Csrf": "yes"}, {})
    assert status == 403, body  # only the exact value the console sends
    # The console's own request, and a client that is no browser (CLI, curl), are accepted.
    status, _, body = send(service, "POST", "/tasks/slow", {"Origin": service.url,
                                                            "X-Aqsh-Csrf": "1"}, {})
    assert status == 202, body
    first = json.loads(body)["id"]
    status, _, body = send(service, "POST", "/tasks/slow", {}, {})
    assert status == 202, body
    second = json.loads(body)["id"]
    for task_id in (first, second):
        status, _, body = send(service, "DELETE", f"/tasks/{task_id}",
                               {"Cookie": "_oauth2_proxy=s"})
        assert status == 403, body
        status, _, body = send(service, "DELETE", f"/tasks/{task_id}", {})
        assert status in (200, 202), body
    # Reads are not state-changing: a browser loads pages and follows logs without it.
    status, _, _ = send(service, "GET", "/tasks", {"Cookie": "_oauth2_proxy=s"})
    assert status == 200


def test_every_ui_response_carries_a_strict_policy(service: Service) -> None:
    for path in ("/ui/", "/ui/tasks/echo", "/ui/runs", "/ui/runs/nope", "/ui/queues",
                 "/ui/static/console.css", "/ui/static/run.js", "/ui/static/missing.js"):
        status, headers, _ = send(service, "GET", path, {})
        assert status in (200, 403, 404), path
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, body = send(service, "GET", "/ui/", {})
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Cache-Control"] == "no-store"
    assert b"<script>" not in body  # no inline script: only <script src=...>
    status, headers, _ = send(service, "GET", "/ui/static/run.js", {})
    assert headers["Content-Type"].startswith("text/javascript")


def test_static_serves_only_its_own_files(service: Service) -> None:
    for path in ("/ui/static/pages.py", "/ui/static/..%2fpages.py",
                 "/ui/static/..%2f..%2fsettings.py", "/ui/static/"):
        status, _, body = send(service, "GET", path, {})
        assert status == 404, (path, body)
