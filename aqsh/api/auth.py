"""Identity and groups from trusted proxy headers.

aqsh sits behind an authenticating proxy (oauth2-proxy, an ingress with auth): it trusts the
configured headers and never parses credentials itself. A task with ``allowed_groups`` may be
submitted, read, cancelled and followed only by a caller in one of those groups.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from aqsh.api.errors import ApiError
from aqsh.runner.spec import TaskSpec
from aqsh.settings import Settings


class Caller(msgspec.Struct, frozen=True):
    user: str | None
    groups: frozenset[str]


def caller_of(request: web.Request, settings: Settings) -> Caller:
    user = request.headers.get(settings.identity_header, "").strip() or None
    if user is None and settings.require_identity:
        raise ApiError(401, "unauthenticated",
                       f"the {settings.identity_header} header is required")
    raw = request.headers.get(settings.groups_header, "")
    groups = frozenset(g.strip() for g in raw.split(",") if g.strip())
    return Caller(user=user, groups=groups)


def authorize(caller: Caller, spec: TaskSpec | None, task_name: str) -> None:
    if spec is None or not spec.allowed_groups:
        return
    if caller.groups.isdisjoint(spec.allowed_groups):
        raise ApiError(403, "forbidden",
                       f"task {task_name!r} is restricted to groups: "
                       + ", ".join(spec.allowed_groups))
