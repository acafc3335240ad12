"""A run waiting on ``?after=`` that the dependency sweep cancels (its dependency failed) never
reaches a worker, yet its callback_url and its task type's ``notify`` still hear of it, with
the event a run cancelled before it started gets (``task.canceled``, as DELETE gives). A real
aqsh wired as ``aqsh serve`` wires it, a real local receiver, a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from aqsh.webhooks.signing import new_secret
from tests.support import wait_until
from tests.webhooks.conftest import HookFactory, HookService, Receiver

pytestmark = pytest.mark.timeout(120)


def after_yaml(receiver: Receiver) -> str:
    return f"""\
defaults: {{timeout: 1m, max_retry: 0, retry_delay: 0s}}
tasks:
  fail:
    script: fail.sh
  plain:
    script: ok.sh
  noted:
    script: ok.sh
    notify: [{{url: "{receiver.url('/notify')}", secret_env: HOOK_SECRET}}]
"""


async def submit(service: HookService, task: str, **params: str) -> str:
    status, body, _ = await service.request("POST", f"/tasks/{task}", json={}, params=params)
    assert status == 202, body
    return str(body["id"])


async def test_a_dependent_cancelled_by_the_sweep_gets_its_webhooks(
        make_hooks: HookFactory, receiver: Receiver, secret: str) -> None:
    callback_secret = new_secret()
    service = await make_hooks(after_yaml(receiver), callback_secret=callback_secret,
                               callback_allow_http=True,
                               callback_allowed_hosts=("127.0.0.1", "localhost"),
                               callback_allowed_networks=("127.0.0.0/8",))
    first = await submit(service, "fail")
    dependent = await submit(service, "plain", after=first, callback_url=receiver.url("/cb"))
    noted = await submit(service, "noted", after=dependent)

    await wait_until(lambda: receiver.at("/cb") and receiver.at("/notify"), timeout_s=60,
                     message="the cancelled dependents' webhooks")
    (received,) = receiver.at("/cb")
    body: dict[str, Any] = Webhook(callback_secret).verify(received.body, received.headers)
    assert (body["event"], body["id"]) == ("task.canceled", dependent)
    assert received.headers["webhook-id"] == f"msg_{dependent}_canceled"
    assert first in body["last_error"]
    assert body["started_at"] is None  # it never ran
    # The chain goes on: the run waiting on the cancelled one is cancelled and told too.
    (note,) = receiver.at("/notify")
    noted_body: dict[str, Any] = Webhook(secret).verify(note.body, note.headers)
    assert (noted_body["event"], noted_body["id"]) == ("task.canceled", noted)
    assert dependent in noted_body["last_error"]
