"""The live log survives the API going away: with the API and the worker in separate
processes, the API is restarted while a script runs, and the page resumes its log from the
last line it got — every line once, none lost."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from aqsh.redis_process import RedisProcess, free_port
from tests.ui.conftest import Console, Service, prepare, start_aqsh, stop_aqsh


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("ui-split")
    with RedisProcess() as redis_proc:
        env, gates = prepare(root, redis_proc.url)
        worker = start_aqsh("worker", env, free_port(), root / "worker.log")
        port = free_port()  # the API's, started by the test
        try:
            yield Service(url=f"http://127.0.0.1:{port}", redis_url=redis_proc.url, root=root,
                          gates=gates, env=env, port=port)
        finally:
            stop_aqsh(worker)


def test_the_log_resumes_after_the_api_restarts(console: Console, service: Service) -> None:
    log = service.root / "api.log"
    api = start_aqsh("api", service.env, service.port, log)
    try:
        page = console("alice")
        page.goto("/ui/tasks/echo")
        page.fill("#in-name", "resume")
        page.click("#submit")
        page.wait_for_url("**/ui/runs/*")
        lines = page.locator("#log .line")
        expect(lines).to_have_count(2)  # hello, and the stderr line
        expect(page.locator("#state")).to_have_text("active")

        stop_aqsh(api)
        expect(page.locator("#log-status")).to_have_text("reconnecting…")
        api = start_aqsh("api", service.env, service.port, log)
        service.release("resume")

        expect(page.locator("#state")).to_have_text("completed")
        expect(lines).to_have_count(3)
        # Every line once: resumed after the last line seen, not replayed from the start.
        assert [t.strip() for t in lines.all_inner_texts()] == [
            "hello resume", "colour green", "bye resume"]
    finally:
        stop_aqsh(api)
