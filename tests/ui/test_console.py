"""The console in a real browser (Debian's chromium) against a live ``aqsh serve``."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

from tests.support import wait_until_sync
from tests.ui.conftest import WAIT_MS, Console, Service, screenshot


def api(service: Service, method: str, path: str, body: Any = None, *, user: str = "alice",
        groups: str = "") -> tuple[int, Any]:
    headers = {"X-Forwarded-User": user, "Content-Type": "application/json"}
    if groups:
        headers["X-Forwarded-Groups"] = groups
    request = urllib.request.Request(service.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def state_of(service: Service, task_id: str, user: str = "alice", groups: str = "") -> str:
    status, doc = api(service, "GET", f"/tasks/{task_id}", user=user, groups=groups)
    assert status == 200, doc
    return str(doc["state"])


def run_id(page: Page) -> str:
    page.wait_for_url(re.compile(r"/ui/runs/[^/?]+$"), timeout=WAIT_MS)
    return page.url.rsplit("/", 1)[1]


def test_echo_form_checks_fields_submits_and_follows_the_log_live(
    console: Console, service: Service
) -> None:
    page = console("alice", "dev")
    page.goto("/ui/tasks/echo")
    expect(page.locator("#in-colour")).to_have_value("green")  # defaults filled
    expect(page.locator("#in-times")).to_have_value("1")
    expect(page.locator('[data-field="name"] .required')).to_be_visible()
    expect(page.locator('[data-field="name"]')).to_contain_text("Who to greet")
    assert page.locator("#in-name").get_attribute("pattern") == "[a-z]+"
    assert page.locator("#in-times").get_attribute("max") == "5"

    # Checked in the browser: nothing is sent.
    page.fill("#in-name", "Bad Name!")
    page.click("#submit")
    expect(page.locator("#err-name")).not_to_be_empty()
    assert "/ui/tasks/echo" in page.url

    # Checked again by the server: with the browser's rules removed, the API's 422 details
    # land next to their fields.
    page.evaluate("""() => {
        document.getElementById('in-name').removeAttribute('pattern');
        document.getElementById('in-times').removeAttribute('max');
    }""")
    page.fill("#in-name", "Bad1")
    page.fill("#in-times", "9")
    page.click("#submit")
    expect(page.locator("#err-name")).to_have_text("must match [a-z]+")
    expect(page.locator("#err-times")).to_have_text("must be at most 5")
    assert "/ui/tasks/echo" in page.url
    screenshot(page, "run-form")

    page.fill("#in-name", "carol")
    page.fill("#in-times", "2")
    page.select_option("#in-colour", "blue")
    expect(page.locator("#err-name")).to_have_text("must match [a-z]+")  # until resubmitted
    page.click("#submit")
    task_id = run_id(page)

    log = page.locator("#log")
    # Live: the first lines are shown while the script is still waiting at its gate.
    expect(log).to_contain_text("hello carol\nhello carol\n")
    expect(page.locator("#log .line.stderr")).to_have_text("colour blue\n")
    expect(page.locator("#state")).to_have_text("active")
    assert "bye carol" not in log.inner_text()
    assert state_of(service, task_id) == "active"
    expect(page.locator("#submitted-by")).to_have_text("alice")

    service.release("carol")
    expect(log).to_contain_text("bye carol")
    expect(page.locator("#state")).to_have_text("completed")
    expect(page.locator("#exit-code")).to_have_text("0")
    data = page.locator("#result-data").inner_text()
    assert json.loads(data) == {"greeted": "carol", "times": 2}
    assert '\n  "greeted": "carol"' in data  # pretty-printed
    expect(page.locator("#cancel")).to_have_count(0)
    expect(page.locator('[data-field="finished_at"]')).not_to_have_text("—")
    screenshot(page, "run")

    # A reload replays the whole log from the stream, and the finished page has the result.
    page.reload()
    expect(log).to_contain_text("hello carol\nhello carol\n")
    expect(log).to_contain_text("bye carol")

    # Download log: the whole log as text.
    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename == f"{task_id}.log"
    assert Path(download.path()).read_text() == (
        "hello carol\nhello carol\ncolour blue\nbye carol\n")

    # Run again: the form, filled with this run's inputs.
    page.click("#run-again")
    page.wait_for_url(re.compile(r"/ui/tasks/echo\?"))
    expect(page.locator("#in-name")).to_have_value("carol")
    expect(page.locator("#in-times")).to_have_value("2")
    expect(page.locator("#in-colour")).to_have_value("blue")
    expect(page.locator("#in-loud")).not_to_be_checked()


def test_cancel_a_running_slow_task_after_confirming(console: Console, service: Service) -> None:
    page = console("alice")
    page.goto("/ui/tasks/slow")
    page.click("#submit")
    task_id = run_id(page)
    expect(page.locator("#log")).to_contain_text("started")
    expect(page.locator("#state")).to_have_text("active")

    asked: list[str] = []

    def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.click("#cancel")
    wait_until_sync(lambda: asked, timeout_s=30, message="the confirmation")
    assert "Cancel" in asked[0]
    assert state_of(service, task_id) == "active"  # dismissed: nothing was sent

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("canceled")
    expect(page.locator("#cancel")).to_have_count(0)
    assert state_of(service, task_id) == "canceled"


def test_a_user_without_the_group_sees_neither_the_task_nor_its_runs(
    console: Console, service: Service
) -> None:
    status, accepted = api(service, "POST", "/tasks/secret", {"name": "bob"},
                           user="bob", groups="ops")
    assert status == 202, accepted
    secret_id = accepted["id"]
    wait_until_sync(lambda: state_of(service, secret_id, "bob", "ops") == "completed",
                    timeout_s=60, interval_s=0.2, message="secret run completed")

    bob = console("bob", "ops")
    bob.goto("/ui/")
    expect(bob.locator('#tasks tr[data-task="secret"]')).to_have_count(1)
    answer = bob.goto(f"/ui/runs/{secret_id}")
    assert answer is not None
    assert answer.status == 200
    expect(bob.locator("#log")).to_contain_text("secret for bob")

    alice = console("alice", "dev")
    alice.goto("/ui/")
    expect(alice.locator('#tasks tr[data-task="echo"]')).to_have_count(1)
    expect(alice.locator('#tasks tr[data-task="secret"]')).to_have_count(0)
    form = alice.goto("/ui/tasks/secret")
    assert form is not None
    assert form.status == 404
    answer = alice.goto(f"/ui/runs/{secret_id}")
    assert answer is not None
    assert answer.status == 404
    expect(alice.locator("h1")).to_have_text("Not found")
    expect(alice.locator("#problem")).to_have_text(f"task {secret_id} not found")
    expect(alice.locator("#log")).to_have_count(0)
    # Exactly the page of an id that never existed.
    unknown = alice.goto("/ui/runs/00000000-0000-0000-0000-000000000000")
    assert unknown is not None
    assert unknown.status == 404
    alice.goto("/ui/runs?submitted_by=bob")
    expect(alice.locator(f'#runs tr[data-run="{secret_id}"]')).to_have_count(0)
    bob.goto("/ui/runs?submitted_by=bob")
    expect(bob.locator(f'#runs tr[data-run="{secret_id}"]')).to_have_count(1)


def test_history_filters_and_pages_with_running_now_on_top(
    console: Console, service: Service
) -> None:
    service.release("paged")
    ids = []
    for _ in range(5):
        status, accepted = api(service, "POST", "/tasks/echo", {"name": "paged"}, user="pager")
        assert status == 202, accepted
        ids.append(accepted["id"])
    for task_id in ids:
        wait_until_sync(lambda t=task_id: state_of(service, t, "pager") == "completed",
                        timeout_s=60, interval_s=0.2, message="paged runs completed")
    status, running = api(service, "POST", "/tasks/slow", {}, user="pager")
    assert status == 202, running
    wait_until_sync(lambda: state_of(service, running["id"], "pager") == "active",
                    timeout_s=60, interval_s=0.2, message="slow run active")

    page = console("pager")
    page.goto("/ui/runs")
    expect(page.locator(f'#running tr[data-run="{running["id"]}"]')).to_have_count(1)
    screenshot(page, "history")

    page.select_option("#f-task", "echo")
    page.fill("#f-submitted-by", "pager")
    page.fill("#f-limit", "2")
    page.click("#f-apply")
    seen: list[str] = []
    pages = 0
    while True:
        pages += 1
        rows = page.locator("#runs tbody tr[data-run]")
        on_page = [rows.nth(i).get_attribute("data-run") or "" for i in range(rows.count())]
        assert len(on_page) <= 2
        seen.extend(on_page)
        if page.locator("#next").count() == 0:
            break
        page.click("#next")
        expect(page.locator("#newest")).to_be_visible()
        assert pages < 10
    assert seen == list(reversed(ids))  # every run once, newest first
    assert pages == 3
    expect(page.locator("#f-submitted-by")).to_have_value("pager")  # filters kept

    page.select_option("#f-state", "completed")
    page.fill("#f-limit", "25")
    page.click("#f-apply")
    expect(page.locator("#runs tbody tr[data-run]")).to_have_count(5)
    page.select_option("#f-state", "canceled")
    page.click("#f-apply")
    expect(page.locator("#runs tbody tr[data-run]")).to_have_count(0)
    page.select_option("#f-state", "")
    page.select_option("#f-task", "slow")
    page.click("#f-apply")
    expect(page.locator(f'#runs tr[data-run="{running["id"]}"]')).to_have_count(1)
    # A time range that ends before any of these runs began.
    page.select_option("#f-task", "")
    page.fill("#f-until", "2001-01-01T00:00")
    page.click("#f-apply")
    expect(page.locator("#runs tbody tr[data-run]")).to_have_count(0)

    status, _ = api(service, "DELETE", f"/tasks/{running['id']}", user="pager")
    assert status in (200, 202)


def test_markup_in_an_input_and_in_log_lines_is_shown_as_text(
    console: Console, service: Service
) -> None:
    note = '<script>window.__xss=1</script><img src=x onerror="window.__xss=1">'
    page = console("alice")
    page.goto("/ui/tasks/xss")
    page.fill("#in-note", note)
    page.click("#submit")
    task_id = run_id(page)
    expect(page.locator("#state")).to_have_text("completed")
    expect(page.locator("#log")).to_contain_text(note)
    stderr = page.locator("#log .line.stderr")
    expect(stderr).to_have_text('<img src=x onerror="window.__xss=1">red\n')  # ANSI stripped
    expect(page.locator("#inputs")).to_contain_text(note)
    expect(page.locator("#result-data")).to_contain_text("<script>window.__xss=1</script>")
    # Reloaded, the server-rendered result and inputs are escaped too.
    page.reload()
    expect(page.locator("#inputs")).to_contain_text(note)
    expect(page.locator("#result-data")).to_contain_text("<script>window.__xss=1</script>")
    expect(page.locator("#log")).to_contain_text(note)
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("() => window.__xss") is None
    assert task_id


def test_queues_page_is_for_admins(console: Console, service: Service) -> None:
    service.release("queued")
    status, accepted = api(service, "POST", "/tasks/slow", {}, user="root")
    assert status == 202, accepted
    wait_until_sync(lambda: state_of(service, accepted["id"], "root", "admins") == "active",
                    timeout_s=60, interval_s=0.2, message="slow run active")
    admin = console("root", "admins")
    admin.goto("/ui/")
    expect(admin.locator('#tasks tr[data-task="secret"]')).to_have_count(1)  # admins see all
    screenshot(admin, "tasks")
    admin.click("text=Queues")
    row = admin.locator('#queues tr[data-queue="default"]')
    expect(row).to_have_count(1)
    worker = admin.locator(f'.workers tr[data-task-id="{accepted["id"]}"]')

    def listed() -> bool:
        # Workers publish what they run with their heartbeat (every few seconds).
        if worker.count():
            return True
        admin.reload()
        return False

    wait_until_sync(listed, timeout_s=60, interval_s=1, message="the worker's running task")
    expect(worker).to_contain_text("slow")
    screenshot(admin, "queues")

    user = console("alice", "dev")
    user.goto("/ui/")
    expect(user.locator("header nav")).not_to_contain_text("Queues")
    answer = user.goto("/ui/queues")
    assert answer is not None
    assert answer.status == 403
    expect(user.locator("#queues")).to_have_count(0)
    status, _ = api(service, "DELETE", f"/tasks/{accepted['id']}", user="root", groups="admins")
    assert status in (200, 202)


def test_auto_scroll_stops_while_the_reader_scrolls_up(console: Console, service: Service
                                                       ) -> None:
    page = console("alice")
    page.goto("/ui/tasks/lines")
    page.click("#submit")
    run_id(page)
    lines = page.locator("#log .line")
    expect(lines).to_have_count(200)
    log = page.locator("#log")

    def at_bottom() -> bool:
        return bool(log.evaluate("e => e.scrollHeight - e.scrollTop - e.clientHeight < 8"))

    assert log.evaluate("e => e.scrollHeight > e.clientHeight")
    wait_until_sync(at_bottom, timeout_s=30, message="the log follows its end")
    log.evaluate("e => { e.scrollTop = 0; e.dispatchEvent(new Event('scroll')); }")
    expect(page.locator("#follow-note")).to_contain_text("auto-scroll paused")
    service.release("lines")
    expect(lines).to_have_count(400)
    assert log.evaluate("e => e.scrollTop") == 0  # the reader's place is kept
    # Back at the bottom, it follows again.
    log.evaluate("e => { e.scrollTop = e.scrollHeight; e.dispatchEvent(new Event('scroll')); }")
    expect(page.locator("#follow-note")).to_have_text("")
    expect(page.locator("#state")).to_have_text("completed")


def test_run_in_schedules_and_a_scheduled_run_can_be_cancelled(console: Console,
                                                                service: Service) -> None:
    page = console("alice")
    page.goto("/ui/tasks/slow")
    page.check('input[name="when"][value="in"]')
    page.fill("#process-in", "soon")
    page.click("#submit")
    expect(page.locator("#err-schedule")).to_contain_text("process_in")  # the API's 400
    page.fill("#process-in", "1h")
    page.click("#submit")
    task_id = run_id(page)
    expect(page.locator("#state")).to_have_text("scheduled")
    expect(page.locator('[data-field="next_process_at"]')).not_to_have_text("—")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("canceled")
    assert state_of(service, task_id) == "canceled"
