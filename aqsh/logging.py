"""structlog setup: coloured key=value lines in a terminal, JSON lines in containers.

Events are named ``noun.verb`` (``task.started``, ``task.canceled``) with ``task_id``, ``name``,
``queue`` and ``user`` bound where they are known. A submission is logged on its request's
access log line (``request.served`` with ``task_id``, ``name``, ``queue``, ``user``).

JSON lines are rendered by msgspec and written as bytes: the API writes one line per request
(``request.served``), so the renderer is on the request path, and the standard library's
``json.dumps`` plus an ISO timestamp string built per event were a measurable share of it
(benchmarks/README.md, "HTTP request path"). Same document: the same keys, the timestamp in the
same RFC 3339 form (``2026-01-02T03:04:05.123456Z``), values JSON cannot hold as their
``repr()`` as structlog's JSONRenderer writes them.

Loggers are not cached on first use (``cache_logger_on_first_use``): a cached module-level
logger would no longer see a later ``structlog.configure`` — ``structlog.testing.capture_logs``
included — and the request path binds its own logger once per connection instead.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict, WrappedLogger

_encoder = msgspec.json.Encoder(enc_hook=repr)


def utc_stamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """``timestamp``: now, as a datetime the JSON renderer writes in RFC 3339 with a ``Z``."""
    event_dict["timestamp"] = datetime.now(UTC)
    return event_dict


def render_json(_: WrappedLogger, __: str, event_dict: EventDict) -> bytes:
    """The event as one JSON object (bytes, for a BytesLogger)."""
    return _encoder.encode(event_dict)


def render_json_text(logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
    """``render_json`` for a text stream."""
    return render_json(logger, name, event_dict).decode()


def configure_logging(fmt: str = "pretty", level: str = "info") -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [structlog.contextvars.merge_contextvars,
                             structlog.processors.add_log_level]
    factory: Any
    binary = getattr(sys.stderr, "buffer", None)  # None when a test replaced stderr
    if fmt == "json" and binary is not None:
        processors += [utc_stamp, structlog.processors.format_exc_info, render_json]
        factory = structlog.BytesLoggerFactory(file=binary)
    elif fmt == "json":
        processors += [utc_stamp, structlog.processors.format_exc_info, render_json_text]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True),
                       structlog.processors.format_exc_info,
                       structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(name)s %(message)s")
