"""A repeat that arrives while its first request is still starting the run waits a
moment for the start, then is told the first is in progress (409), instead of being
held for as long as a slow Temporal server takes to confirm the start."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

import api.payments
import api.routes.payments
from api.app import create_app
from api.payments import REPEAT_WAITS_FOR_START_SECONDS
from devstack.ports import free_port
from ledger.reads import PooledPaymentReads
from tests.api.conftest import api_settings, bearer, running_api

TYPES = "https://payments.example.com/problems/"
VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"}


@asynccontextmanager
async def unresponsive_server() -> AsyncIterator[str]:
    """A TCP address that accepts connections and never answers on them: a Temporal
    server too busy to confirm anything."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    port = free_port()
    server = await asyncio.start_server(hold, "127.0.0.1", port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


@asynccontextmanager
async def api_whose_starts_are_never_confirmed(
    database_url: str, wait_seconds: float
) -> AsyncIterator[httpx.AsyncClient]:
    async with unresponsive_server() as temporal_address:
        settings = api_settings(database_url, api_wait_seconds=wait_seconds)
        settings = settings.model_copy(update={"temporal_address": temporal_address})
        async with running_api(create_app(settings)) as api_client:
            yield api_client


async def starting(api_client: httpx.AsyncClient, headers: dict[str, str]) -> asyncio.Task[Any]:
    """A first request sent, once its start is in flight."""
    first = asyncio.create_task(api_client.post("/v1/payments", json=VISA, headers=headers))
    while _metric((await api_client.get("/metrics")).text, "payments_api_starts_in_flight") < 1:
        assert not first.done(), first.result().text
        await asyncio.sleep(0.01)
    return first


async def test_a_repeat_of_a_payment_whose_start_is_unconfirmed_is_409_in_progress_soon(
    database_url: str, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_whose_starts_are_never_confirmed(database_url, 2) as api:
        first = await starting(api, headers)

        started = time.monotonic()
        repeat = await api.post("/v1/payments", json=VISA, headers=headers)
        waited = time.monotonic() - started

        assert not first.done()  # the first is still waiting for its start
        assert repeat.status_code == 409, repeat.text
        assert repeat.headers["content-type"] == "application/problem+json"
        assert repeat.json()["type"] == TYPES + "idempotency-request-in-progress"
        assert "still starting its payment" in repeat.json()["detail"]
        assert 1 <= int(repeat.headers["Retry-After"]) <= 2
        assert waited >= REPEAT_WAITS_FOR_START_SECONDS
        # The server never confirmed the start: the first is told to retry.
        answer = await first
    assert answer.status_code == 503, answer.text
    assert answer.json()["type"] == TYPES + "service-unavailable"


async def test_a_repeat_that_waited_in_this_process_already_is_not_held_for_the_start(
    database_url: str, new_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moment a repeat waits for its first request's start counts from its arrival:
    at a storm's start the loop got to repeats 30-50 ms after they arrived, and holding
    them the whole moment more put them past the 50 ms a duplicate's answer may take."""
    # A long moment, so that a repeat held for it could not be mistaken for one that was
    # not; this repeat arrived (as the route is told) ten seconds ago.
    monkeypatch.setattr(api.payments, "REPEAT_WAITS_FOR_START_SECONDS", 5.0)
    monkeypatch.setattr(api.routes.payments, "arrived_at", lambda _scope: time.perf_counter() - 10)
    client = await new_client()
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_whose_starts_are_never_confirmed(database_url, 4) as api_client:
        first = await starting(api_client, headers)

        started = time.monotonic()
        repeat = await api_client.post("/v1/payments", json=VISA, headers=headers)
        waited = time.monotonic() - started

        assert repeat.status_code == 409, repeat.text
        assert "still starting its payment" in repeat.json()["detail"]
        assert waited < 2.5, "held for the start although its moment had passed"
        assert not first.done()
        first.cancel()


async def test_a_repeat_that_read_the_ledger_while_its_first_request_got_in_waits_behind_it(
    database_url: str, new_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both found nothing being admitted and read the ledger at once; the first then
    began its start. The repeat, back from its read, goes behind it (409 while it is
    starting), not beside it as a second first request."""
    release = asyncio.Event()
    reads: list[str] = []
    by_key = PooledPaymentReads.by_key

    async def held(self: PooledPaymentReads, client_id: str, key: str) -> Any:
        reads.append(key)
        await release.wait()
        return await by_key(self, client_id, key)

    monkeypatch.setattr(PooledPaymentReads, "by_key", held)
    client = await new_client()
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_whose_starts_are_never_confirmed(database_url, 2) as api_client:
        first = asyncio.create_task(api_client.post("/v1/payments", json=VISA, headers=headers))
        while len(reads) < 1:
            await asyncio.sleep(0.01)
        repeat = asyncio.create_task(api_client.post("/v1/payments", json=VISA, headers=headers))
        while len(reads) < 2:
            await asyncio.sleep(0.01)
        release.set()

        answer = await repeat
        assert answer.status_code == 409, answer.text
        assert "still starting its payment" in answer.json()["detail"]
        assert not first.done()
        first.cancel()
