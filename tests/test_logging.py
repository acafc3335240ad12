"""aqsh.logging: JSON lines rendered by msgspec carry what structlog's JSONRenderer wrote."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from aqsh.logging import configure_logging


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    root_handlers = list(logging.getLogger().handlers)
    yield
    structlog.configure(**saved)
    logging.getLogger().handlers[:] = root_handlers


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


def test_json_lines_have_level_timestamp_context_and_repr_fallback(
    restore_structlog: None, capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    log = structlog.get_logger("aqsh.test")
    with structlog.contextvars.bound_contextvars(task_id="t1"):
        log.info("request.served", status=202, odd=Odd(), user=None, ratio=0.5)
    log.debug("not.shown")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("task.failed")
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2
    served, failed = (json.loads(line) for line in lines)
    assert served["event"] == "request.served"
    assert (served["level"], served["task_id"], served["status"], served["user"],
            served["ratio"], served["odd"]) == ("info", "t1", 202, None, 0.5, "<odd>")
    # RFC 3339 in UTC with a Z, as structlog's TimeStamper(fmt="iso", utc=True) writes it.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", served["timestamp"])
    assert failed["level"] == "error"
    assert "ValueError: boom" in failed["exception"]


def test_pretty_lines_stay_key_value_text(
    restore_structlog: None, capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("pretty", "warning")
    log = structlog.get_logger("aqsh.test")
    log.info("not.shown")
    log.warning("queue.paused", queue="default")
    err = capfd.readouterr().err
    assert "queue.paused" in err
    assert "queue=default" in err
    assert "not.shown" not in err
