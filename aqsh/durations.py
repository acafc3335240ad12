"""Durations as operators write them (``90s``, ``10m``, ``1h30m``, ``250ms``): one parser for
tasks.yaml, settings, the API and the engine's ``@every`` schedules. It sits below every layer so
that the engine need not import the runner to read a cron spec."""

from __future__ import annotations

import re

DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_duration(text: object) -> float:
    """``90s``, ``10m``, ``1h30m``, ``24h``, ``250ms`` (or a bare number of seconds) → seconds."""
    if isinstance(text, bool):
        raise ValueError("a duration like 90s, 10m or 1h30m")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a non-negative duration")
        return float(text)
    if not isinstance(text, str):
        raise ValueError("a duration like 90s, 10m or 1h30m")
    if text.strip() == "0":  # zero needs no unit (``AQSH_SUBMIT_RETRY=0``); "10" stays refused
        return 0.0
    match = DURATION_RE.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"a duration like 90s, 10m or 1h30m, not {text!r}")
    hours, minutes, seconds, millis = (int(g) if g else 0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000
