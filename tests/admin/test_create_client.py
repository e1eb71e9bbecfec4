"""``python -m admin create-client`` prints the key once and stores only its hash."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.credentials import hash_api_key
from ledger.tables import ApiClient, ApiKey

REPO_ROOT = Path(__file__).resolve().parents[2]


async def test_create_client_prints_the_key_once_and_stores_its_hash(
    database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "admin", "create-client", "--name", "acme",
         "--webhook-url", "https://93.184.215.14/webhooks"],
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": database_url,
             "PAYMENTS_WEBHOOK_ALLOW_LOOPBACK": "false"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip

    client_id = re.search(r"client_id:\s+(cli_\w+)", result.stdout)
    api_key = re.search(r"api_key:\s+(sk_\S+)", result.stdout)
    assert client_id is not None
    assert api_key is not None
    async with sessions() as session:
        client = await session.get(ApiClient, client_id.group(1))
        keys = (
            await session.scalars(select(ApiKey).where(ApiKey.client_id == client_id.group(1)))
        ).all()
    assert client is not None
    assert client.webhook_url == "https://93.184.215.14/webhooks"
    assert [key.key_hash for key in keys] == [hash_api_key(api_key.group(1))]
    assert api_key.group(1) not in {key.key_hash for key in keys}
    assert len(api_key.group(1)) >= 40, "at least 128 random bits after the prefix"
