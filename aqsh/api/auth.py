"""Identity and groups from trusted proxy headers, and who may see which task.

aqsh sits behind an authenticating proxy (oauth2-proxy, an ingress with auth): it believes the
configured identity and groups headers only on connections from ``AQSH_TRUSTED_PROXIES`` and
never parses credentials itself. From any other peer those headers are ignored, so a caller who
reaches the port directly is anonymous, whatever it sends.

Groups header normalisation: every entry of a comma-separated list is trimmed of whitespace,
empty entries are dropped, duplicates collapse, and case is kept exactly (``Ops`` is not
``ops``: group names are compared as the identity provider spells them). Identity or groups
sent twice (two header lines) is refused with 400: a proxy that appends instead of replacing
would otherwise let the client's own line win.

Tasks are authorised by the access record stored with them at submit (see
``aqsh.runner.spec.HEADER_ALLOWED_GROUPS``), not by today's tasks.yaml: a caller may see and
cancel a task when it is an admin, or when the record says the task was open (``[]``), or
when the caller is in one of the recorded groups — and, while the task type is still
configured with ``allowed_groups``, also in one of those (a config change may narrow access to
stored tasks, never widen it). A task without a record is for admins only. A caller who may not
see a task is told it does not exist (404, the same body as for an unknown id).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping

import msgspec
import structlog
from aiohttp import web

from aqsh import errors
from aqsh.api.errors import ApiError
from aqsh.runner.spec import HEADER_ALLOWED_GROUPS, TaskSpec
from aqsh.settings import Settings

log = structlog.get_logger("aqsh.api")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Caller(msgspec.Struct, frozen=True):
    user: str | None
    groups: frozenset[str]
    admin: bool = False


class PeerTrust:
    """Decides whether a connection's peer is a trusted proxy, and says once (per process)
    that headers from an untrusted peer were ignored — once, so a scanner cannot flood the
    log, yet the first misrouted request of a misconfigured deployment is visible."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs)
        self.warned = False

    @functools.lru_cache(maxsize=1024)  # noqa: B019 - one instance per app, bounded cache
    def trusts(self, peer: str | None) -> bool:
        if peer is None:
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def normalise_groups(values: Iterable[str]) -> frozenset[str]:
    return frozenset(g.strip() for raw in values for g in raw.split(",") if g.strip())


#: A request with neither identity nor groups header, from any peer, when identity is optional.
ANONYMOUS = Caller(user=None, groups=frozenset())


def caller_of(request: web.Request, settings: Settings, trust: PeerTrust) -> Caller:
    user_lines = request.headers.getall(settings.identity_header, [])
    group_lines = request.headers.getall(settings.groups_header, [])
    if not user_lines and not group_lines and not settings.require_identity:
        # Nothing to believe or ignore: who the peer is cannot change the answer.
        return ANONYMOUS
    if not trust.trusts(request.remote):
        if (user_lines or group_lines) and not trust.warned:
            trust.warned = True
            log.warning("auth.untrusted_peer", peer=request.remote,
                        headers=[h for h, v in ((settings.identity_header, user_lines),
                                                (settings.groups_header, group_lines)) if v],
                        hint="identity headers are believed only from AQSH_TRUSTED_PROXIES; "
                             "logged once per process")
        user_lines, group_lines = [], []
    if len(user_lines) > 1 or len(group_lines) > 1:
        raise ApiError(400, "ambiguous_identity",
                       "the identity and groups headers must each appear at most once")
    user = user_lines[0].strip() if user_lines else ""
    if not user and settings.require_identity:
        raise ApiError(401, "unauthenticated",
                       f"the {settings.identity_header} header is required")
    groups = normalise_groups(group_lines)
    return Caller(user=user or None, groups=groups,
                  admin=not groups.isdisjoint(settings.admin_groups))


def may_run(caller: Caller, spec: TaskSpec) -> bool:
    return caller.admin or not spec.allowed_groups or not caller.groups.isdisjoint(
        spec.allowed_groups)


def authorize_submit(caller: Caller, spec: TaskSpec, task_name: str) -> None:
    """The one place a 403 is right: the task type is public (GET /tasks lists it to anyone who
    may run it), so refusing tells nothing about any stored task."""
    if not may_run(caller, spec):
        raise ApiError(403, "forbidden",
                       f"task {task_name!r} is restricted to groups: "
                       + ", ".join(spec.allowed_groups))


def recorded_groups(headers: Mapping[str, str]) -> frozenset[str] | None:
    """The task's stored access record, or None when it has none (or a malformed one)."""
    raw = headers.get(HEADER_ALLOWED_GROUPS)
    if raw is None:
        return None
    try:
        groups = msgspec.json.decode(raw, type=list[str])
    except msgspec.DecodeError:
        return None
    return frozenset(groups)


def may_see(caller: Caller, headers: Mapping[str, str], spec: TaskSpec | None) -> bool:
    if caller.admin:
        return True
    recorded = recorded_groups(headers)
    if recorded is None:
        return False
    if recorded and caller.groups.isdisjoint(recorded):
        return False
    return spec is None or may_run(caller, spec)


def authorize_task(caller: Caller, task_id: str, headers: Mapping[str, str],
                   spec: TaskSpec | None) -> None:
    if not may_see(caller, headers, spec):
        # Exactly what Inspector.find_task raises for an unknown id: a caller cannot tell a
        # task it may not see from one that does not exist.
        raise errors.TaskNotFound(f"task {task_id} not found")
