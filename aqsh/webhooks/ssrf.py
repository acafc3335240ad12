"""Where a caller's ``callback_url`` may point (operators' ``notify`` URLs are trusted).

A URL must be https (http only when ``AQSH_CALLBACK_ALLOW_HTTP``), name a host that matches
one of ``AQSH_CALLBACK_ALLOWED_HOSTS`` (``example.com``, ``*.example.com``; matched without
case), and every address that host resolves to must be public — not loopback, link-local
(cloud metadata at 169.254.169.254 and friends), private, shared (CGNAT), multicast, reserved
or unspecified — unless it lies in ``AQSH_CALLBACK_ALLOWED_NETWORKS``.

The check is made on the addresses, at connection time: ``GuardedResolver`` is the resolver
of the callback HTTP session, so the address that was checked is the address connected to (a
name that resolves to a public address when checked and to 127.0.0.1 a moment later — DNS
rebinding — cannot slip through between a check and a second lookup). Literal IPs, which
aiohttp never hands to a resolver, are checked by ``check_url``.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Named for the record: every one is also non-global, so the general rule refuses them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
MAX_URL_CHARS = 2048


class CallbackRefused(Exception):
    """Not an OSError on purpose: aiohttp wraps those into connection errors (retried), while
    a refusal is final."""


class CallbackPolicy:
    def __init__(self, allowed_hosts: Iterable[str] = (), *, allow_http: bool = False,
                 allowed_networks: Iterable[str] = ()) -> None:
        self.allowed_hosts = tuple(h.strip().lower().rstrip(".") for h in allowed_hosts
                                   if h.strip())
        self.allow_http = allow_http
        self.allowed_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in allowed_networks)

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)

    def check_url(self, url: str) -> None:
        """Raises CallbackRefused saying why ``url`` may not be called."""
        if len(url) > MAX_URL_CHARS:
            raise CallbackRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise CallbackRefused("not a valid URL") from None
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            raise CallbackRefused("the URL must be " + (
                "http:// or https://" if self.allow_http else "https://"))
        if not host:
            raise CallbackRefused("the URL has no host")
        if parts.username is not None or parts.password is not None:
            raise CallbackRefused("the URL must not carry credentials")
        host = host.lower().rstrip(".")
        if not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allowed_hosts):
            raise CallbackRefused(f"host {host!r} is not in AQSH_CALLBACK_ALLOWED_HOSTS")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return
        self.check_address(literal)

    def check_address(self, address: Address) -> None:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed_networks):
            return
        if address in METADATA_ADDRESSES:
            raise CallbackRefused(f"{address} is a cloud metadata address")
        if address.is_multicast:
            raise CallbackRefused(f"{address} is a multicast address")
        if not address.is_global:
            kind = ("loopback" if address.is_loopback else "link-local" if
                    address.is_link_local else "private" if address.is_private else "non-public")
            raise CallbackRefused(f"{address} is a {kind} address")


class GuardedResolver(AbstractResolver):
    """Resolves once and hands aiohttp only addresses the policy allows; a name with any
    refused address is refused whole (a mixed answer is how rebinding attacks start)."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            results = await self._inner.resolve(host, port, family)
        except OSError as exc:
            raise CallbackRefused(f"cannot resolve {host!r}: {exc}") from None
        for result in results:
            self.policy.check_address(ipaddress.ip_address(result["host"].split("%", 1)[0]))
        return results

    async def close(self) -> None:
        await self._inner.close()


def redact(url: str) -> str:
    """The URL as the delivery log shows it: no credentials, no query (tokens live there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


@functools.lru_cache(maxsize=8)
def callback_policy(allowed_hosts: tuple[str, ...], allow_http: bool,
                    allowed_networks: tuple[str, ...]) -> CallbackPolicy:
    return CallbackPolicy(allowed_hosts, allow_http=allow_http,
                          allowed_networks=allowed_networks)
