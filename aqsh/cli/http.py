"""The HTTP side of the client commands: JSON calls and a log stream that survives drops.

The standard library's urllib is enough here: one request at a time, and a stream read line by
line. Identity travels the way aqsh expects it behind its proxy: a bearer token for the proxy
to check (``AQSH_TOKEN``), or the identity and groups headers themselves (``AQSH_USER``,
``AQSH_GROUPS``) where the CLI is the trusted hop (a CI runner on the proxy's side).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aqsh.cli.output import CliError

#: A stream read that sees nothing (not even the server's 15 s ping) for this long is dead.
STREAM_READ_TIMEOUT_S = 60.0
#: Reconnecting gives up after this long without getting a stream back.
RECONNECT_GIVE_UP_S = 120.0
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Endpoint:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def absolute(self, path: str, query: Mapping[str, str] | None = None) -> str:
        target = self.url.rstrip("/") + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        return target


@dataclass
class Event:
    """One server-sent event."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class StreamDropped(Exception):
    pass


def _error_message(status: int, raw: bytes) -> tuple[str, str]:
    try:
        body = json.loads(raw)
        error = body["error"]
        return str(error.get("code", "error")), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace").strip().splitlines()
        return f"http_{status}", text[0] if text else f"HTTP {status}"


class ApiError(CliError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})")
        self.status = status
        self.code = code


class Api:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def _request(self, method: str, path: str, *, body: Any = None,
                 query: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None) -> urllib.request.Request:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **self.endpoint.headers, **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.endpoint.absolute(path, query), data=data,
                                      method=method, headers=all_headers)

    def call(self, method: str, path: str, *, body: Any = None,
             query: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None) -> Any:
        """The JSON answer of one call; an error answer raises ApiError with its message."""
        request = self._request(method, path, body=body, query=query, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            code, message = _error_message(exc.code, exc.read())
            raise ApiError(exc.code, code, message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise CliError(f"cannot reach {self.endpoint.url}: {_reason(exc)}") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"{self.endpoint.url} answered with something that is not JSON "
                           "(is AQSH_URL an aqsh API?)") from None

    def text(self, path: str, query: Mapping[str, str] | None = None) -> str:
        request = self._request("GET", path, query=query)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
                return str(resp.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as exc:
            code, message = _error_message(exc.code, exc.read())
            raise ApiError(exc.code, code, message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise CliError(f"cannot reach {self.endpoint.url}: {_reason(exc)}") from None

    def events(self, path: str, last_event_id: str | None = None) -> Iterator[Event]:
        """One connection's events; StreamDropped when it breaks before the server ends it."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        request = self._request("GET", path, headers=headers)
        try:
            resp = urllib.request.urlopen(request, timeout=STREAM_READ_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            code, message = _error_message(exc.code, exc.read())
            if exc.code >= 500:
                raise StreamDropped(message) from None
            raise ApiError(exc.code, code, message) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise StreamDropped(_reason(exc)) from None
        with resp:
            try:
                yield from parse_events(resp)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise StreamDropped(_reason(exc)) from None
        raise StreamDropped("the server closed the stream")


def parse_events(lines: Any) -> Iterator[Event]:
    """The text/event-stream format: ``field: value`` lines, a blank line ends an event."""
    current = Event()
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data or current.event != "message":
                current.data = "\n".join(data)
                yield current
            current, data = Event(), []
            continue
        if line.startswith(":"):
            continue  # a comment: the server's keep-alive ping
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value


def follow(api: Api, task_id: str, on_line: Callable[[str], None],
           on_reconnect: Callable[[str], None] | None = None,
           last_event_id: str | None = None) -> str:
    """Stream a task's log to its end and return the eof event's data (the exit code, as
    text). A dropped connection is reopened with ``Last-Event-ID`` set to the last line seen,
    so no line is lost or repeated; an ``error`` event (the server could not read the log for
    a moment) is treated the same way."""
    path = f"/tasks/{urllib.parse.quote(task_id, safe='')}/logs"
    last = last_event_id
    delay_s = 0.25
    give_up_at = time.monotonic() + RECONNECT_GIVE_UP_S
    while True:
        try:
            for event in api.events(path, last):
                give_up_at = time.monotonic() + RECONNECT_GIVE_UP_S
                delay_s = 0.25
                if event.event == "eof":
                    return event.data
                if event.event == "error":
                    raise StreamDropped(event.data or "the server reported a stream error")
                if event.id:
                    last = event.id
                if event.event == "message":
                    on_line(event.data)
                elif event.event == "gap" and on_reconnect is not None:
                    on_reconnect(f"some log lines are lost: {event.data}")
        except StreamDropped as exc:
            if time.monotonic() >= give_up_at:
                raise CliError(f"lost the log stream of {task_id} and could not get it back: "
                               f"{exc}") from None
            if on_reconnect is not None:
                on_reconnect(f"log stream dropped ({exc}); reconnecting")
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return " ".join(text.split())
