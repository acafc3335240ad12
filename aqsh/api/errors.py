"""Every HTTP error is JSON ``{"error": {"code", "message", "details"?}}``, router 404/405 and
oversized bodies included; no traceback, Redis or Lua text ever reaches a client: a 500 carries
only an error id, and the log has the detail under that id."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aqsh import errors

log = structlog.get_logger("aqsh.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RETRY_AFTER_S = 5
CLIENT_CLOSED = 499


class ApiError(errors.AqshError):
    """An HTTP-level refusal with its own status and code."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.status = status
        self.api_code = code


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return web.json_response({"error": body}, status=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_input", 503: "unavailable"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.api_code, exc.message, exc.details)
    except errors.BrokerUnavailable as exc:
        log.warning("redis.unavailable", path=request.path, error=exc.message)
        return _unavailable()
    except (RedisConnectionError, RedisTimeoutError, ConnectionRefusedError) as exc:
        log.warning("redis.unavailable", path=request.path, error=str(exc))
        return _unavailable()
    except errors.BrokerFault as exc:
        # Redis refuses the command (NOPERM, WRONGTYPE): the service cannot work until an
        # operator acts. 503 like an outage, since nothing was stored, but the detail (which
        # may quote Redis) goes to the log under an id, not to the caller.
        error_id = uuid.uuid4().hex
        log.error("redis.refused", error_id=error_id, path=request.path, error=exc.message)
        return error_response(
            503, exc.code, f"the task store refused the operation (error id {error_id})",
            details={"error_id": error_id},
            headers={"X-Error-Id": error_id, "Retry-After": str(RETRY_AFTER_S)})
    except errors.AqshError as exc:
        if exc.http_status >= 500:  # its message may quote Redis or a Lua script
            return internal_error(request, exc)
        return error_response(exc.http_status, exc.code, exc.message, exc.details)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "payload_too_large",
                              f"request body is over the {request.app._client_max_size} byte "
                              "limit")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no route for {request.path}"
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, message, headers=headers)
    except ConnectionResetError as exc:
        if request.transport is not None and not request.transport.is_closing():
            return internal_error(request, exc)  # some other connection, not the client's
        # The client went away mid-request (closed its tab, timed out): nothing to answer and
        # nothing wrong on this side. Checked before the generic handler, which would log it as
        # an internal error; 499 (nginx's "client closed request") is what metrics count.
        log.debug("http.client_gone", path=request.path, method=request.method)
        return web.Response(status=CLIENT_CLOSED)
    except Exception as exc:
        return internal_error(request, exc)


def internal_error(request: web.Request, exc: BaseException) -> web.Response:
    error_id = uuid.uuid4().hex
    log.error("http.internal_error", error_id=error_id, path=request.path,
              method=request.method, exc_info=exc)
    return error_response(500, "internal", f"internal server error (error id {error_id})",
                          details={"error_id": error_id}, headers={"X-Error-Id": error_id})


def _unavailable() -> web.Response:
    return error_response(503, "redis_unavailable",
                          "the task store is unreachable; retry later",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
