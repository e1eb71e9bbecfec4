"""Errors are problem+json with stable types; bodies, amounts, currencies, metadata
and request rates are bounded; an unreachable dependency is a 503 with Retry-After."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import CreatedClient
from api.app import create_app
from api.limits import DRAIN_BYTES
from api.payments import PaymentService
from api.preferences import applied_wait, requested_wait
from api.ratelimit import RateLimiter
from config.settings import Settings
from config.temporal import connect_temporal
from devstack.ports import free_port
from ledger.db import create_engine, session_factory
from tests.api.conftest import ApiFactory, api_settings, bearer, running_api, store_payment

TYPES = "https://payments.example.com/problems/"
VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"}


def _post_headers(client: CreatedClient) -> dict[str, str]:
    return {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}


def _assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == TYPES + slug
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


async def test_a_declared_oversized_body_is_413_before_anything_else(
    api: httpx.AsyncClient,
) -> None:
    response = await api.post(
        "/v1/payments",
        content=b"{" + b" " * (64 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )
    _assert_problem(response, 413, "payload-too-large")


async def test_a_streamed_body_is_refused_once_it_passes_the_bound_without_reading_the_rest(
    api: httpx.AsyncClient, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    sent = 0
    chunk = 16 * 1024

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(10_000):  # 160 MiB if anyone read it all
            sent += 1
            yield b" " * chunk

    response = await api.post(
        "/v1/payments",
        content=endless(),
        headers={**_post_headers(client), "Content-Type": "application/json"},
    )
    _assert_problem(response, 413, "payload-too-large")
    assert response.headers["connection"] == "close"
    # The bound, then what the refusal drops while the answer reaches the client
    # (tests/e2e/test_hostile_input.py shows the answer comes first, over a socket).
    assert sent <= (64 * 1024 + DRAIN_BYTES) // chunk + 2, f"read {sent} chunks of 16 KiB"


async def test_a_body_just_under_the_bound_is_read(
    api: httpx.AsyncClient, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    body = b'{"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"'
    padded = body + b" " * (64 * 1024 - len(body) - 1) + b"}"
    response = await api.post(
        "/v1/payments",
        content=padded,
        headers={**_post_headers(client), "Content-Type": "application/json"},
    )
    # Valid, so it goes on to Temporal, which is not running here.
    _assert_problem(response, 503, "service-unavailable")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "", "application/xml"]
)
async def test_a_body_that_is_not_json_is_415(
    api: httpx.AsyncClient, new_client: Callable[..., Any], content_type: str
) -> None:
    client = await new_client()
    headers = {**_post_headers(client), "Content-Type": content_type}
    response = await api.post("/v1/payments", content=b"amount=1250", headers=headers)
    _assert_problem(response, 415, "unsupported-media-type")


async def test_malformed_json_is_a_400_of_its_own(
    api: httpx.AsyncClient, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    headers = {**_post_headers(client), "Content-Type": "application/json; charset=utf-8"}
    response = await api.post("/v1/payments", content=b'{"amount": 12', headers=headers)
    _assert_problem(response, 400, "malformed-json")


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({**VISA, "status": "succeeded", "client_id": "cli_x"}, {"status", "client_id"}),
        ({**VISA, "amount": 0}, {"amount"}),
        ({**VISA, "amount": -5}, {"amount"}),
        ({**VISA, "amount": 12.5}, {"amount"}),
        ({**VISA, "amount": "1250"}, {"amount"}),
        ({**VISA, "amount": 100_000_000}, {"amount"}),  # above the default bound
        ({**VISA, "currency": "XYZ"}, {"currency"}),
        ({**VISA, "currency": "HRK"}, {"currency"}),  # withdrawn in 2023
        ({**VISA, "currency": "XAU"}, {"currency"}),  # gold is not a card currency
        ({**VISA, "currency": "EURO"}, {"currency"}),
        ({**VISA, "metadata": {f"k{n}": "v" for n in range(21)}}, {"metadata"}),
        ({**VISA, "metadata": {"k" * 41: "v"}}, {f"metadata.{'k' * 41}.[key]"}),
        ({**VISA, "metadata": {"order": "x" * 501}}, {"metadata.order"}),
        ({**VISA, "metadata": {"order": 1234}}, {"metadata.order"}),
        ({**VISA, "metadata": {"nested": {"a": "b"}}}, {"metadata.nested"}),
        ({"currency": "EUR", "payment_method": "pm_card_visa"}, {"amount"}),
        ({**VISA, "description": "nul\u0000"}, {"description"}),
        ({**VISA, "payment_method": "pm\u0000"}, {"payment_method"}),
        ({**VISA, "metadata": {"a": "\u0000"}}, {"metadata.a"}),
    ],
)  # fmt: skip
async def test_invalid_bodies_are_400_naming_each_failing_field(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    body: dict[str, Any],
    fields: set[str],
) -> None:
    client = await new_client()
    response = await api.post("/v1/payments", json=body, headers=_post_headers(client))
    problem = _assert_problem(response, 400, "validation-error")
    assert {error["field"] for error in problem["errors"]} == fields
    assert all(error["message"] for error in problem["errors"])


async def test_the_amount_bound_is_a_setting(
    make_api: ApiFactory, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    async with make_api(api_max_amount=1000) as http:
        over = await http.post(
            "/v1/payments", json={**VISA, "amount": 1001}, headers=_post_headers(client)
        )
        at = await http.post(
            "/v1/payments", json={**VISA, "amount": 1000}, headers=_post_headers(client)
        )
    problem = _assert_problem(over, 400, "validation-error")
    assert [error["field"] for error in problem["errors"]] == ["amount"]
    _assert_problem(at, 503, "service-unavailable")  # valid: on to (absent) Temporal


async def test_lower_case_and_recent_currencies_pass_validation(
    api: httpx.AsyncClient, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    for currency in ("eur", "JPY", "XCG", "ZWG"):
        response = await api.post(
            "/v1/payments", json={**VISA, "currency": currency}, headers=_post_headers(client)
        )
        _assert_problem(response, 503, "service-unavailable")


async def test_unknown_routes_and_methods_are_problems(api: httpx.AsyncClient) -> None:
    _assert_problem(await api.get("/v2/nothing"), 404, "not-found")
    _assert_problem(await api.delete("/v1/payments"), 405, "method-not-allowed")


async def test_one_client_at_its_rate_limit_does_not_slow_another(
    make_api: ApiFactory, new_client: Callable[..., Any]
) -> None:
    busy, calm = await new_client("busy"), await new_client("calm")
    async with make_api(api_rate_limit_per_second=1, api_rate_limit_burst=3) as http:
        allowed = [await http.get("/v1/payments", headers=bearer(busy.api_key)) for _ in range(3)]
        limited = await http.get("/v1/payments", headers=bearer(busy.api_key))
        limited_post = await http.post("/v1/payments", json=VISA, headers=_post_headers(busy))
        other = await http.get("/v1/payments", headers=bearer(calm.api_key))

    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["RateLimit"] for r in allowed] == [
        '"default";r=2;t=1',
        '"default";r=1;t=2',
        '"default";r=0;t=3',
    ]
    # Each refused request is given its own token's time: the second waits for the second.
    for response, seconds in ((limited, 1), (limited_post, 2)):
        _assert_problem(response, 429, "rate-limited")
        assert response.headers["Retry-After"] == str(seconds)
        assert response.headers["RateLimit-Policy"] == '"default";q=1;w=1'
        assert response.headers["RateLimit"] == f'"default";r=0;t={seconds}'
    assert other.status_code == 200
    assert other.headers["RateLimit"].startswith('"default";r=2;')


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    limiter = RateLimiter(100, 200, clock=lambda: now[0])
    assert limiter.policy_header() == '"default";q=100;w=1'
    assert all(limiter.take("a").allowed for _ in range(200))
    refused = limiter.take("a")
    assert not refused.allowed
    assert refused.retry_after == 1
    now[0] += 0.05  # 5 tokens back
    assert [limiter.take("a").allowed for _ in range(6)] == [True] * 5 + [False]
    now[0] += 3600
    assert limiter.take("a").remaining == 199, "never more than the burst"
    assert limiter.take("b").remaining == 199, "each client has its own bucket"


def test_requests_refused_together_are_told_to_come_back_at_the_rate_not_together() -> None:
    now = [0.0]
    limiter = RateLimiter(100, 200, clock=lambda: now[0])
    assert all(limiter.take("a").allowed for _ in range(200))
    herd = [limiter.take("a") for _ in range(1000)]
    assert not any(refused.allowed for refused in herd)
    told = Counter(refused.retry_after for refused in herd)
    # A thousand refused at 100 a second: about 100 told each second from 1 to 10.
    assert sorted(told) == list(range(1, 11))
    assert all(95 <= count <= 105 for count in told.values()), told
    assert all(refused.reset == refused.retry_after for refused in herd)
    # The hundred told "1 s" find their tokens when they come back.
    now[0] += 1.0
    assert all(limiter.take("a").allowed for _ in range(told[1]))
    # A client that keeps sending is not told to wait more than a minute.
    assert max(limiter.take("a").retry_after for _ in range(10_000)) == 60
    assert limiter.take("b").allowed, "another client's bucket is untouched"


@pytest.mark.parametrize(
    ("prefer", "wait"),
    [
        (None, None),
        ("wait=10", 10),
        ("respond-async, wait=3", 3),
        ("WAIT = 7", 7),
        ('wait="4"', 4),
        ("wait=2, wait=9", 2),
        ("wait=2;foo=bar", 2),
        ("wait=-1", None),
        ("wait=1.5", None),
        ("wait=soon", None),
        ("handling=lenient", None),
        ("wait=" + "9" * 5000, 10**10),
    ],
)
def test_the_wait_preference_is_read_as_rfc_7240_says(prefer: str | None, wait: int | None) -> None:
    assert requested_wait(prefer) == wait


def test_the_applied_wait_is_bounded() -> None:
    assert applied_wait(None, default=5, cap=30) == 5
    assert applied_wait(12, default=5, cap=30) == 12
    assert applied_wait(600, default=5, cap=30) == 30
    assert applied_wait(0, default=5, cap=30) == 1


async def test_a_read_while_postgresql_is_down_is_503_with_retry_after(
    database_url: str,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    client = await new_client()
    payment_id = await store_payment(sessions, client.client_id)
    app = create_app(api_settings(database_url))
    dead = create_engine(Settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    async with running_api(app) as http:
        # Authenticated once (and cached) while the database answered; then it goes away.
        assert (await http.get("/v1/payments", headers=bearer(client.api_key))).status_code == 200
        temporal = await connect_temporal(api_settings(database_url), lazy=True)
        app.state.payments = PaymentService(session_factory(dead), temporal, "payments")
        read = await http.get(f"/v1/payments/{payment_id}", headers=bearer(client.api_key))
        listing = await http.get("/v1/payments", headers=bearer(client.api_key))
    await dead.dispose()
    for response in (read, listing):
        _assert_problem(response, 503, "service-unavailable")
        assert int(response.headers["Retry-After"]) > 0


async def test_a_create_while_temporal_is_unreachable_is_503_with_retry_after(
    api: httpx.AsyncClient, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    response = await api.post("/v1/payments", json=VISA, headers=_post_headers(client))
    body = _assert_problem(response, 503, "service-unavailable")
    assert int(response.headers["Retry-After"]) > 0
    assert "same Idempotency-Key" in body["detail"]


async def test_strings_postgresql_cannot_store_are_refused_not_a_503(
    api: httpx.AsyncClient, new_client: Callable[..., Any]
) -> None:
    client = await new_client()
    headers = bearer(client.api_key)
    by_id = await api.get("/v1/payments/pay_%00x", headers=headers)
    cursor = await api.get("/v1/payments", params={"starting_after": "pay_\x00"}, headers=headers)
    surrogate = await api.post(
        "/v1/payments",
        content=b'{"amount": 1, "currency": "EUR", "payment_method": "\\ud800"}',
        headers={**_post_headers(client), "Content-Type": "application/json"},
    )
    _assert_problem(by_id, 404, "payment-not-found")
    _assert_problem(cursor, 400, "validation-error")
    assert surrogate.status_code == 400, surrogate.text


async def test_an_exhausted_connection_pool_is_503_not_500(
    database_url: str,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A storm that takes every pooled connection: a request that cannot get one within
    the pool timeout is told to retry (503), not handed a 500."""
    client = await new_client()
    payment_id = await store_payment(sessions, client.client_id)
    app = create_app(api_settings(database_url))
    tiny = create_engine(
        Settings(
            database_url=database_url,
            database_pool_size=1,
            database_max_overflow=0,
            database_pool_timeout_seconds=0.2,
        )
    )
    async with running_api(app) as http:
        assert (await http.get("/v1/payments", headers=bearer(client.api_key))).status_code == 200
        temporal = await connect_temporal(api_settings(database_url), lazy=True)
        app.state.payments = PaymentService(session_factory(tiny), temporal, "payments")
        async with tiny.connect():  # the pool's only connection, held by "another request"
            read = await http.get(f"/v1/payments/{payment_id}", headers=bearer(client.api_key))
        after = await http.get(f"/v1/payments/{payment_id}", headers=bearer(client.api_key))
    await tiny.dispose()
    _assert_problem(read, 503, "service-unavailable")
    assert int(read.headers["Retry-After"]) > 0
    assert after.status_code == 200
