"""The stack as the end-to-end tests see it: HTTP addresses, the provider's truth,
the ledger's sums, the webhooks that arrived."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import CreatedClient
from config.settings import venv_bin
from devstack.stack import Stack
from devstack.webhook_receiver import ReceivedWebhook
from ledger.repositories import PaymentRepository
from tests.helpers.eventually import wait_until
from tests.helpers.provider import SandboxProvider

__all__ = ["E2EStack", "temporal_cli", "wait_until"]


async def temporal_cli(*args: str) -> str:
    """The installed ``temporal`` CLI's output; the command must succeed."""
    process = await asyncio.create_subprocess_exec(
        venv_bin("temporal"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    return output.decode()


@dataclass
class E2EStack:
    stack: Stack
    client: CreatedClient
    sessions: async_sessionmaker[AsyncSession]

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    @property
    def temporal_address(self) -> str:
        return self.stack.temporal_address

    @property
    def provider(self) -> SandboxProvider:
        env = self.stack.settings_env()
        return SandboxProvider(self.stack.provider_url, env["PAYMENTS_PROVIDER_API_KEY"])

    def webhooks(self) -> list[ReceivedWebhook]:
        return list(self.stack.webhooks.received)

    async def provider_stats(self) -> dict[str, Any]:
        return await self.provider.stats()

    async def ledger_balance(self, payment_id: str) -> tuple[int, int]:
        """(number of ledger entries, their sum) for one payment."""
        async with self.sessions() as session:
            return await PaymentRepository(session).entries_balance(payment_id)
