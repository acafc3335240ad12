"""Authorization as an attacker with an ordinary account would try it: spoofed identity headers,
probing task ids, tasks enqueued by a Go service, tasks whose type left tasks.yaml."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from aqsh.api.auth import normalise_groups
from aqsh.engine import keys
from aqsh.runner.schedules import periodic_tasks
from aqsh.runner.spec import HEADER_ALLOWED_GROUPS, load_tasks
from tests.api.conftest import TASKS_YAML, Service, ServiceFactory, make_service, write_tasks

__all__ = ["make_service"]  # the fixture, imported so pytest finds it here

pytestmark = pytest.mark.timeout(90)

MEMBER = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "ops"}
OUTSIDER = {"X-Forwarded-User": "mallory", "X-Forwarded-Groups": "dev"}
ADMIN = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "platform"}


async def submit_secret(service: Service) -> str:
    status, body, _ = await service.request("POST", "/tasks/secret?process_in=1h",
                                            json={"name": "x"}, headers=MEMBER)
    assert status == 202, body
    return str(body["id"])


def without_id(body: Any, task_id: str) -> Any:
    return msgspec.json.decode(msgspec.json.encode(body).replace(task_id.encode(), b"ID"))


# ---------------------------------------------------------------------------- trusted proxies
async def test_identity_headers_from_an_untrusted_peer_are_ignored_and_logged_once(
    make_service: ServiceFactory,
) -> None:
    # The test client connects from 127.0.0.1, outside the only trusted network.
    service = await make_service(worker=False, trusted_proxies=("10.0.0.0/8",),
                                 admin_groups=("platform",))
    with capture_logs() as logs:
        denied = await service.request("POST", "/tasks/secret", json={"name": "x"},
                                       headers=MEMBER)
        status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                                headers={"X-Forwarded-User": "ceo"})
    assert denied[0] == 403  # the claimed group "ops" was not believed
    assert status == 202
    assert body["submitted_by"] is None  # nor was the claimed identity
    warnings = [e for e in logs if e["event"] == "auth.untrusted_peer"]
    assert len(warnings) == 1
    assert warnings[0]["peer"] == "127.0.0.1"
    # Nor does a claimed admin group open an admin-only task.
    foreign = await service.state.client.enqueue("echo", b"{}", process_at=None)
    assert (await service.request("GET", f"/tasks/{foreign.id}", headers=ADMIN))[0] == 404


async def test_untrusted_peer_with_identity_required_gets_401(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False, trusted_proxies=("10.0.0.0/8",),
                                 require_identity=True)
    status, body, _ = await service.request("POST", "/tasks/echo", json={"name": "a"},
                                            headers=MEMBER)
    assert status == 401
    assert body["error"]["code"] == "unauthenticated"
    assert (await service.request("GET", "/tasks", headers=MEMBER))[0] == 401


async def test_loopback_is_trusted_by_default(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False)
    status, body, _ = await service.request("POST", "/tasks/secret", json={"name": "x"},
                                            headers=MEMBER)
    assert status == 202
    assert body["submitted_by"] == "carol"


# ---------------------------------------------------------------------------- group variants
def test_group_header_normalisation() -> None:
    assert normalise_groups([" ops , dev "]) == {"ops", "dev"}
    assert normalise_groups([",,ops,,, ,"]) == {"ops"}
    assert normalise_groups(["ops,ops,ops"]) == {"ops"}
    assert normalise_groups(["Ops"]) == {"Ops"}  # case is kept: Ops is not ops
    assert normalise_groups(["", " , "]) == frozenset()
    assert normalise_groups(["\tops\t"]) == {"ops"}


@pytest.mark.parametrize(("groups", "status"), [
    (" ops ", 202), ("dev,,ops,", 202), ("ops,ops", 202), (" , ,ops", 202),
    ("OPS", 403), ("Ops", 403), ("", 403), (", ,", 403), ("op", 403), ("ops2", 403),
    ("dev ops", 403),  # one group named "dev ops", not two
])
async def test_group_header_variants(make_service: ServiceFactory, groups: str,
                                     status: int) -> None:
    service = await make_service(worker=False)
    got, body, _ = await service.request("POST", "/tasks/secret", json={"name": "x"},
                                         headers={"X-Forwarded-Groups": groups})
    assert got == status, body


async def test_identity_or_groups_sent_twice_is_refused(make_service: ServiceFactory) -> None:
    """A proxy that appends its header instead of replacing the client's would otherwise let the
    client's line win (it comes first)."""
    service = await make_service(worker=False)
    for name, values in (("X-Forwarded-User", ("mallory", "carol")),
                         ("X-Forwarded-Groups", ("ops", "dev"))):
        headers = [(name, v) for v in values]
        status, body, _ = await service.request("POST", "/tasks/secret", json={"name": "x"},
                                                headers=headers)
        assert status == 400, name
        assert body["error"]["code"] == "ambiguous_identity"


# ---------------------------------------------------------------------------- 404, not 403
async def test_a_task_the_caller_may_not_see_is_indistinguishable_from_a_missing_one(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False)
    task_id = await submit_secret(service)
    missing_id = "00000000-0000-0000-0000-000000000000"
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/logs"),
                           ("GET", "/logs?follow=false")):
        hidden = await service.request(method, f"/tasks/{task_id}{suffix}", headers=OUTSIDER)
        absent = await service.request(method, f"/tasks/{missing_id}{suffix}", headers=OUTSIDER)
        assert hidden[0] == absent[0] == 404, (method, suffix)
        assert without_id(hidden[1], task_id) == without_id(absent[1], missing_id)
        assert hidden[2]["Content-Type"] == absent[2]["Content-Type"]
    # The outsider's DELETE did nothing.
    status, body, _ = await service.request("GET", f"/tasks/{task_id}", headers=MEMBER)
    assert (status, body["state"]) == (200, "scheduled")
    # A submit the caller may not make is still 403: the task type is public.
    denied = await service.request("POST", "/tasks/secret", json={"name": "x"},
                                   headers=OUTSIDER)
    assert denied[0] == 403


# ---------------------------------------------------------------------------- foreign tasks
@pytest.mark.parametrize("task_type", ["echo", "deploy-prod"])
async def test_a_go_enqueued_task_is_for_admins_only(make_service: ServiceFactory,
                                                     task_type: str) -> None:
    """A Go service (or an older aqsh) enqueues without aqsh's access record: whether or not its
    type is in tasks.yaml, and even if that type is open, only admins may see or cancel it."""
    service = await make_service(worker=False, admin_groups=("platform",))
    info = await service.state.client.enqueue(
        task_type, b'{"name":"go"}', queue="default", process_at=None,
        headers={"trace-id": "abc"})
    for caller in ({}, OUTSIDER, MEMBER, {"X-Forwarded-Groups": "ops,admins,dev"}):
        for method in ("GET", "DELETE"):
            status, body, _ = await service.request(method, f"/tasks/{info.id}",
                                                    headers=caller)
            assert status == 404, (caller, method, body)
            assert body["error"]["code"] == "task_not_found"
        assert (await service.request("GET", f"/tasks/{info.id}/logs",
                                      headers=caller))[0] == 404
    pending = keys.queue_keys("default").pending
    assert await service.state.redis.lrange(pending, 0, -1) == [info.id.encode()]
    status, body, _ = await service.request("GET", f"/tasks/{info.id}", headers=ADMIN)
    assert (status, body["name"]) == (200, task_type)
    status, body, _ = await service.request("DELETE", f"/tasks/{info.id}", headers=ADMIN)
    assert (status, body["state"]) == (200, "canceled")


async def test_a_malformed_access_record_fails_closed(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False)
    info = await service.state.client.enqueue(
        "echo", b'{"name":"x"}', queue="default", process_at=None,
        headers={HEADER_ALLOWED_GROUPS: "ops"})  # not a JSON list
    assert (await service.request("GET", f"/tasks/{info.id}", headers=MEMBER))[0] == 404


async def test_an_open_task_is_open_to_anyone_but_its_record_says_so(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False)
    _, body, _ = await service.request("POST", "/tasks/echo", json={"name": "a"})
    info = await service.state.inspector.find_task(body["id"])
    assert info.message.headers[HEADER_ALLOWED_GROUPS] == "[]"
    assert (await service.request("GET", f"/tasks/{body['id']}"))[0] == 200
    assert (await service.request("GET", f"/tasks/{body['id']}", headers=OUTSIDER))[0] == 200


# ---------------------------------------------------------------------------- config changes
async def test_removing_a_task_from_tasks_yaml_does_not_lift_its_groups(
    make_service: ServiceFactory, tmp_path: Any,
) -> None:
    service = await make_service(worker=False)
    task_id = await submit_secret(service)
    info = await service.state.inspector.find_task(task_id)
    assert info.message.headers[HEADER_ALLOWED_GROUPS] == '["admins","ops"]'
    without_secret = TASKS_YAML[:TASKS_YAML.index("  secret:")]
    write_tasks(tmp_path, without_secret)
    assert service.state.config.reload()
    assert "secret" not in service.state.config().tasks
    for method in ("GET", "DELETE"):
        assert (await service.request(method, f"/tasks/{task_id}", headers=OUTSIDER))[0] == 404
        assert (await service.request(method, f"/tasks/{task_id}"))[0] == 404
    assert (await service.request("GET", f"/tasks/{task_id}", headers=MEMBER))[0] == 200


async def test_opening_a_task_type_does_not_open_its_stored_tasks_but_narrowing_applies(
    make_service: ServiceFactory, tmp_path: Any,
) -> None:
    service = await make_service(worker=False)
    task_id = await submit_secret(service)
    write_tasks(tmp_path, TASKS_YAML.replace("allowed_groups: [ops, admins]",
                                             "allowed_groups: []"))
    assert service.state.config.reload()
    assert (await service.request("GET", f"/tasks/{task_id}", headers=OUTSIDER))[0] == 404
    assert (await service.request("GET", f"/tasks/{task_id}", headers=MEMBER))[0] == 200
    write_tasks(tmp_path, TASKS_YAML.replace("allowed_groups: [ops, admins]",
                                             "allowed_groups: [admins]"))
    assert service.state.config.reload()
    assert (await service.request("GET", f"/tasks/{task_id}", headers=MEMBER))[0] == 404
    assert (await service.request("GET", f"/tasks/{task_id}",
                                  headers={"X-Forwarded-Groups": "admins"}))[0] == 200


# ---------------------------------------------------------------------------- catalogue
SCHEDULED_YAML = TASKS_YAML + """\
  rotate:
    script: echo.sh
    allowed_groups: [ops]
    input:
      - {name: name, env: NAME, required: true}
    schedules:
      - {cron: "0 3 * * *", input: {name: hunter2}}
"""


async def test_the_catalogue_lists_only_what_the_caller_may_run(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(worker=False, tasks_yaml=SCHEDULED_YAML,
                                 admin_groups=("platform",))

    async def names(headers: dict[str, str]) -> set[str]:
        status, body, _ = await service.request("GET", "/tasks", headers=headers)
        assert status == 200
        return {t["name"] for t in body["tasks"]}

    open_tasks = {"echo", "lines", "slow", "result"}
    assert await names({}) == open_tasks
    assert await names(OUTSIDER) == open_tasks
    assert await names(MEMBER) == open_tasks | {"secret", "rotate"}
    assert await names(ADMIN) == open_tasks | {"secret", "rotate"}
    _, text, _ = await service.request("GET", "/tasks", headers=OUTSIDER)
    assert "hunter2" not in str(text)
    _, body, _ = await service.request("GET", "/tasks", headers=MEMBER)
    rotate = next(t for t in body["tasks"] if t["name"] == "rotate")
    assert rotate["schedules"][0]["input"] == {"name": "hunter2"}

    async def documented(headers: dict[str, str]) -> set[str]:
        status, doc, _ = await service.request("GET", "/openapi.json", headers=headers)
        assert status == 200
        (name,) = [p for p in doc["paths"]["/tasks/{id}"]["post"]["parameters"]
                   if p["in"] == "path"]
        return set(name["schema"]["enum"])

    assert await documented(OUTSIDER) == open_tasks
    assert await documented(MEMBER) == open_tasks | {"secret", "rotate"}


def test_scheduled_runs_carry_the_access_record(tmp_path: Any) -> None:
    config_path, scripts = write_tasks(tmp_path, SCHEDULED_YAML)
    config = load_tasks(str(config_path), str(scripts))
    (rotate,) = periodic_tasks(config, result_retention_s=60)
    assert rotate.headers[HEADER_ALLOWED_GROUPS] == '["ops"]'


async def test_admins_see_and_cancel_everything(make_service: ServiceFactory) -> None:
    service = await make_service(worker=False, admin_groups=("platform",))
    task_id = await submit_secret(service)
    assert (await service.request("GET", f"/tasks/{task_id}", headers=ADMIN))[0] == 200
    status, body, _ = await service.request("DELETE", f"/tasks/{task_id}", headers=ADMIN)
    assert (status, body["state"]) == (200, "canceled")


# ---------------------------------------------------------------------------- settings
def test_trusted_proxies_setting() -> None:
    from aqsh.errors import ConfigError
    from aqsh.settings import load_settings

    assert load_settings({}).trusted_proxies == ("127.0.0.0/8", "::1/128")
    parsed = load_settings({"AQSH_TRUSTED_PROXIES": " 10.1.2.3/8 , fd00::/8,192.168.0.7"})
    assert parsed.trusted_proxies == ("10.0.0.0/8", "fd00::/8", "192.168.0.7/32")
    assert load_settings({"AQSH_TRUSTED_PROXIES": ""}).trusted_proxies == ()  # trust no one
    with pytest.raises(ConfigError, match="AQSH_TRUSTED_PROXIES"):
        load_settings({"AQSH_TRUSTED_PROXIES": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="AQSH_TRUSTED_PROXIES"):
        load_settings({"AQSH_TRUSTED_PROXIES": "proxy.internal"})
    admins = load_settings({"AQSH_ADMIN_GROUPS": "platform, sre,,"}).admin_groups
    assert admins == ("platform", "sre")


def test_peer_trust() -> None:
    from aqsh.api.auth import PeerTrust

    trust = PeerTrust(("127.0.0.0/8", "::1/128", "10.0.0.0/8"))
    assert trust.trusts("127.0.0.1")
    assert trust.trusts("10.20.30.40")
    assert trust.trusts("::1")
    assert trust.trusts("::ffff:10.0.0.1")  # an IPv4 peer on a dual-stack socket
    assert not trust.trusts("11.0.0.1")
    assert not trust.trusts("::ffff:11.0.0.1")
    assert not trust.trusts("fe80::1%eth0")
    assert not trust.trusts(None)  # a Unix socket peer has no address to vouch for it
    assert not trust.trusts("not an address")
    assert not PeerTrust(()).trusts("127.0.0.1")
