"""The admin commands that touch webhooks: a URL is checked before it is stored
(create-client, set-webhook-url), and rotate-webhook-secret keeps the old secret
signing until its overlap ends."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from activities.url_safety import IPAddress, UnsafeWebhookUrl
from admin.__main__ import main as admin_main
from admin.clients import CreatedClient, add_client, create_client_async
from admin.webhooks import set_webhook_url_async
from ledger.repositories import ClientRepository
from ledger.tables import ApiClient

REPO_ROOT = Path(__file__).resolve().parents[2]
PUBLIC_URL = "https://93.184.215.14/webhooks"


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


class AdminCli(Protocol):
    async def __call__(self, *args: str, allow_loopback: bool = False) -> Ran: ...


@pytest.fixture
def admin(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> AdminCli:
    """``python -m admin ...`` in this process (its ``main``), with the settings in the env.

    One test below runs the real subprocess; in-process keeps the rest fast.
    """

    async def run(*args: str, allow_loopback: bool = False) -> Ran:
        monkeypatch.setenv("DATABASE_URL", database_url)
        monkeypatch.setenv("PAYMENTS_WEBHOOK_ALLOW_LOOPBACK", "true" if allow_loopback else "false")
        capsys.readouterr()
        returncode = await asyncio.to_thread(admin_main, list(args))
        out = capsys.readouterr()
        return Ran(returncode, out.out, out.err)

    return run


async def _client(sessions: async_sessionmaker[AsyncSession], url: str | None) -> CreatedClient:
    async with sessions() as session, session.begin():
        return await add_client(session, name="admin-webhooks", webhook_url=url)


async def _stored_url(sessions: async_sessionmaker[AsyncSession], client_id: str) -> str | None:
    async with sessions() as session:
        client = await session.get(ApiClient, client_id)
    assert client is not None
    return client.webhook_url


async def _client_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ApiClient)) or 0)


@pytest.mark.parametrize(
    ("url", "because"),
    [
        ("http://93.184.215.14/webhooks", "must use https"),
        ("https://localhost/webhooks", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ],
)
async def test_create_client_refuses_an_unsafe_webhook_url_and_creates_nothing(
    admin: AdminCli, sessions: async_sessionmaker[AsyncSession], url: str, because: str
) -> None:
    before = await _client_count(sessions)

    result = await admin("create-client", "--name", "evil", "--webhook-url", url)

    assert result.returncode == 2
    assert "webhook URL refused" in result.stderr
    assert because in result.stderr
    assert "api_key" not in result.stdout
    assert await _client_count(sessions) == before


async def test_create_client_accepts_a_local_receiver_when_loopback_is_allowed(
    admin: AdminCli, sessions: async_sessionmaker[AsyncSession]
) -> None:
    url = "http://127.0.0.1:8200/webhooks"

    result = await admin(
        "create-client", "--name", "dev", "--webhook-url", url, allow_loopback=True
    )

    assert result.returncode == 0, result.stderr
    client_id = re.search(r"client_id:\s+(cli_\w+)", result.stdout)
    assert client_id is not None
    assert await _stored_url(sessions, client_id.group(1)) == url


async def test_a_name_resolving_to_a_private_address_is_refused_at_creation(
    database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async def split_horizon(host: str, port: int) -> Sequence[IPAddress]:
        return [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("192.168.0.10")]

    async def public(host: str, port: int) -> Sequence[IPAddress]:
        return [ipaddress.ip_address("93.184.215.14")]

    before = await _client_count(sessions)
    with pytest.raises(UnsafeWebhookUrl, match=r"192\.168\.0\.10, a private address"):
        await create_client_async(
            database_url,
            name="split",
            webhook_url="https://hooks.acme.test/in",
            resolver=split_horizon,
        )
    assert await _client_count(sessions) == before

    created = await create_client_async(
        database_url, name="fine", webhook_url="https://hooks.acme.test/in", resolver=public
    )
    assert await _stored_url(sessions, created.client_id) == "https://hooks.acme.test/in"


async def test_set_webhook_url_stores_a_checked_url_and_keeps_the_old_one_on_refusal(
    admin: AdminCli, sessions: async_sessionmaker[AsyncSession]
) -> None:
    client = await _client(sessions, None)

    changed = await admin("set-webhook-url", "--client", client.client_id,
                          "--url", PUBLIC_URL)  # fmt: skip
    refused = await admin("set-webhook-url", "--client", client.client_id,
                          "--url", "https://[fd00:ec2::254]/latest")  # fmt: skip

    assert changed.returncode == 0, changed.stderr
    assert refused.returncode == 2
    assert "cloud metadata" in refused.stderr
    assert await _stored_url(sessions, client.client_id) == PUBLIC_URL

    cleared = await admin("set-webhook-url", "--client", client.client_id, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert await _stored_url(sessions, client.client_id) is None


async def test_set_webhook_url_in_process_checks_names_after_resolution(
    database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    client = await _client(sessions, PUBLIC_URL)

    async def rebound(host: str, port: int) -> Sequence[IPAddress]:
        return [ipaddress.ip_address("127.0.0.1")]

    with pytest.raises(UnsafeWebhookUrl, match="loopback"):
        await set_webhook_url_async(
            database_url, client.client_id, "https://hooks.acme.test/in", resolver=rebound
        )
    assert await _stored_url(sessions, client.client_id) == PUBLIC_URL


async def test_commands_on_an_unknown_client_fail_without_a_trace(admin: AdminCli) -> None:
    rotate = await admin("rotate-webhook-secret", "--client", "cli_nobody")
    set_url = await admin("set-webhook-url", "--client", "cli_nobody",
                          "--url", PUBLIC_URL)  # fmt: skip

    assert (rotate.returncode, set_url.returncode) == (1, 1)
    assert "no client cli_nobody" in rotate.stderr
    assert "no client cli_nobody" in set_url.stderr


async def test_rotate_webhook_secret_prints_the_new_secret_and_keeps_the_old_for_the_overlap(
    database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    client = await _client(sessions, PUBLIC_URL)
    started = datetime.now(UTC)

    # The real command, as an operator runs it.
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "admin", "rotate-webhook-secret", "--client", client.client_id,
         "--overlap-hours", "24"],
        cwd=REPO_ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    new_secret = re.search(r"webhook_secret:\s+(whsec_\S+)", result.stdout)
    valid_until = re.search(r"previous valid until (\S+)", result.stdout)
    assert new_secret is not None
    assert valid_until is not None
    until = datetime.fromisoformat(valid_until.group(1).replace("Z", "+00:00"))
    assert started + timedelta(hours=24) - timedelta(seconds=5) <= until
    assert until <= datetime.now(UTC) + timedelta(hours=24)
    async with sessions() as session:
        target = await ClientRepository(session).webhook_target(client.client_id)
    assert target is not None
    assert target.signing_secrets == (new_secret.group(1), client.webhook_secret)


async def test_rotate_webhook_secret_refuses_a_negative_or_huge_overlap(
    admin: AdminCli, sessions: async_sessionmaker[AsyncSession]
) -> None:
    client = await _client(sessions, None)

    negative = await admin("rotate-webhook-secret", "--client", client.client_id,
                           "--overlap-hours", "-1")  # fmt: skip
    huge = await admin("rotate-webhook-secret", "--client", client.client_id,
                       "--overlap-hours", "100000")  # fmt: skip

    assert (negative.returncode, huge.returncode) == (2, 2)
    async with sessions() as session:
        target = await ClientRepository(session).webhook_target(client.client_id)
    assert target is not None
    assert target.signing_secrets == (client.webhook_secret,), "nothing rotated"
