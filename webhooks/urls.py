"""Endpoint URLs and SSRF protection.

An endpoint URL is refused when its host resolves to any address that is not globally routable (private,
loopback, link-local, shared, reserved, multicast, unspecified; IPv4-mapped IPv6 included), unless
`webhooks_allow_private_urls` is on. The check runs when the endpoint is created or changed, and again on
every new connection of the dispatcher (`GuardedBackend`): the dispatcher connects to exactly the address it
checked, so a DNS answer that changes between check and connect (DNS rebinding) cannot reach an internal host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from urllib.parse import urlsplit

import httpcore

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
    return UrlRefused(f"{host} resolves to {address}, which is not a public address (private, loopback, "
                      "link-local or reserved); such endpoints are refused")


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


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the SSRF check at connect time: resolves the host once, refuses the
    connection if any address is not public, and connects to a checked address (TLS still verifies and sends
    SNI for the URL's host name, which httpcore passes to start_tls)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:
        target = host
        if not self.allow_private:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from None
            try:
                target = check_addresses(host, _addresses(infos))[0]
            except UrlRefused as exc:
                raise httpcore.ConnectError(str(exc)) from None
        return await self._inner.connect_tcp(target, port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not webhook endpoints")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
