"""New payment requests are let in a few per loop turn; a repeat of a payment the process
knows skips the line; a repeat of a request still in the line is 409 at once."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.admission import AdmissionGate, payment_request_ids, wait_after_line
from api.app import create_app
from ledger.reads import PooledApiKeyReads
from tests.api.conftest import api_settings, bearer, held_line, running_api, store_payment

TYPES = "https://payments.example.com/problems/"
VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"}


async def test_parked_requests_are_let_in_a_few_per_loop_turn_in_arrival_order() -> None:
    gate = AdmissionGate(admissions_per_turn=2, remembered_keys=10)
    turn = 0
    ticking = True

    def tick() -> None:
        nonlocal turn
        turn += 1
        if ticking:
            asyncio.get_running_loop().call_soon(tick)

    asyncio.get_running_loop().call_soon(tick)
    admitted: list[tuple[int, int]] = []  # (request, turn it was let in)

    async def request(n: int) -> None:
        await gate.wait_turn()
        admitted.append((n, turn))

    await asyncio.gather(*(request(n) for n in range(9)))
    ticking = False

    assert [n for n, _ in admitted] == list(range(9))
    per_turn = Counter(at for _, at in admitted)
    assert max(per_turn.values()) == 2
    assert len(per_turn) == 5  # 9 requests, 2 a turn
    assert gate.waiting == 0


async def test_with_no_line_every_request_is_let_in_at_once() -> None:
    gate = AdmissionGate(admissions_per_turn=0, remembered_keys=10)
    loop = asyncio.get_running_loop()
    before = loop.time()
    await asyncio.gather(*(gate.wait_turn() for _ in range(100)))
    assert gate.waiting == 0
    assert loop.time() - before < 1


def test_the_gate_forgets_its_oldest_keys_first() -> None:
    gate = AdmissionGate(admissions_per_turn=2, remembered_keys=2)
    keys = [(b"Bearer sk_a", str(n).encode()) for n in range(3)]
    for ids in keys:
        gate.remember(ids)
    assert [gate.knows(ids) for ids in keys] == [False, True, True]


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("the condition never held")


def post(api: httpx.AsyncClient, headers: dict[str, str]) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(api.post("/v1/payments", json=VISA, headers=headers))


@asynccontextmanager
async def api_with_line_held(
    database_url: str, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AdmissionGate, asyncio.Event]]:
    """A running app whose admission line lets no one in until the event is set."""
    app = create_app(api_settings(database_url, **overrides))
    async with running_api(app) as api:
        gate: AdmissionGate = app.state.admission
        async with held_line(gate) as line:
            yield api, gate, line


async def repeat(api: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await asyncio.wait_for(api.post("/v1/payments", json=VISA, headers=headers), timeout=5)


def assert_queued_409(answer: httpx.Response, retry_after_at_most: int) -> None:
    """The answer to a repeat of a request still queued (here or in another process)."""
    assert answer.status_code == 409, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"] == TYPES + "idempotency-request-in-progress"
    assert "queued" in problem["detail"]
    assert 1 <= int(answer.headers["Retry-After"]) <= retry_after_at_most
    assert answer.headers["RateLimit"].startswith('"')  # counted like any request


async def test_a_repeat_of_a_request_waiting_for_its_turn_is_409_at_once(
    database_url: str, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    key = str(uuid.uuid4())
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    other = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_with_line_held(database_url, api_wait_seconds=3) as (api, gate, line):
        first = post(api, headers)
        another_payment = post(api, other)
        await until(lambda: len(gate.parked) == 2)

        repeated = await repeat(api, headers)

        assert not first.done()
        assert not another_payment.done()  # a new key waits its turn
        assert_queued_409(repeated, retry_after_at_most=3)
        line.set()
        # Its turn came: it goes on to Temporal, which this app cannot reach.
        answers = await asyncio.gather(first, another_payment)
        assert [answer.status_code for answer in answers] == [503, 503]
        assert not gate.parked
        assert not gate.inside
        # A 503 leaves nothing to repeat: the retry is a new payment's work again.
        assert not gate.knows((f"Bearer {client.api_key}".encode(), key.encode()))


def _series(metrics: str, name: str, **labels: str) -> float:
    """A series' value on /metrics (0 if absent), matched on the labels given."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_the_lines_answers_are_logged_counted_and_timed_like_any_request(
    database_url: str, new_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The line is outside the access log and the metrics' layers: its own 409 carries
    the request id and is counted under its route, and a request let in after waiting
    is timed from its arrival, not from when it was let in."""
    client = await new_client()
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_with_line_held(
        database_url, api_wait_seconds=3, api_shed_log_lines_per_second=100
    ) as (api, gate, line):
        logging.getLogger().addHandler(caplog.handler)  # the app configured logging afresh
        caplog.set_level(logging.INFO)
        before = (await api.get("/metrics")).text
        first = post(api, headers)
        await until(lambda: len(gate.parked) == 1)

        repeated = await asyncio.wait_for(
            api.post("/v1/payments", json=VISA, headers={**headers, "X-Request-Id": "support-42"}),
            timeout=5,
        )
        await asyncio.sleep(0.3)  # the first waits in line meanwhile
        line.set()
        answer = await first
        after = (await api.get("/metrics")).text

    assert repeated.status_code == 409, repeated.text
    assert repeated.headers["X-Request-Id"] == "support-42"
    assert answer.headers["X-Request-Id"]
    route = {"method": "POST", "route": "/v1/payments"}
    count = "payments_api_requests_total"
    assert (
        _series(after, count, status="409", **route) - _series(before, count, **route, status="409")
        == 1
    )
    unmatched = {"method": "POST", "route": "unmatched"}
    assert _series(after, count, **unmatched) == _series(before, count, **unmatched)
    lines = {
        e["request_id"]: e
        for r in caplog.records
        if isinstance(e := r.msg, dict) and e.get("event") == "http.request"
    }
    assert lines["support-42"]["status"] == 409
    assert lines["support-42"]["turned_away"] == "request_in_progress"
    assert lines["support-42"]["client_id"] == client.client_id
    first_line = lines[answer.headers["X-Request-Id"]]
    assert first_line["status"] == answer.status_code
    assert first_line["duration_ms"] >= 300, "its time in line is part of its duration"


def count_key_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hashes the API's key lookups ask for, from now on."""
    looked_up: list[str] = []
    lookup = PooledApiKeyReads.key_for_hash

    async def counted(self: PooledApiKeyReads, key_hash: str) -> Any:
        looked_up.append(key_hash)
        return await lookup(self, key_hash)

    monkeypatch.setattr(PooledApiKeyReads, "key_for_hash", counted)
    return looked_up


async def test_the_key_of_a_request_waiting_for_its_turn_is_looked_up_while_it_waits(
    database_url: str, new_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its repeats, answered at once, need the key too: the lookup starts when the request
    parks, not when its turn comes. (A key the process has not mirrored yet: one newer
    than the mirror's last reload; here the mirror is off.)"""
    client = await new_client()
    looked_up = count_key_lookups(monkeypatch)
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_with_line_held(database_url, api_wait_seconds=3, api_key_mirror_size=0) as (
        api,
        gate,
        line,
    ):
        first = post(api, headers)
        await until(lambda: len(gate.parked) == 1)
        await until(lambda: len(looked_up) == 1)
        assert not first.done()
        repeated = await repeat(api, headers)
        assert repeated.status_code == 409, repeated.text
        line.set()
        await first
    assert len(looked_up) == 1, "one lookup served the request in line, its repeat and its turn"


async def test_a_process_knows_its_clients_keys_before_their_first_request(
    database_url: str, new_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mirrored at start (PAYMENTS_API_KEY_MIRROR_SIZE): a herd's first requests and
    their repeats are answered without waiting for a lookup."""
    client = await new_client()
    looked_up = count_key_lookups(monkeypatch)
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    async with api_with_line_held(database_url, api_wait_seconds=3) as (api, gate, line):
        first = post(api, headers)
        await until(lambda: len(gate.parked) == 1)
        repeated = await repeat(api, headers)
        assert repeated.status_code == 409, repeated.text
        line.set()
        await first
    assert looked_up == []


async def test_a_repeat_of_a_request_in_the_line_with_an_unknown_api_key_is_401(
    database_url: str,
) -> None:
    headers = {**bearer("sk_" + "x" * 40), "Idempotency-Key": str(uuid.uuid4())}
    async with api_with_line_held(database_url) as (api, gate, line):
        first = post(api, headers)
        await until(lambda: len(gate.parked) == 1)
        repeated = await repeat(api, headers)
        line.set()
        answer = await first
    assert repeated.status_code == 401, repeated.text
    assert repeated.json()["type"] == TYPES + "unauthorized"
    assert answer.status_code == 401


async def test_a_repeat_of_a_payment_this_process_answered_skips_the_line(
    database_url: str,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    client = await new_client()
    key = str(uuid.uuid4())
    await store_payment(sessions, client.client_id, key=key)
    headers = {**bearer(client.api_key), "Idempotency-Key": key}
    app = create_app(api_settings(database_url))
    async with running_api(app) as api:
        gate: AdmissionGate = app.state.admission
        # Not known yet (stored by another process): it waits its turn, of which
        # there is no shortage.
        known = await api.post("/v1/payments", json=VISA, headers=headers)
        assert known.status_code == 201, known.text
        async with held_line(gate) as line:
            new_payments = [
                post(api, {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())})
                for _ in range(5)
            ]
            await until(lambda: len(gate.parked) == 5)

            repeat = await asyncio.wait_for(
                api.post("/v1/payments", json=VISA, headers=headers), timeout=5
            )

            assert not any(task.done() for task in new_payments)
            line.set()
            await asyncio.gather(*new_payments)
    assert repeat.status_code == 201, repeat.text
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.json() == known.json()


@pytest.mark.parametrize(
    ("waited", "wait", "left"),
    [
        (None, 5.0, 5.0),  # let in at once
        (2.0, 5.0, 3.0),  # the time in line counts against the wait
        (4.5, 5.0, 1.0),  # but leaves enough to start the payment
        (9.0, 0.5, 0.5),  # never more than was asked for
        (3.0, 0.0, 0.0),
    ],
)
def test_the_time_in_line_counts_against_a_first_requests_wait(
    waited: float | None, wait: float, left: float
) -> None:
    scope: dict[str, Any] = {"type": "http"}
    if waited is not None:
        scope["state"] = {"admission_wait_seconds": waited}
    assert wait_after_line(scope, wait) == pytest.approx(left)


def test_the_line_reads_the_first_of_repeated_headers_as_the_app_does() -> None:
    scope = {
        "headers": [
            (b"authorization", b"Bearer sk_first"),
            (b"idempotency-key", b"k1"),
            (b"authorization", b"Bearer sk_second"),
            (b"idempotency-key", b"k2"),
        ]
    }
    assert payment_request_ids(scope) == (b"Bearer sk_first", b"k1")
    assert payment_request_ids({"headers": [(b"idempotency-key", b"k1")]}) is None
