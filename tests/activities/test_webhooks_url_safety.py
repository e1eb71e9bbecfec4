"""Which webhook URLs are refused, judged on every address the host resolves to."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from pydantic import SecretStr, ValidationError

from activities.url_safety import IPAddress, Resolver, UnsafeWebhookUrl, check_webhook_url
from config.settings import Settings


def resolving_to(*addresses: str) -> tuple[list[str], Resolver]:
    """A resolver answering ``addresses`` for any name, and the names it was asked."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> Sequence[IPAddress]:
        asked.append(f"{host}:{port}")
        return [ipaddress.ip_address(a) for a in addresses]

    return asked, resolve


async def _refusal(url: str, *addresses: str, allow_loopback: bool = False) -> str:
    _, resolve = resolving_to(*addresses)
    with pytest.raises(UnsafeWebhookUrl) as refused:
        await check_webhook_url(url, allow_loopback=allow_loopback, resolver=resolve)
    return str(refused.value)


@pytest.mark.parametrize(
    ("url", "because"),
    [
        ("http://93.184.215.14/hooks", "must use https"),
        ("ftp://93.184.215.14/hooks", "must use https"),
        ("https://127.0.0.1/hooks", "loopback"),
        ("https://[::1]/hooks", "loopback"),
        ("https://10.1.2.3/hooks", "private"),
        ("https://172.16.0.9/hooks", "private"),
        ("https://192.168.1.1/hooks", "private"),
        ("https://100.64.0.1/hooks", "not a public address"),  # carrier-grade NAT
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("https://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("https://169.254.10.10/hooks", "link-local"),
        ("https://[fe80::1]/hooks", "link-local"),
        ("https://[fc00::5]/hooks", "private"),
        ("https://224.0.0.251/hooks", "multicast"),
        ("https://[ff02::1]/hooks", "multicast"),
        ("https://0.0.0.0/hooks", "unspecified"),
        ("https://240.0.0.1/hooks", "reserved"),
        ("https://[::ffff:127.0.0.1]/hooks", "loopback"),  # IPv4-mapped
        ("https://[64:ff9b::a9fe:a9fe]/hooks", "cloud metadata"),  # NAT64 of 169.254.169.254
        ("https://[2002:0a00:0001::1]/hooks", "private"),  # 6to4 of 10.0.0.1
        ("https://user:pw@93.184.215.14/hooks", "credentials"),
        ("https://93.184.215.14/hooks#x", "fragment"),
        ("https://93.184.215.14:99999/hooks", "port"),
        ("https://%31%32%37.0.0.1/hooks", "not a valid host name"),
        ("https://[2606:4700::1%25eth0]/hooks", "not a valid host name"),
        ("https://93.184.215.14/hooks\n", "control characters"),
        ("https:///hooks", "no host"),
    ],
)
async def test_refused_urls_say_why(url: str, because: str) -> None:
    assert because in await _refusal(url, "93.184.215.14")


async def test_every_resolved_address_must_be_public() -> None:
    # One private answer among public ones is enough to refuse: the client (or an
    # attacker controlling its DNS) does not choose which one we would connect to.
    reason = await _refusal("https://hooks.acme.test/x", "93.184.215.14", "10.0.0.7")
    assert "'hooks.acme.test' resolves to 10.0.0.7, a private address" in reason


async def test_a_name_resolving_to_the_metadata_service_is_refused_even_for_development() -> None:
    reason = await _refusal("http://metadata.test/", "169.254.169.254", allow_loopback=True)
    assert "cloud metadata" in reason


async def test_a_host_that_does_not_resolve_is_refused() -> None:
    async def nxdomain(host: str, port: int) -> Sequence[IPAddress]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(UnsafeWebhookUrl, match="does not resolve"):
        await check_webhook_url("https://nowhere.test/x", allow_loopback=False, resolver=nxdomain)


async def test_public_urls_pass_with_every_address_checked() -> None:
    asked, resolve = resolving_to("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    target = await check_webhook_url(
        "https://Hooks.Acme.test:8443/in?x=1",
        allow_loopback=False,
        resolver=resolve,
    )
    assert asked == ["hooks.acme.test:8443"]
    assert target.host == "hooks.acme.test"
    assert target.port == 8443
    assert [str(a) for a in target.addresses] == [
        "93.184.215.14",
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
    ]


async def test_an_international_name_is_resolved_in_its_ascii_form() -> None:
    asked, resolve = resolving_to("93.184.215.14")
    target = await check_webhook_url(
        "https://bücher.test/hooks",
        allow_loopback=False,
        resolver=resolve,
    )
    assert asked == ["xn--bcher-kva.test:443"]
    assert target.host == "xn--bcher-kva.test"


async def test_the_development_allowance_admits_http_and_loopback_only() -> None:
    _, resolve = resolving_to("127.0.0.1")
    for url in ("http://127.0.0.1:8200/webhooks", "http://localhost.test:8200/webhooks"):
        target = await check_webhook_url(url, allow_loopback=True, resolver=resolve)
        assert [str(a) for a in target.addresses] == ["127.0.0.1"]
    assert "private" in await _refusal("http://10.0.0.1/x", "10.0.0.1", allow_loopback=True)


async def test_localhost_is_refused_through_the_real_resolver() -> None:
    with pytest.raises(UnsafeWebhookUrl, match=r"'localhost' resolves to .*loopback"):
        await check_webhook_url("https://localhost/webhooks", allow_loopback=False)


def test_production_settings_refuse_the_loopback_allowance() -> None:
    with pytest.raises(ValidationError, match="PAYMENTS_WEBHOOK_ALLOW_LOOPBACK"):
        Settings(
            environment="production",
            provider_api_key=SecretStr("sk_live_realistic"),
            webhook_allow_loopback=True,
        )
    allowed = Settings(environment="development", webhook_allow_loopback=True)
    assert allowed.webhook_allow_loopback
