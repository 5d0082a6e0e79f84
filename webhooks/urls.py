"""Endpoint URLs and SSRF protection.

An endpoint URL is refused when its host resolves to any address that is not globally routable (private,
loopback, link-local, shared, reserved, multicast, unspecified; IPv4-mapped IPv6 included), unless
`webhooks_allow_private_urls` is on. The check runs when the endpoint is created or changed, and again on
every new connection of the dispatcher (`GuardedResolver`): the dispatcher connects to exactly the address it
checked, so a DNS answer that changes between check and connect (DNS rebinding) cannot reach an internal host.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import typing
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

MAX_URL_CHARS = 2048


class UrlRefused(ValueError):
    """The URL is malformed or points at an address the webhooks may not reach; the message says why."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL without credentials; UrlRefused otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise UrlRefused(f"url must be 1-{MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("url must start with https:// or http://")
    if not parts.hostname:
        raise UrlRefused("url has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("url must not contain credentials (user:password@)")
    if parts.fragment:
        raise UrlRefused("url must not contain a #fragment")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _refusal(host: str, address: str) -> UrlRefused:
    return UrlRefused(
        f"{host} resolves to {address}, which is not a public address (private, loopback, "
        "link-local or reserved); such endpoints are refused"
    )


def check_addresses(host: str, addresses: typing.Iterable[str]) -> list[str]:
    found = list(dict.fromkeys(addresses))
    if not found:
        raise UrlRefused(f"{host} does not resolve to any address")
    for address in found:
        if not is_public(address):
            raise _refusal(host, address)
    return found


def _addresses(infos: list[tuple[typing.Any, ...]]) -> list[str]:
    return [str(info[4][0]) for info in infos]


def check_url(url: str, allow_private: bool) -> str:
    """The URL if webhooks may be sent to it; UrlRefused otherwise (also when its host does not resolve)."""
    _, host, port = parse_url(url)
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UrlRefused(f"cannot resolve {host}: {exc.strerror}") from None
    check_addresses(host, _addresses(infos))
    return url


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver with the SSRF check at connect time: every new connection resolves the host (no DNS
    cache) and is refused when any address is not public; aiohttp then connects to exactly the addresses
    returned here (TLS still verifies and sends SNI for the URL's host name). IP-literal hosts skip resolvers
    in aiohttp: `refused_literal` covers them."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        try:
            check_addresses(host, [r["host"] for r in found])
        except UrlRefused as exc:
            # aiohttp reports a connector error as "Cannot connect to host …: [<strerror>]": keep the reason.
            raise OSError(errno.EACCES, str(exc)) from None
        return found

    async def close(self) -> None:
        await self._inner.close()


def refused_literal(host: str) -> str | None:
    """Why a URL whose host is an IP literal may not be reached (None: it may, or the host is a name)."""
    try:
        public = is_public(host.strip("[]"))
    except ValueError:
        return None  # a name: the resolver checks it
    return None if public else str(_refusal(host, host))
