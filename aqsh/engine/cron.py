"""Cron specs as asynq's Scheduler accepts them, and Go's duration notation.

Accepted: five fields (minute hour day-of-month month day-of-week), the descriptors
``@yearly @annually @monthly @weekly @daily @midnight @hourly``, ``@every <duration>``, each
optionally prefixed with ``CRON_TZ=<zone>`` or ``TZ=<zone>`` (default UTC) — the forms of the
robfig/cron standard parser asynq uses. croniter computes the fire times (time zones and DST
included).

One deliberate difference: ``@every`` fires on multiples of its interval since the Unix epoch,
not relative to when the process started, so every replica of a worker computes the same fire
times and their enqueues of one fire can be deduplicated.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from aqsh.durations import parse_duration

DESCRIPTORS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})


class CronSpec:
    """A parsed spec; ``next_after`` gives the first fire time strictly after a moment."""

    def __init__(self, text: str) -> None:
        """Raises ValueError with a message fit to show an operator."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a cron spec such as '0 3 * * *', '@hourly' or '@every 10m'")
        self.text = text.strip()
        expression = self.text
        self.zone: tzinfo = UTC
        head, _, rest = expression.partition(" ")
        if head.startswith(("CRON_TZ=", "TZ=")):
            zone_name = head.partition("=")[2]
            try:
                self.zone = ZoneInfo(zone_name)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {zone_name!r}") from None
            expression = rest.strip()
        self.every_s: float | None = None
        self.expression = expression
        if expression.startswith("@every"):
            try:
                self.every_s = parse_duration(expression.removeprefix("@every").strip())
            except ValueError:
                raise ValueError("@every needs a duration such as 30s, 10m or 1h30m") from None
            if self.every_s < 1:
                raise ValueError("@every needs an interval of at least 1s")
        elif expression.startswith("@"):
            if expression not in DESCRIPTORS:
                raise ValueError(f"unknown descriptor {expression!r}; use one of "
                                 + ", ".join(sorted(DESCRIPTORS)) + " or @every <duration>")
        elif len(expression.split()) != 5 or not croniter.is_valid(expression):
            raise ValueError(
                f"{expression!r} is not a cron spec: five fields (minute hour day-of-month "
                "month day-of-week), a descriptor such as @daily, or @every <duration>")

    def next_after(self, after_s: float) -> float:
        """Unix seconds of the first fire time strictly after ``after_s``."""
        if self.every_s is not None:
            return (math.floor(after_s / self.every_s) + 1) * self.every_s
        start = datetime.fromtimestamp(after_s, self.zone)
        return float(croniter(self.expression, start).get_next(float))

    def __repr__(self) -> str:
        return f"CronSpec({self.text!r})"


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()``: ``1h0m0s``, ``1m30s``, ``45s``, ``1.5s``, ``250ms``.

    The Go Inspector parses option strings such as ``Timeout(30m0s)`` with Go's duration parser,
    so they are written the way Go writes them.
    """
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, ns = divmod(ns, 3600 * 10**9)
    minutes, ns = divmod(ns, 60 * 10**9)
    secs = _trim(ns / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
