"""New payments wait for room while the payments in flight are at their limit, and are
refused with a 503 whose Retry-After grows with the queue; nothing starts for them,
and duplicates and reads never queue."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app import create_app
from api.backlog import BacklogFull, BacklogGate
from domain.payments import PaymentStatus, RecordOutcomeInput
from ledger.reads import PooledPaymentReads
from ledger.repositories import PaymentRepository
from tests.api.conftest import (
    ApiFactory,
    api_settings,
    bearer,
    held_line,
    running_api,
    store_payment,
)

TYPES = "https://payments.example.com/problems/"
VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"}


class Ledger:
    """The count the gate reads, set by the test."""

    def __init__(self, processing: int) -> None:
        self.processing = processing
        self.reads = 0

    async def count(self) -> int:
        self.reads += 1
        return self.processing


async def test_a_full_backlog_holds_a_new_payment_until_one_finishes() -> None:
    ledger = Ledger(processing=2)
    gate = BacklogGate(ledger.count, limit=2, refresh_seconds=0.05)
    admitted = asyncio.Event()

    async def new_payment() -> None:
        async with gate.admission(wait_seconds=5):
            admitted.set()

    task = asyncio.create_task(new_payment())
    await asyncio.sleep(0.3)
    assert not admitted.is_set()
    assert gate.queued == 1
    started = time.monotonic()
    ledger.processing = 1  # a payment's outcome was recorded
    await task
    assert admitted.is_set()
    assert time.monotonic() - started < 1
    assert gate.queued == 0, "admitted: no longer waiting"
    await gate.close()


async def test_waiters_are_admitted_first_come_first_served() -> None:
    ledger = Ledger(processing=1)
    gate = BacklogGate(ledger.count, limit=1, refresh_seconds=0.05)
    order: list[str] = []
    release = asyncio.Event()

    async def new_payment(name: str) -> None:
        async with gate.admission(wait_seconds=5):
            order.append(name)
            await release.wait()  # its row is being opened: the place stays taken

    first = asyncio.create_task(new_payment("first"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(new_payment("second"))
    await asyncio.sleep(0.1)
    ledger.processing = 0
    await asyncio.sleep(0.3)
    assert order == ["first"]  # the first one's place is taken until its row is open
    ledger.processing = 1  # it is: its row is in the count now
    release.set()
    await first
    await asyncio.sleep(0.2)
    assert order == ["first"]
    ledger.processing = 0
    await second
    assert order == ["first", "second"]
    await gate.close()


async def test_no_room_within_the_wait_is_refused_with_retry_after_growing_with_the_queue() -> None:
    ledger = Ledger(processing=0)
    gate = BacklogGate(ledger.count, limit=5, refresh_seconds=0.05)
    holding = asyncio.Event()
    release = asyncio.Event()
    entered = 0

    async def hold() -> None:
        nonlocal entered
        async with gate.admission(wait_seconds=5):
            entered += 1
            if entered == 5:
                holding.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(5)]
    await holding.wait()  # five admitted at once (about 0.5/s over the rate window)

    started = time.monotonic()
    with pytest.raises(BacklogFull) as alone:
        async with gate.admission(wait_seconds=0.3):
            pytest.fail("admitted past the limit")
    assert 0.3 <= time.monotonic() - started < 1.5
    assert alone.value.queued == 0
    assert 1 <= alone.value.retry_after <= 3  # 1 in the queue at 0.5/s, spread up to 1.5x

    queued = [asyncio.create_task(_try(gate, wait_seconds=10)) for _ in range(20)]
    await asyncio.sleep(0.1)
    with pytest.raises(BacklogFull) as behind:
        async with gate.admission(wait_seconds=0.3):
            pytest.fail("admitted past the limit")
    assert behind.value.queued == 20
    assert behind.value.retry_after > alone.value.retry_after
    assert behind.value.retry_after >= 42  # 21 at 0.5/s

    # Requests that go away leave the count at once, wherever they stood in the queue.
    for task in queued[5:10]:
        task.cancel()
    await asyncio.gather(*queued[5:10], return_exceptions=True)
    assert gate.queued == 15
    with pytest.raises(BacklogFull) as fewer:
        async with gate.admission(wait_seconds=0.1):
            pytest.fail("admitted past the limit")
    assert fewer.value.queued == 15

    release.set()
    await asyncio.gather(*holders)
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert gate.queued == 0
    await gate.close()


async def _try(gate: BacklogGate, *, wait_seconds: float) -> None:
    async with gate.admission(wait_seconds=wait_seconds):
        pass


async def test_limit_zero_admits_everything_without_reading_the_ledger() -> None:
    ledger = Ledger(processing=10_000)
    gate = BacklogGate(ledger.count, limit=0)
    async with gate.admission(wait_seconds=0):
        pass
    assert ledger.reads == 0


def _sample(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def _processing(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return await PaymentRepository(session).count_processing()


async def test_over_the_limit_a_new_payment_is_503_backlog_full_and_a_duplicate_is_still_answered(
    make_api: ApiFactory,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    client = await new_client()
    in_flight = [
        await store_payment(sessions, client.client_id, status=PaymentStatus.PROCESSING, key=key)
        for key in ("in-flight-1", "in-flight-2")
    ]
    limit = await _processing(sessions)  # every processing payment in this database
    headers = bearer(client.api_key)
    async with make_api(api_max_processing_payments=limit, api_wait_seconds=0.5) as api:
        refused_before = _sample(
            (await api.get("/metrics")).text, "payments_api_backlog_refused_total"
        )
        new_key = str(uuid.uuid4())
        refused = await api.post(
            "/v1/payments", json=VISA, headers={**headers, "Idempotency-Key": new_key}
        )
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == TYPES + "payments-backlog-full"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "Nothing was started" in refused.json()["detail"]
        metrics = (await api.get("/metrics")).text
        assert _sample(metrics, "payments_api_backlog_refused_total") == refused_before + 1
        listing = await api.get("/v1/payments", headers=headers, params={"limit": 100})
        assert {p["id"] for p in listing.json()["data"]} == set(in_flight)  # no row for it

        duplicate = await api.post(
            "/v1/payments", json=VISA, headers={**headers, "Idempotency-Key": "in-flight-1"}
        )
        assert duplicate.status_code == 202, duplicate.text
        assert duplicate.json()["id"] == in_flight[0]
        assert duplicate.headers["Idempotent-Replayed"] == "true"

        async with sessions() as session, session.begin():
            await PaymentRepository(session).record_outcome(
                RecordOutcomeInput(
                    payment_id=in_flight[1],
                    status=PaymentStatus.SUCCEEDED,
                    provider_charge_id="ch_test",
                    failure_code=None,
                    failure_message=None,
                )
            )
        # Room again: the request goes on to Temporal, which this app cannot reach.
        admitted = await api.post(
            "/v1/payments", json=VISA, headers={**headers, "Idempotency-Key": new_key}
        )
        assert admitted.status_code == 503, admitted.text
        assert admitted.json()["type"] == TYPES + "service-unavailable"


async def _full_backlog(sessions: async_sessionmaker[AsyncSession], client_id: str) -> int:
    """One more payment in flight, and the limit at which the backlog is now full."""
    await store_payment(sessions, client_id, status=PaymentStatus.PROCESSING)
    return await _processing(sessions)


async def _queued_for_room(
    api: httpx.AsyncClient, headers: dict[str, str]
) -> asyncio.Task[httpx.Response]:
    """A new payment sent, once it waits at the backlog gate."""
    request = asyncio.create_task(api.post("/v1/payments", json=VISA, headers=headers))
    while _sample((await api.get("/metrics")).text, "payments_api_backlog_waiting") < 1:
        await asyncio.sleep(0.02)
    return request


async def test_a_repeat_of_a_payment_queued_for_room_is_409_in_progress_at_once(
    make_api: ApiFactory,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    """The IETF draft's concurrent-request rule: nothing exists yet for the first request,
    so its repeat is told to come back, rather than taking a second place in the queue."""
    client = await new_client()
    limit = await _full_backlog(sessions, client.client_id)
    key = str(uuid.uuid4())
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    async with make_api(api_max_processing_payments=limit, api_wait_seconds=3) as api:
        first = await _queued_for_room(api, headers)

        repeat = await api.post("/v1/payments", json=VISA, headers=headers)
        other_body = await api.post("/v1/payments", json={**VISA, "amount": 999}, headers=headers)

        assert not first.done()  # answered while the first is still queued
        for answer in (repeat, other_body):
            assert answer.status_code == 409, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["type"] == TYPES + "idempotency-request-in-progress"
            assert 1 <= int(answer.headers["Retry-After"]) <= 3
        refused = await first
        assert refused.status_code == 503, refused.text
        assert refused.json()["type"] == TYPES + "payments-backlog-full"
        listing = await api.get("/v1/payments", headers=bearer(client.api_key))
        assert key not in {p["idempotency_key"] for p in listing.json()["data"]}


async def test_a_repeat_of_a_payment_queued_for_room_here_reads_nothing_from_the_ledger(
    make_api: ApiFactory,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its first request is queued in this process, so no row can be open for it here:
    the repeat is answered without the read, which at a storm's start waited 30-50 ms
    behind the loop's busiest turns."""
    client = await new_client()
    limit = await _full_backlog(sessions, client.client_id)
    key = str(uuid.uuid4())
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    reads: list[str] = []
    by_key = PooledPaymentReads.by_key

    async def counted(self: PooledPaymentReads, client_id: str, idempotency_key: str) -> Any:
        reads.append(idempotency_key)
        return await by_key(self, client_id, idempotency_key)

    monkeypatch.setattr(PooledPaymentReads, "by_key", counted)
    async with make_api(api_max_processing_payments=limit, api_wait_seconds=2) as api:
        first = await _queued_for_room(api, headers)
        read_by_the_first = reads.count(key)

        repeat = await api.post("/v1/payments", json=VISA, headers=headers)

        assert not first.done()
        assert repeat.status_code == 409, repeat.text
        assert repeat.json()["type"] == TYPES + "idempotency-request-in-progress"
        assert reads.count(key) == read_by_the_first
        await first


async def test_a_row_opened_elsewhere_while_queued_is_answered_instead_of_a_503(
    make_api: ApiFactory,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    """A request with the same key on another API process got in while this one waited
    for room: when its wait runs out this request finds that payment in the ledger and
    answers it, rather than 503 "nothing was started"."""
    client = await new_client()
    limit = await _full_backlog(sessions, client.client_id)
    key = str(uuid.uuid4())
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    async with make_api(api_max_processing_payments=limit, api_wait_seconds=2) as api:
        queued = await _queued_for_room(api, headers)
        # As another process's request would: the row opened with the same body under
        # the same key.
        opened_id = await store_payment(
            sessions, client.client_id, status=PaymentStatus.PROCESSING, key=key
        )
        answer = await queued

    assert answer.status_code == 202, answer.text
    assert answer.json()["id"] == opened_id
    assert answer.json()["status"] == "processing"
    assert answer.headers["Idempotent-Replayed"] == "true"


async def test_requests_refused_together_leave_through_a_line_and_repeats_go_first(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    """Requests that queued for room together run out of wait together; their 503s wait
    for their turn in a line of their own, and a repeat sent meanwhile is answered."""
    client = await new_client()
    in_flight_key = "in-flight"
    in_flight = await store_payment(
        sessions, client.client_id, status=PaymentStatus.PROCESSING, key=in_flight_key
    )
    limit = await _processing(sessions)
    auth = bearer(client.api_key)
    app = create_app(
        api_settings(database_url, api_max_processing_payments=limit, api_wait_seconds=1)
    )
    async with running_api(app) as api, held_line(app.state.expired_waits) as line:
        refused = [
            await _queued_for_room(api, {**auth, "Idempotency-Key": str(uuid.uuid4())})
            for _ in range(2)
        ]
        await asyncio.sleep(1.5)  # both waits have run out

        repeat = await api.post(
            "/v1/payments", json=VISA, headers={**auth, "Idempotency-Key": in_flight_key}
        )

        assert repeat.status_code == 202, repeat.text
        assert repeat.json()["id"] == in_flight
        assert not any(request.done() for request in refused)  # still in their line
        line.set()
        answers = await asyncio.gather(*refused)
    assert [answer.status_code for answer in answers] == [503, 503]
    assert {answer.json()["type"] for answer in answers} == {TYPES + "payments-backlog-full"}


async def test_a_request_whose_wait_for_the_outcome_ran_out_takes_its_turn_to_answer(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
) -> None:
    """First requests admitted together run out of wait together too: their 202s take
    their turn in the same line, and a repeat sent meanwhile is answered at once."""
    client = await new_client()
    auth = bearer(client.api_key)
    waiting = await store_payment(
        sessions, client.client_id, status=PaymentStatus.PROCESSING, key="waits"
    )
    other = await store_payment(
        sessions, client.client_id, status=PaymentStatus.PROCESSING, key="other"
    )
    app = create_app(api_settings(database_url, api_wait_seconds=5))
    async with running_api(app) as api, held_line(app.state.expired_waits) as line:
        waits = asyncio.create_task(
            api.post(
                "/v1/payments",
                json=VISA,
                headers={**auth, "Idempotency-Key": "waits", "Prefer": "wait=1"},
            )
        )
        await asyncio.sleep(1.5)  # its wait has run out

        repeat = await api.post(
            "/v1/payments", json=VISA, headers={**auth, "Idempotency-Key": "other"}
        )

        assert repeat.status_code == 202, repeat.text
        assert repeat.json()["id"] == other
        assert not waits.done()  # in the line
        line.set()
        answer = await waits
    assert answer.status_code == 202, answer.text
    assert answer.json()["id"] == waiting
    assert answer.json()["status"] == "processing"
