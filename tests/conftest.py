"""Shared fixtures: real PostgreSQL, the real sandbox provider, a webhook receiver.

Everything listens on free ports and is stopped at the end of the session.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from activities.payments import PaymentActivities
from activities.provider_client import ProviderClient
from activities.webhooks import WebhookSender
from config.settings import DEV_PROVIDER_API_KEY, Settings
from devstack.ports import free_port
from devstack.postgres import PostgresServer
from devstack.processes import ManagedProcess
from devstack.webhook_receiver import WebhookReceiver
from ledger.db import create_engine, session_factory
from ledger.migrate import upgrade_to_head
from ledger.outcomes import libpq_url
from ledger.payment_sql import PooledPaymentLedger
from tests.helpers.provider import SandboxProvider

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
async def database_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    data_dir = tmp_path_factory.mktemp("pg") / "data"
    server = PostgresServer(data_dir, free_port(), log_path=data_dir.parent / "postgres.log")
    await server.start()
    try:
        upgrade_to_head(server.url)
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
async def own_database_url(database_url: str) -> AsyncIterator[str]:
    """A migrated database of the test's own on the session's server: for a test that
    reads a whole table, which every other test writes to."""
    name = f"own_{uuid.uuid4().hex[:12]}"
    base, _, _ = database_url.rpartition("/")
    async with await psycopg.AsyncConnection.connect(
        libpq_url(database_url), autocommit=True
    ) as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{base}/{name}"
    await asyncio.to_thread(upgrade_to_head, url)
    yield url
    async with await psycopg.AsyncConnection.connect(
        libpq_url(database_url), autocommit=True
    ) as admin:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


@pytest.fixture(scope="session")
async def sandbox_provider(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[SandboxProvider]:
    port = free_port()
    process = ManagedProcess(
        "provider",
        [sys.executable, "-m", "sandbox_provider", "--port", str(port), "--seed", "7"],
        cwd=REPO_ROOT,
        log_path=tmp_path_factory.mktemp("provider") / "provider.log",
    )
    process.start()
    provider = SandboxProvider(f"http://127.0.0.1:{port}", DEV_PROVIDER_API_KEY)

    async def healthy() -> bool:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{provider.base_url}/healthz")).status_code == 200

    try:
        await process.wait_ready(healthy, within=30, what="answering /healthz")
        yield provider
    finally:
        await process.terminate(grace=5)


@pytest.fixture(autouse=True)
async def _provider_faults_cleared(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """A test's faults never leak into the next test."""
    yield
    if "sandbox_provider" in request.fixturenames:
        provider: SandboxProvider = request.getfixturevalue("sandbox_provider")
        await provider.clear_faults()


@pytest.fixture(scope="session")
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver("127.0.0.1", free_port())
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture(scope="session")
async def payment_ledger(database_url: str) -> AsyncIterator[PooledPaymentLedger]:
    """The worker's plain-SQL ledger writes, on their own pool, as worker.py builds them."""
    ledger = PooledPaymentLedger.create(database_url, size=10, timeout=5.0)
    await ledger.open()
    yield ledger
    await ledger.close()


@pytest.fixture(scope="session")
async def activities(
    payment_ledger: PooledPaymentLedger, sandbox_provider: SandboxProvider
) -> AsyncIterator[PaymentActivities]:
    provider = ProviderClient(sandbox_provider.base_url, sandbox_provider.api_key, 2.0)
    http = httpx.AsyncClient(timeout=5)
    # The receiver listens on 127.0.0.1, as PAYMENTS_WEBHOOK_ALLOW_LOOPBACK permits in tests.
    yield PaymentActivities(payment_ledger, provider, WebhookSender(http, allow_loopback=True))
    await provider.aclose()
    await http.aclose()
