"""Starts of runs are taken a few at a time per API process; a request waiting for its
turn has started nothing, so its repeats are answered 409 at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from api.app import create_app
from api.backlog import BacklogFull, StartSlots
from tests.api.conftest import api_settings, bearer, running_api

TYPES = "https://payments.example.com/problems/"
VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"}


async def test_past_the_limit_a_start_waits_for_a_slot_and_says_so() -> None:
    slots = StartSlots(2)
    queued: list[int] = []
    inside = 0
    most_inside = 0
    release = asyncio.Event()

    async def start(n: int) -> None:
        nonlocal inside, most_inside
        async with slots.slot(5, on_queued=lambda: queued.append(n)):
            inside += 1
            most_inside = max(most_inside, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(start(n)) for n in range(3)]
    while slots.waiting < 1:
        await asyncio.sleep(0.01)
    assert queued == [2]
    assert inside == 2
    release.set()
    await asyncio.gather(*tasks)
    assert most_inside == 2
    assert slots.waiting == 0


async def test_no_slot_within_the_wait_is_backlog_full() -> None:
    slots = StartSlots(1)
    async with slots.slot(1):
        with pytest.raises(BacklogFull) as refused:
            async with slots.slot(0.1):
                pytest.fail("entered a slot that was taken")
    assert refused.value.retry_after == 1
    assert slots.waiting == 0
    async with slots.slot(0.1):  # the slot came back
        pass


async def test_limit_zero_never_waits() -> None:
    slots = StartSlots(0)
    entered = 0

    async def start() -> None:
        nonlocal entered
        async with slots.slot(0, on_queued=lambda: pytest.fail("queued without a limit")):
            entered += 1
            await asyncio.sleep(0.05)

    await asyncio.gather(*(start() for _ in range(50)))
    assert entered == 50


async def test_a_repeat_of_a_payment_waiting_for_a_start_slot_is_409_in_progress_at_once(
    database_url: str, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    key = str(uuid.uuid4())
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    app = create_app(api_settings(database_url, api_max_concurrent_starts=1, api_wait_seconds=3))
    async with running_api(app) as api:
        slots: StartSlots = app.state.start_slots
        async with slots.slot(5):  # another payment's start holds the only slot
            first = asyncio.create_task(api.post("/v1/payments", json=VISA, headers=headers))
            while slots.waiting < 1:
                await asyncio.sleep(0.01)

            repeat = await api.post("/v1/payments", json=VISA, headers=headers)

            assert not first.done()  # answered while the first still waits for its turn
            assert repeat.status_code == 409, repeat.text
            assert repeat.headers["content-type"] == "application/problem+json"
            assert repeat.json()["type"] == TYPES + "idempotency-request-in-progress"
            assert 1 <= int(repeat.headers["Retry-After"]) <= 3
        # Its turn came: it goes on to Temporal, which this app cannot reach.
        answer = await first
    assert answer.status_code == 503, answer.text
    assert slots.waiting == 0
