"""One stack for the end-to-end module, started exactly as ``make run`` starts it
(same code path), on free ports and in a temporary data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from config.settings import Settings
from devstack.stack import Stack, StackConfig
from ledger.db import create_engine, session_factory
from tests.helpers.e2e import E2EStack

# The API's bounded wait, as `make run` configures it (the settings' default).
PROCESSING_WAIT_SECONDS = Settings().api_wait_seconds


@asynccontextmanager
async def e2e_stack(data_dir: Path) -> AsyncIterator[E2EStack]:
    async with Stack(StackConfig.for_tests(data_dir)) as running:
        assert running.demo_client is not None
        engine = create_engine(Settings(database_url=running.database_url))
        yield E2EStack(running, running.demo_client, session_factory(engine))
        await engine.dispose()


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[E2EStack]:
    async with e2e_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
