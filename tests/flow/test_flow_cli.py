"""``aqsh run --after ID[,ID]`` against a live ``aqsh serve``."""

from __future__ import annotations

from typing import Any

from tests.cli.conftest import LiveService, aqsh, aqsh_json
from tests.support import wait_until_sync


def test_run_after_waits_and_is_cancelled_with_its_dependency(
        live_service: LiveService) -> None:
    first: Any = aqsh_json("run", "echo", "name=first", "--in", "10m", url=live_service.url)
    second: Any = aqsh_json("run", "echo", "name=second", "--after", first["id"],
                            url=live_service.url)
    task: Any = aqsh_json("get", second["id"], url=live_service.url)
    assert task["state"] == "scheduled"
    assert task["waiting"] == {"reason": "after", "key": first["id"], "position": None,
                               "since": task["enqueued_at"]}
    assert aqsh("cancel", first["id"], url=live_service.url).returncode == 0

    def cancelled() -> Any:
        got: Any = aqsh_json("get", second["id"], url=live_service.url)
        return got if got["state"] in ("archived", "canceled") else None

    ended = wait_until_sync(cancelled, timeout_s=60, interval_s=0.5,
                            message="the dependent cancelled")
    assert first["id"] in ended["last_error"]
