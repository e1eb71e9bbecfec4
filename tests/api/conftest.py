"""The API app in-process (httpx over ASGI) against the real embedded PostgreSQL.

Temporal is configured at an address where nothing listens: the routes tested here
either never reach it (reads, listings, every refusal before a workflow starts) or
prove the 503 it causes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import CreatedClient, add_client
from api.admission import AdmissionGate
from api.app import create_app
from config.settings import Settings
from devstack.ports import free_port
from domain.payments import (
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
    payment_id_for,
)
from ledger.repositories import PaymentRepository

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def api_settings(database_url: str, **overrides: Any) -> Settings:
    return Settings(
        database_url=database_url,
        temporal_address=f"127.0.0.1:{free_port()}",
        **overrides,
    )


@asynccontextmanager
async def running_api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, as uvicorn would run it."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.test"
        ) as http,
    ):
        yield http


@pytest.fixture
def make_api(database_url: str) -> ApiFactory:
    """``async with make_api(api_rate_limit_burst=2) as http: ...``"""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        return running_api(create_app(api_settings(database_url, **overrides)))

    return factory


@pytest.fixture
async def api(make_api: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api() as http:
        yield http


@pytest.fixture
def new_client(sessions: async_sessionmaker[AsyncSession]) -> Callable[..., Any]:
    async def create(name: str = "tenant") -> CreatedClient:
        async with sessions() as session, session.begin():
            return await add_client(session, name=name, webhook_url=None)

    return create


async def store_payment(
    sessions: async_sessionmaker[AsyncSession],
    client_id: str,
    *,
    amount: int = 1250,
    status: PaymentStatus = PaymentStatus.SUCCEEDED,
    key: str | None = None,
) -> str:
    """A payment in the ledger as the worker leaves it (no Temporal needed to read it)."""
    key = key or str(uuid.uuid4())
    request = PaymentRequest(amount=amount, currency="EUR", payment_method="pm_card_visa")
    payment_id = payment_id_for(client_id, key)
    async with sessions() as session, session.begin():
        repository = PaymentRepository(session)
        await repository.open(PaymentInput.for_request(client_id, key, request, uuid.uuid4().hex))
    if status is not PaymentStatus.PROCESSING:
        async with sessions() as session, session.begin():
            await PaymentRepository(session).record_outcome(
                RecordOutcomeInput(
                    payment_id=payment_id,
                    status=status,
                    provider_charge_id="ch_test" if status is PaymentStatus.SUCCEEDED else None,
                    failure_code=None if status is PaymentStatus.SUCCEEDED else "card_declined",
                    failure_message=None if status is PaymentStatus.SUCCEEDED else "Declined",
                )
            )
    return payment_id


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@asynccontextmanager
async def held_line(gate: AdmissionGate) -> AsyncIterator[asyncio.Event]:
    """The gate's line, stopped until the event is set: every new request waits in it."""
    opened = asyncio.Event()

    async def wait_for_the_line_to_open() -> None:
        await opened.wait()

    original = gate.wait_turn
    gate.wait_turn = wait_for_the_line_to_open  # type: ignore[method-assign]
    try:
        yield opened
    finally:
        opened.set()
        gate.wait_turn = original  # type: ignore[method-assign]
