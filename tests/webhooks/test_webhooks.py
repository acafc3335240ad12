"""Webhooks end to end: a real aqsh, a real receiver, signatures checked by the independent
``standardwebhooks`` package."""

from __future__ import annotations

import json
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from aqsh.webhooks import WEBHOOK_QUEUE
from aqsh.webhooks.signing import new_secret
from tests.support import wait_until
from tests.webhooks.conftest import HookFactory, HookService, Receiver, Reply


def tasks_yaml(receiver: Receiver, *, events: str = "", path: str = "/hook",
               secret: str = "secret_env: HOOK_SECRET", extra: str = "") -> str:
    ev = f", events: [{events}]" if events else ""
    notify = f'notify: [{{url: "{receiver.url(path)}"{ev}, {secret}}}]'
    return f"""\
defaults: {{timeout: 1m, max_retry: 0, retry_delay: 0s}}
tasks:
  ok:
    script: ok.sh
    {notify}
  fail:
    script: fail.sh
    max_retry: 1
    {notify}
  slow:
    script: slow.sh
    {notify}
  big:
    script: big.sh
    {notify}
  plain:
    script: ok.sh
{extra}"""


async def submit(service: HookService, name: str, *, params: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> str:
    status, body, _ = await service.request("POST", f"/tasks/{name}", json={},
                                            params=params or {}, headers=headers or {})
    assert status == 202, body
    return str(body["id"])


def verified(received: Any, secret: str) -> dict[str, Any]:
    """What a receiver does: verify with the independent library, then parse."""
    return Webhook(secret).verify(received.body, received.headers)  # type: ignore[no-any-return]


async def deliveries(service: HookService, task_id: str,
                     headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    status, body, _ = await service.request("GET", f"/tasks/{task_id}/deliveries",
                                            headers=headers or {})
    assert status == 200, body
    return list(body["deliveries"])


async def test_completed_is_signed_and_carries_the_task(make_hooks: HookFactory,
                                                        receiver: Receiver, secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver))
    task_id = await submit(service, "ok")
    await wait_until(lambda: receiver.at("/hook"), timeout_s=30, message="a webhook")
    received = receiver.at("/hook")[0]
    body = verified(received, secret)
    assert received.headers["webhook-id"] == f"msg_{task_id}_completed"
    assert received.headers["Content-Type"] == "application/json"
    assert body["event"] == "task.completed"
    assert body["id"] == task_id
    assert body["name"] == "ok"
    assert body["state"] == "completed"
    assert body["result"]["exit_code"] == 0
    assert body["result"]["data"] == '{"ok":true}'
    assert body["finished_at"] is not None
    assert body["started_at"] is not None
    assert body["links"]["deliveries"] == f"/tasks/{task_id}/deliveries"
    # The same document GET /tasks/{id} shows, plus event and the deliveries link.
    _, shown, _ = await service.request("GET", f"/tasks/{task_id}")
    assert {k: v for k, v in body.items() if k not in ("event", "links")} == {
        k: v for k, v in shown.items() if k != "links"}
    # Tampering is caught by the independent verifier.
    received.body = received.body.replace(b"completed", b"completeD", 1)
    with pytest.raises(Exception, match="signature"):
        verified(received, secret)

    async def delivered_metric() -> bool:
        _, text, _ = await service.request("GET", "/metrics")
        return ('aqsh_webhook_deliveries_total{event="task.completed",outcome="delivered"} 1.0'
                in text)

    await wait_until(delivered_metric, timeout_s=10, message="the delivery metric")
    _, text, _ = await service.request("GET", "/metrics")
    assert "aqsh_webhook_delivery_duration_seconds_count 1.0" in text


async def test_failed_after_the_last_retry_and_retrying_before(
        make_hooks: HookFactory, receiver: Receiver, secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver, events="task.retrying, task.failed"))
    task_id = await submit(service, "fail")
    await wait_until(lambda: len(receiver.at("/hook")) >= 2, timeout_s=40,
                     message="retrying and failed")
    first, second = (verified(r, secret) for r in receiver.at("/hook")[:2])
    assert first["event"] == "task.retrying"
    assert receiver.at("/hook")[0].headers["webhook-id"] == f"msg_{task_id}_retrying.1"
    assert second["event"] == "task.failed"
    assert second["state"] == "archived"
    assert second["last_error"] == "exit code 3"
    assert second["retries"] == 1
    assert second["result"]["exit_code"] == 3


async def test_canceled_while_waiting_and_while_running(
        make_hooks: HookFactory, receiver: Receiver, secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver))
    waiting = await submit(service, "ok", params={"process_in": "1h"})
    status, _, _ = await service.request("DELETE", f"/tasks/{waiting}")
    assert status == 200
    await wait_until(lambda: receiver.at("/hook"), timeout_s=30, message="canceled (waiting)")
    body = verified(receiver.at("/hook")[0], secret)
    assert (body["event"], body["id"], body["state"]) == ("task.canceled", waiting, "canceled")

    running = await submit(service, "slow")

    async def is_active() -> bool:
        _, shown, _ = await service.request("GET", f"/tasks/{running}")
        return bool(shown["state"] == "active")

    await wait_until(is_active, timeout_s=30, message="the slow task running")
    status, _, _ = await service.request("DELETE", f"/tasks/{running}")
    assert status in (200, 202)  # canceled, or still stopping
    await wait_until(lambda: len(receiver.at("/hook")) >= 2, timeout_s=30,
                     message="canceled (running)")
    body = verified(receiver.at("/hook")[1], secret)
    assert (body["event"], body["id"], body["state"]) == ("task.canceled", running, "canceled")


async def test_started_when_asked_for(make_hooks: HookFactory, receiver: Receiver,
                                      secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver, events="task.started, task.completed"))
    task_id = await submit(service, "ok")
    await wait_until(lambda: len(receiver.at("/hook")) >= 2, timeout_s=30, message="2 hooks")
    events = sorted(verified(r, secret)["event"] for r in receiver.at("/hook"))
    assert events == ["task.completed", "task.started"]
    ids = {r.headers["webhook-id"] for r in receiver.at("/hook")}
    assert ids == {f"msg_{task_id}_started.0", f"msg_{task_id}_completed"}


async def test_no_notify_no_delivery(make_hooks: HookFactory, receiver: Receiver,
                                     secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver))
    plain = await submit(service, "plain")
    noted = await submit(service, "ok")
    await wait_until(lambda: receiver.at("/hook"), timeout_s=30, message="the ok webhook")
    assert [verified(r, secret)["id"] for r in receiver.requests] == [noted]
    assert await deliveries(service, plain) == []


async def test_secret_rotation_both_signatures_verify(
        make_hooks: HookFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = new_secret(), new_secret()
    monkeypatch.setenv("HOOK_SECRET", f"{old} {new}")
    service = await make_hooks(tasks_yaml(receiver))
    await submit(service, "ok")
    await wait_until(lambda: receiver.at("/hook"), timeout_s=30, message="a webhook")
    received = receiver.at("/hook")[0]
    assert len(received.headers["webhook-signature"].split(" ")) == 2
    assert verified(received, old)["event"] == "task.completed"
    assert verified(received, new)["event"] == "task.completed"
    with pytest.raises(Exception, match="signature"):
        verified(received, new_secret())


async def test_secret_file_source(make_hooks: HookFactory, receiver: Receiver,
                                  tmp_path: Any) -> None:
    value = new_secret()
    path = tmp_path / "hook.secret"
    path.write_text(value + "\n")
    service = await make_hooks(tasks_yaml(receiver, secret=f'secret_file: "{path}"'))
    await submit(service, "ok")
    await wait_until(lambda: receiver.at("/hook"), timeout_s=30, message="a webhook")
    assert verified(receiver.at("/hook")[0], value)["event"] == "task.completed"


async def test_big_result_data_is_dropped_and_said(make_hooks: HookFactory, receiver: Receiver,
                                                   secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver), webhook_max_body_bytes=3000)
    task_id = await submit(service, "big")
    await wait_until(lambda: receiver.at("/hook"), timeout_s=30, message="a webhook")
    received = receiver.at("/hook")[0]
    body = verified(received, secret)
    assert len(received.body) <= 3000
    assert "data" not in body["result"]
    assert "over the webhook body limit of 3000 bytes" in body["result"]["data_omitted"]
    _, shown, _ = await service.request("GET", f"/tasks/{task_id}")
    assert len(shown["result"]["data"]) == 6000  # the task keeps it


async def test_retries_after_refused_500_and_timeout_then_success(
        make_hooks: HookFactory, secret: str) -> None:
    late = Receiver()  # not listening yet: the first attempt is refused
    late.plan("/hook", Reply(500), Reply(200, delay_s=8.0), Reply(200))
    service = await make_hooks(tasks_yaml(late), webhook_timeout_s=2.0)
    task_id = await submit(service, "ok")

    async def attempts() -> list[dict[str, Any]]:
        found = await deliveries(service, task_id)
        return list(found[0]["attempts"]) if found else []

    await wait_until(attempts, timeout_s=30, message="the refused attempt")
    await late.start()
    try:
        async def delivered() -> bool:
            found = await deliveries(service, task_id)
            return bool(found and found[0]["state"] == "delivered")

        await wait_until(delivered, timeout_s=60, interval_s=0.2, message="delivery")
        tried = await attempts()
        assert "connect" in (tried[0]["error"] or "").lower()
        assert tried[0]["outcome"] == "retrying"
        assert tried[0]["next_attempt_at"]
        assert (tried[1]["status"], tried[1]["outcome"]) == (500, "retrying")
        assert tried[2]["status"] is None
        assert "timed out" in tried[2]["error"]
        assert (tried[-1]["status"], tried[-1]["outcome"]) == (200, "delivered")
        ids = {r.headers["webhook-id"] for r in late.at("/hook")}
        assert ids == {f"msg_{task_id}_completed"}  # one id across every attempt
        assert len({r.body for r in late.at("/hook")}) == 1  # and the same bytes
        for received in late.at("/hook"):
            verified(received, secret)
    finally:
        await late.stop()


async def test_410_stops_retrying(make_hooks: HookFactory, receiver: Receiver,
                                  secret: str) -> None:
    receiver.plan("/hook", Reply(410))
    service = await make_hooks(tasks_yaml(receiver))
    task_id = await submit(service, "ok")

    async def gone() -> list[dict[str, Any]]:
        found = await deliveries(service, task_id)
        return found if found and found[0]["state"] == "gone" else []

    found = (await wait_until(gone, timeout_s=30, message="gone"))[0]
    assert [a["outcome"] for a in found["attempts"]] == ["gone"]
    assert found["next_attempt_at"] is None
    info = await service.state.inspector.find_task(found["id"], [WEBHOOK_QUEUE])
    assert info.state.value == "archived"  # no attempt will follow
    assert len(receiver.at("/hook")) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(make_hooks: HookFactory, receiver: Receiver,
                                       secret: str, status: int) -> None:
    receiver.plan("/hook", Reply(status, headers={"Retry-After": "3"}))
    # The schedule alone would retry at once.
    service = await make_hooks(tasks_yaml(receiver), webhook_schedule_s=(0.0, 0.0, 0.0))
    await submit(service, "ok")
    await wait_until(lambda: len(receiver.at("/hook")) >= 2, timeout_s=40, message="2 tries")
    first, second = receiver.at("/hook")[:2]
    assert second.at - first.at >= 3.0
    assert verified(second, secret)["event"] == "task.completed"


async def test_redirect_is_not_followed(make_hooks: HookFactory, receiver: Receiver,
                                        secret: str) -> None:
    receiver.plan("/hook", Reply(302, headers={"Location": receiver.url("/elsewhere")}))
    service = await make_hooks(tasks_yaml(receiver))
    task_id = await submit(service, "ok")

    async def first_attempt() -> list[dict[str, Any]]:
        found = await deliveries(service, task_id)
        return list(found[0]["attempts"]) if found else []

    tried = await wait_until(first_attempt, timeout_s=30, message="an attempt")
    assert (tried[0]["status"], tried[0]["outcome"]) == (302, "retrying")
    assert receiver.at("/elsewhere") == []
    await wait_until(lambda: len(receiver.at("/hook")) >= 2, timeout_s=30, message="retry")
    assert receiver.at("/elsewhere") == []


async def test_deliveries_endpoint_and_redelivery(make_hooks: HookFactory, receiver: Receiver,
                                                  secret: str) -> None:
    service = await make_hooks(tasks_yaml(receiver))
    task_id = await submit(service, "ok")

    async def delivered() -> list[dict[str, Any]]:
        found = await deliveries(service, task_id)
        return found if found and found[0]["state"] == "delivered" else []

    (delivery,) = await wait_until(delivered, timeout_s=30, message="delivered")
    assert delivery["event"] == "task.completed"
    assert delivery["url"] == receiver.url("/hook")
    assert delivery["webhook_id"] == f"msg_{task_id}_completed"
    (attempt,) = delivery["attempts"]
    assert (attempt["attempt"], attempt["status"], attempt["outcome"]) == (1, 200, "delivered")
    assert attempt["duration_ms"] >= 0
    assert attempt["error"] is None
    status, body, _ = await service.request(
        "POST", f"/tasks/{task_id}/deliveries/{delivery['id']}/retry")
    assert status == 202, body
    await wait_until(lambda: len(receiver.at("/hook")) >= 2, timeout_s=30, message="again")
    first, again = receiver.at("/hook")[:2]
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    assert again.body == first.body
    verified(again, secret)

    async def two_attempts() -> bool:
        found = await deliveries(service, task_id)
        return len(found[0]["attempts"]) == 2 and found[0]["state"] == "delivered"

    await wait_until(two_attempts, timeout_s=10, message="the second attempt listed")
    status, body, _ = await service.request(
        "POST", f"/tasks/{task_id}/deliveries/whk-nope/retry")
    assert (status, body["error"]["code"]) == (404, "delivery_not_found")
    status, body, _ = await service.request("GET", "/tasks/no-such-task/deliveries")
    assert status == 404


async def test_deliveries_follow_the_task_authorization(
        make_hooks: HookFactory, receiver: Receiver, secret: str) -> None:
    extra = f"""\
  secret:
    script: ok.sh
    allowed_groups: [ops]
    notify: [{{url: "{receiver.url('/hook')}", secret_env: HOOK_SECRET}}]
"""
    service = await make_hooks(tasks_yaml(receiver, extra=extra))
    ops = {"X-Forwarded-User": "olga", "X-Forwarded-Groups": "ops"}
    dev = {"X-Forwarded-User": "dave", "X-Forwarded-Groups": "dev"}
    task_id = await submit(service, "secret", headers=ops)

    async def delivered() -> list[dict[str, Any]]:
        found = await deliveries(service, task_id, headers=ops)
        return found if found and found[0]["state"] == "delivered" else []

    (delivery,) = await wait_until(delivered, timeout_s=30, message="delivered")
    for method, path in (("GET", f"/tasks/{task_id}/deliveries"),
                         ("POST", f"/tasks/{task_id}/deliveries/{delivery['id']}/retry")):
        status, body, _ = await service.request(method, path, headers=dev)
        assert (status, body["error"]["code"]) == (404, "task_not_found"), (method, body)
        status, body, _ = await service.request(method, path)  # anonymous
        assert status == 404
    status, _, _ = await service.request(
        "POST", f"/tasks/{task_id}/deliveries/{delivery['id']}/retry", headers=ops)
    assert status == 202
    assert json.loads(receiver.at("/hook")[0].body)["submitted_by"] == "olga"
