"""tasks.yaml ``notify`` and the AQSH_* webhook settings: mistakes name file:line and field."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from aqsh.errors import ConfigError
from aqsh.runner.spec import DEFAULT_WEBHOOK_EVENTS, NotifySpec, load_tasks
from aqsh.settings import load_settings
from aqsh.webhooks.delivery import parse_retry_after, schedule_delay
from aqsh.webhooks.signing import InvalidSecret, new_secret, parse_secrets, signature_header
from aqsh.webhooks.ssrf import redact


def config(tmp_path: Path, notify: str) -> Path:
    script = tmp_path / "ok.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    path = tmp_path / "tasks.yaml"
    path.write_text(f"tasks:\n  ok:\n    script: ok.sh\n    notify:\n{notify}")
    return path


def test_notify_entries_load(tmp_path: Path) -> None:
    path = config(tmp_path, """\
      - url: https://ci.example.com/hooks/aqsh
        secret_env: CI_HOOK_SECRET
      - {url: "http://10.0.0.5/x", events: [task.failed, task.started], secret_file: /s}
""")
    spec = load_tasks(path, tmp_path).tasks["ok"]
    assert spec.notify == (
        NotifySpec(url="https://ci.example.com/hooks/aqsh", events=DEFAULT_WEBHOOK_EVENTS,
                   secret_env="CI_HOOK_SECRET"),
        NotifySpec(url="http://10.0.0.5/x", events=("task.failed", "task.started"),
                   secret_file="/s"),
    )


def test_notify_mistakes_name_file_line_and_field(tmp_path: Path) -> None:
    path = config(tmp_path, """\
      - {url: "ftp://x", secret_env: A}
      - {url: "https://x", events: [task.done], secret_env: A}
      - {url: "https://x"}
      - {url: "https://x", secret_env: lower, colour: red}
      - {url: "https://x", secret_env: A, secret_file: /s}
""")
    with pytest.raises(ConfigError) as caught:
        load_tasks(path, tmp_path)
    text = caught.value.message
    where = f"{path}:"
    assert f"{where}5: task 'ok': field 'notify[0].url': must be an absolute" in text
    assert f"{where}6: task 'ok': field 'notify[1].events': unknown event(s) task.done" in text
    assert f"{where}7: task 'ok': field 'notify[2]': needs exactly one of" in text
    assert f"{where}8: task 'ok': field 'notify[3].colour': unknown key" in text
    assert f"{where}8: task 'ok': field 'notify[3].secret_env': must match" in text
    assert f"{where}9: task 'ok': field 'notify[4]': needs exactly one of" in text


def test_the_webhook_queue_name_is_reserved(tmp_path: Path) -> None:
    script = tmp_path / "ok.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  ok:\n    script: ok.sh\n    queue: 'aqsh:webhooks'\n")
    with pytest.raises(ConfigError, match="reserved"):
        load_tasks(path, tmp_path)


def test_webhook_settings() -> None:
    secret = new_secret()
    settings = load_settings({
        "AQSH_LOG_FORMAT": "json", "AQSH_WEBHOOK_SCHEDULE": "0s,5s,5m",
        "AQSH_WEBHOOK_TIMEOUT": "3s", "AQSH_CALLBACK_SECRET": secret,
        "AQSH_CALLBACK_ALLOWED_HOSTS": "hooks.example.com, *.ci.example.com",
        "AQSH_CALLBACK_ALLOWED_NETWORKS": "10.1.0.0/16",
    })
    assert settings.webhook_schedule_s == (0, 5, 300)
    assert settings.webhook_timeout_s == 3
    assert settings.callback_allowed_hosts == ("hooks.example.com", "*.ci.example.com")
    assert settings.callback_allowed_networks == ("10.1.0.0/16",)
    defaults = load_settings({"AQSH_LOG_FORMAT": "json"})
    assert defaults.webhook_schedule_s == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert defaults.webhook_timeout_s == 15


@pytest.mark.parametrize(("name", "value"), [
    ("AQSH_CALLBACK_SECRET", "not-a-secret"),
    ("AQSH_CALLBACK_SECRET", "whsec_" + base64.b64encode(b"short").decode()),
    ("AQSH_WEBHOOK_SCHEDULE", "soon"),
    ("AQSH_CALLBACK_ALLOWED_NETWORKS", "nowhere"),
])
def test_bad_webhook_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_signatures_verify_with_the_reference_library() -> None:
    old, new = new_secret(), new_secret(24)
    keys = parse_secrets(f"{old}\n{new}")
    body = b'{"event":"task.completed"}'
    import time

    now = int(time.time())
    header = signature_header(keys, "msg_1", now, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": header}
    assert Webhook(old).verify(body, headers) == {"event": "task.completed"}
    assert Webhook(new).verify(body, headers) == {"event": "task.completed"}
    with pytest.raises(InvalidSecret, match="at least 24"):
        parse_secrets("whsec_" + base64.b64encode(b"x" * 23).decode())


def test_schedule_retry_after_and_redaction() -> None:
    schedule = (0, 5, 300)
    assert [schedule_delay(schedule, n) for n in range(4)] == [5, 300, 300, 300]
    assert parse_retry_after("120", 0) == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10
    assert parse_retry_after("soon", 0) is None
    assert redact("https://u:p@hooks.example.com:8443/a/b?token=x") == (
        "https://hooks.example.com:8443/a/b?…")


def test_a_worker_given_only_the_webhook_queue_only_delivers() -> None:
    from aqsh.service import delivery_only

    assert delivery_only(load_settings({"AQSH_WORKER_QUEUES": "aqsh:webhooks"}))
    assert not delivery_only(load_settings({"AQSH_WORKER_QUEUES": "aqsh:webhooks,default"}))
    assert not delivery_only(load_settings({}))


def test_the_webhook_queue_in_worker_queues() -> None:
    parsed = load_settings({"AQSH_WORKER_QUEUES": "aqsh:webhooks, default:3, aqsh:webhooks:2"})
    assert parsed.worker_queues == (("aqsh:webhooks", 1), ("default", 3), ("aqsh:webhooks", 2))
