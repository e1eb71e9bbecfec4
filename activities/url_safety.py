"""Is a webhook URL safe to POST to from inside our network?

A webhook URL is chosen by the client, so a careless one (or a malicious one)
could make the worker talk to our own services: the database host, the cloud
metadata endpoint, an admin port on localhost. We refuse such targets twice:

- when the URL is stored (``admin create-client`` / ``set-webhook-url``), so the
  client hears about it at once;
- before every delivery, because DNS may answer differently later (DNS
  rebinding). Delivery connects to the very address that was checked.

Every address a name resolves to must be public; one private answer refuses the
URL. ``allow_loopback`` (``PAYMENTS_WEBHOOK_ALLOW_LOOPBACK``, refused in
production) lets local development and the tests use ``http://127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# host, port -> every address the name resolves to. Injected in tests.
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

MAX_URL_LENGTH = 2048

# Named so the error says what was hit; they fail the generic checks too.
CLOUD_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    }
)

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64).
_NAT64_PREFIXES = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
)


class UnsafeWebhookUrl(ValueError):
    """The URL may not be used as a webhook target; the message says why."""


@dataclass(frozen=True)
class CheckedTarget:
    """A URL that passed the checks, with the addresses that were checked."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA) form: what goes into DNS and TLS SNI
    port: int
    addresses: tuple[IPAddress, ...]


# A slow resolver must not eat the delivery's time (its activity has 30 s in all).
RESOLVE_TIMEOUT_SECONDS = 5.0


async def system_resolver(host: str, port: int) -> Sequence[IPAddress]:
    """Every address of ``host``; raises OSError (``TimeoutError`` included) if none."""
    async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        # Strip an IPv6 zone ("fe80::1%eth0"); the address alone is what is judged.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in prefix for prefix in _NAT64_PREFIXES):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    # IPv4-compatible (::a.b.c.d, deprecated) still routes to the IPv4 host on some stacks.
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address))
    return None


def address_refusal(address: IPAddress, *, allow_loopback: bool) -> str | None:
    """Why ``address`` is not a webhook target, or None when it may be one."""
    if address in CLOUD_METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = address_refusal(embedded, allow_loopback=allow_loopback)
            return None if reason is None else f"{reason} ({embedded}, embedded)"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        # Shared address space (100.64/10), documentation ranges, benchmarking, ...
        return "not a public address"
    return None


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def _parse(url: str, *, allow_loopback: bool) -> tuple[str, str, int]:
    """(scheme, ASCII host, port), parsed exactly as the HTTP client will parse it."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeWebhookUrl(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise UnsafeWebhookUrl("the URL contains whitespace or control characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise UnsafeWebhookUrl(f"the URL cannot be parsed: {exc}") from exc
    allowed = ("https", "http") if allow_loopback else ("https",)
    if parsed.scheme not in allowed:
        raise UnsafeWebhookUrl("the URL must use https")
    if parsed.userinfo:
        raise UnsafeWebhookUrl("the URL must not carry credentials (user:password@)")
    if parsed.fragment:
        raise UnsafeWebhookUrl("the URL must not have a #fragment")
    if not host:
        raise UnsafeWebhookUrl("the URL has no host")
    # '%' (an IPv6 zone or a percent-encoded name) is never part of a webhook host.
    if "%" in host or (_literal_address(host) is None and not _HOST_NAME.fullmatch(host)):
        raise UnsafeWebhookUrl(f"the host {host!r} is not a valid host name")
    port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise UnsafeWebhookUrl(f"the port {port} is out of range")
    return parsed.scheme, host, port


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def check_webhook_url(
    url: str, *, allow_loopback: bool, resolver: Resolver = system_resolver
) -> CheckedTarget:
    """Parse ``url``, resolve its host and refuse it unless every address is public.

    Raises ``UnsafeWebhookUrl`` for a URL that is refused, and for a host that
    does not resolve (nothing can be said about it, so it is not accepted).
    """
    scheme, host, port = _parse(url, allow_loopback=allow_loopback)
    literal = _literal_address(host)
    if literal is not None:
        addresses: Sequence[IPAddress] = [literal]
    else:
        try:
            addresses = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeWebhookUrl(f"the host {host!r} does not resolve ({exc})") from exc
        if not addresses:
            raise UnsafeWebhookUrl(f"the host {host!r} does not resolve")
    for address in addresses:
        reason = address_refusal(address, allow_loopback=allow_loopback)
        if reason is not None:
            where = f"{address} is" if literal is not None else f"{host!r} resolves to {address},"
            raise UnsafeWebhookUrl(f"{where} {reason}; webhooks go to public addresses only")
    return CheckedTarget(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses))
