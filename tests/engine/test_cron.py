"""Cron specs: the forms asynq's Scheduler accepts, fire times across zones and DST, and Go's
duration notation for option strings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aqsh.engine.cron import CronSpec, go_duration


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat()


@pytest.mark.parametrize(("spec", "after", "expected"), [
    ("*/5 * * * *", "2026-03-01T10:03:00+00:00", "2026-03-01T10:05:00+00:00"),
    ("*/5 * * * *", "2026-03-01T10:05:00+00:00", "2026-03-01T10:10:00+00:00"),  # strictly after
    ("0 3 * * *", "2026-03-01T10:00:00+00:00", "2026-03-02T03:00:00+00:00"),
    ("@hourly", "2026-03-01T10:00:01+00:00", "2026-03-01T11:00:00+00:00"),
    ("@daily", "2026-03-01T10:00:00+00:00", "2026-03-02T00:00:00+00:00"),
    ("@weekly", "2026-03-04T10:00:00+00:00", "2026-03-08T00:00:00+00:00"),  # Sunday
    ("@every 10m", "2026-03-01T10:03:00+00:00", "2026-03-01T10:10:00+00:00"),
    ("@every 1h30m", "1970-01-01T01:00:00+00:00", "1970-01-01T01:30:00+00:00"),
    # 03:00 in Berlin is 02:00 UTC in winter, 01:00 UTC in summer (DST began 2026-03-29).
    ("CRON_TZ=Europe/Berlin 0 3 * * *", "2026-03-27T12:00:00+00:00",
     "2026-03-28T02:00:00+00:00"),
    ("CRON_TZ=Europe/Berlin 0 3 * * *", "2026-03-28T12:00:00+00:00",
     "2026-03-29T01:00:00+00:00"),
    ("TZ=America/New_York @daily", "2026-07-01T12:00:00+00:00", "2026-07-02T04:00:00+00:00"),
])
def test_next_fire_time(spec: str, after: str, expected: str) -> None:
    assert iso(CronSpec(spec).next_after(at(after))) == expected


def test_every_is_aligned_to_the_epoch_so_replicas_agree() -> None:
    spec = CronSpec("@every 30s")
    assert spec.next_after(1000.0) == spec.next_after(1009.9) == 1020.0
    assert CronSpec("@every 30s").next_after(1019.0) == 1020.0


@pytest.mark.parametrize(("spec", "message"), [
    ("", "a cron spec such as"),
    ("* * * *", "five fields"),
    ("* * * * * *", "five fields"),  # seconds are not part of asynq's standard parser
    ("61 * * * *", "is not a cron spec"),
    ("@fortnightly", "unknown descriptor"),
    ("@every soon", "@every needs a duration"),
    ("@every 500ms", "at least 1s"),
    ("CRON_TZ=Mars/Olympus 0 3 * * *", "unknown time zone 'Mars/Olympus'"),
])
def test_bad_specs_say_what_is_accepted(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        CronSpec(spec)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.25, "250ms"), (1.5, "1.5s"), (45, "45s"), (90, "1m30s"), (1800, "30m0s"),
    (3600, "1h0m0s"), (259200, "72h0m0s"), (3725.5, "1h2m5.5s"), (0.0000015, "1.5µs"),
])
def test_go_duration_strings(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
