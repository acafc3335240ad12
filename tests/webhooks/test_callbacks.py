"""Per-submission callback_url: the operator's secret signs it, and where it may point is the
operator's policy (https, allowed hosts, public addresses unless a network is allowed)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from aqsh.webhooks.signing import new_secret
from aqsh.webhooks.ssrf import CallbackPolicy, CallbackRefused
from tests.support import wait_until
from tests.webhooks.conftest import HookFactory, HookService, Receiver
from tests.webhooks.test_webhooks import deliveries, tasks_yaml


def callback_settings(secret: str, **extra: Any) -> dict[str, Any]:
    return {"callback_secret": secret, "callback_allow_http": True,
            "callback_allowed_hosts": ("127.0.0.1", "localhost"), **extra}


async def post(service: HookService, **kwargs: Any) -> tuple[int, Any]:
    status, body, _ = await service.request("POST", "/tasks/plain", json={}, **kwargs)
    return status, body


async def test_callback_url_is_signed_with_the_operator_secret(
        make_hooks: HookFactory, receiver: Receiver) -> None:
    secret = new_secret()
    service = await make_hooks(tasks_yaml(receiver), **callback_settings(
        secret, callback_allowed_networks=("127.0.0.0/8",)))
    status, body = await post(service, params={"callback_url": receiver.url("/cb?token=t0p")})
    assert status == 202, body
    task_id = body["id"]
    await wait_until(lambda: receiver.at("/cb"), timeout_s=30, message="the callback")
    received = receiver.at("/cb")[0]
    payload = Webhook(secret).verify(received.body, received.headers)
    assert (payload["event"], payload["id"]) == ("task.completed", task_id)
    # The query (where tokens live) is not shown in the delivery log.
    (delivery,) = await deliveries(service, task_id)
    assert delivery["url"] == receiver.url("/cb") + "?…"
    # The header form works too.
    status, body = await post(service, headers={"Aqsh-Callback-Url": receiver.url("/cb2")})
    assert status == 202, body
    await wait_until(lambda: receiver.at("/cb2"), timeout_s=30, message="the header callback")


async def test_a_name_resolving_to_loopback_is_refused_at_delivery(
        make_hooks: HookFactory, receiver: Receiver) -> None:
    service = await make_hooks(tasks_yaml(receiver), **callback_settings(new_secret()))
    url = f"http://localhost:{receiver.port}/cb"
    status, body = await post(service, params={"callback_url": url})
    assert status == 202, body  # a name: only its addresses can tell, at connection time

    async def refused() -> list[dict[str, Any]]:
        found = await deliveries(service, body["id"])
        return found if found and found[0]["state"] == "refused" else []

    (delivery,) = await wait_until(refused, timeout_s=30, message="refused")
    (attempt,) = delivery["attempts"]
    assert attempt["outcome"] == "refused"
    assert "loopback" in attempt["error"]
    assert receiver.requests == []


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:9/cb", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[::1]:9/cb", "loopback"),
    ("http://10.1.2.3/cb", "private"),
    ("http://evil.example.com/cb", "AQSH_CALLBACK_ALLOWED_HOSTS"),
    ("ftp://127.0.0.1/cb", "must be"),
    ("http://user:pw@localhost/cb", "credentials"),
])
async def test_refused_callback_urls_are_a_400(make_hooks: HookFactory, receiver: Receiver,
                                               url: str, reason: str) -> None:
    service = await make_hooks(tasks_yaml(receiver), worker=False, **callback_settings(
        new_secret(), callback_allowed_hosts=("127.0.0.1", "localhost", "169.254.169.254",
                                              "::1", "10.1.2.3")))
    status, body = await post(service, params={"callback_url": url})
    assert (status, body["error"]["code"]) == (400, "invalid_callback_url"), body
    assert reason in body["error"]["message"]


async def test_https_only_unless_http_is_allowed(make_hooks: HookFactory,
                                                 receiver: Receiver) -> None:
    service = await make_hooks(tasks_yaml(receiver), worker=False, **callback_settings(
        new_secret(), callback_allow_http=False))
    status, body = await post(service, params={"callback_url": receiver.url("/cb")})
    assert (status, body["error"]["code"]) == (400, "invalid_callback_url")
    assert "https://" in body["error"]["message"]


async def test_callbacks_need_the_operator_to_enable_them(make_hooks: HookFactory,
                                                          receiver: Receiver) -> None:
    service = await make_hooks(tasks_yaml(receiver), worker=False)
    status, body = await post(service, params={"callback_url": "https://hooks.example.com/"})
    assert (status, body["error"]["code"]) == (400, "callbacks_disabled")
    status, body = await post(service, params={"callback_url": "https://a.example.com/"},
                              headers={"Aqsh-Callback-Url": "https://b.example.com/"})
    assert (status, body["error"]["code"]) == (400, "invalid_callback_url")


@pytest.mark.parametrize("address", [
    "127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "100.100.100.200", "224.0.0.1", "0.0.0.0", "::ffff:127.0.0.1", "fd00:ec2::254",
    "fe80::1",
])
def test_policy_refuses_non_public_addresses(address: str) -> None:
    policy = CallbackPolicy(["*"])
    with pytest.raises(CallbackRefused):
        policy.check_address(ipaddress.ip_address(address))


def test_policy_allows_public_addresses_and_allow_listed_networks() -> None:
    policy = CallbackPolicy(["*.example.com"], allowed_networks=["10.1.0.0/16"])
    policy.check_address(ipaddress.ip_address("93.184.215.14"))
    policy.check_address(ipaddress.ip_address("10.1.4.2"))
    with pytest.raises(CallbackRefused):
        policy.check_address(ipaddress.ip_address("10.2.0.1"))
    policy.check_url("https://hooks.Example.com./x")
    with pytest.raises(CallbackRefused, match="ALLOWED_HOSTS"):
        policy.check_url("https://example.com.evil.org/x")
