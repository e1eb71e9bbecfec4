"""One stack for every fault test: each test breaks it, heals it, and leaves it healthy
(``FaultStack.heal`` runs after each test, pass or fail), so the stack starts once.
The audit at the end of each test covers the payments of every test before it too."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from config.settings import Settings
from devstack.stack import Stack, StackConfig
from ledger.db import create_engine, session_factory
from tests.faults.stack import FaultStack
from tests.helpers.provider import SandboxProvider


@pytest.fixture(scope="session")
async def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FaultStack]:
    config = StackConfig.for_tests(tmp_path_factory.mktemp("faultstack"))
    async with Stack(config) as running:
        assert running.demo_client is not None
        engine = create_engine(Settings(database_url=running.database_url))
        env = running.settings_env()
        fs = FaultStack(
            running,
            running.demo_client,
            session_factory(engine),
            SandboxProvider(running.provider_url, env["PAYMENTS_PROVIDER_API_KEY"]),
        )
        yield fs
        await fs.http.aclose()
        await engine.dispose()


@pytest.fixture
async def faults(fault_stack: FaultStack) -> AsyncIterator[FaultStack]:
    started = time.monotonic()
    try:
        yield fault_stack
    finally:
        await fault_stack.heal()
        print(f"\n[fault test wall time {time.monotonic() - started:.1f} s]")
