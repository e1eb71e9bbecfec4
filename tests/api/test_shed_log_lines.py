"""Requests turned away under load are counted, not each logged: the log stays bounded."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config.logging import LineSampler
from domain.payments import PaymentStatus
from ledger.repositories import PaymentRepository
from tests.api.conftest import ApiFactory, bearer, store_payment

VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"}


def test_a_few_lines_a_second_then_one_count_per_window() -> None:
    now = [100.0]
    sampler = LineSampler(2, clock=lambda: now[0])

    assert [sampler.admit("503 backlog_full") for _ in range(5)] == [True, True] + [False] * 3
    assert not sampler.admit("429 rate_limited")
    assert sampler.take_summary() is None, "the window has not ended"

    now[0] += 1.0
    assert sampler.take_summary() == {"503 backlog_full": 3, "429 rate_limited": 1}
    assert sampler.take_summary() is None, "reported once"
    assert [sampler.admit("503 TimeoutError") for _ in range(3)] == [True, True, False]
    # At shutdown the current window is reported too.
    assert sampler.take_summary(force=True) == {"503 TimeoutError": 1}


def test_zero_logs_no_shed_request_but_counts_them_all() -> None:
    sampler = LineSampler(0, clock=lambda: 0.0)
    assert not any(sampler.admit("429 rate_limited") for _ in range(4))
    assert sampler.take_summary(force=True) == {"429 rate_limited": 4}


def _events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and "event" in r.msg]


async def test_rate_limited_requests_beyond_the_budget_are_counted_on_one_line(
    make_api: ApiFactory,
    new_client: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await new_client("shed")
    headers = {"Authorization": f"Bearer {client.api_key}"}
    caplog.set_level(logging.INFO)
    async with make_api(
        api_rate_limit_per_second=0.01, api_rate_limit_burst=1, api_shed_log_lines_per_second=2
    ) as http:
        # The app configured logging afresh, root handlers included: listen again.
        logging.getLogger().addHandler(caplog.handler)
        statuses = [(await http.get("/v1/payments", headers=headers)).status_code for _ in range(7)]
    assert statuses == [200] + [429] * 6

    events = _events(caplog)
    lines = [e["status"] for e in events if e["event"] == "http.request"]
    summaries = [e for e in events if e["event"] == "http.requests_shed"]
    assert lines.count(200) == 1, "answered requests are always logged"
    counted = sum(s["total"] for s in summaries)
    # Two lines a second: unless the requests straddled a second, 2 logged and 4 counted.
    assert lines.count(429) + counted == 6
    assert lines.count(429) >= 2
    assert counted >= 2
    assert all(set(s["suppressed"]) == {"429 rate_limited"} for s in summaries)
    assert all("request_id" not in s for s in summaries), "a summary is no request's line"


async def test_repeats_told_their_first_request_is_in_progress_are_counted_as_shed(
    make_api: ApiFactory,
    sessions: async_sessionmaker[AsyncSession],
    new_client: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await new_client("shed-409")
    await store_payment(sessions, client.client_id, status=PaymentStatus.PROCESSING)
    async with sessions() as session:
        limit = await PaymentRepository(session).count_processing()
    headers = {**bearer(client.api_key), "Idempotency-Key": str(uuid.uuid4())}
    caplog.set_level(logging.INFO)
    async with make_api(
        api_max_processing_payments=limit, api_wait_seconds=2, api_shed_log_lines_per_second=1
    ) as http:
        logging.getLogger().addHandler(caplog.handler)
        first = asyncio.create_task(http.post("/v1/payments", json=VISA, headers=headers))
        await asyncio.sleep(0.5)  # queued for room by now
        repeats = [await http.post("/v1/payments", json=VISA, headers=headers) for _ in range(4)]
        await first
    assert [r.status_code for r in repeats] == [409] * 4

    events = _events(caplog)
    lines = [e["status"] for e in events if e["event"] == "http.request"]
    summaries = [e for e in events if e["event"] == "http.requests_shed"]
    counted = sum(s["suppressed"].get("409 request_in_progress", 0) for s in summaries)
    assert lines.count(409) + counted == 4
    assert counted >= 2  # one line a second: at most two of four within a second or two


async def test_a_request_without_an_id_of_its_own_is_given_a_short_random_one(
    make_api: ApiFactory,
) -> None:
    async with make_api() as http:
        given = [(await http.get("/healthz")).headers["X-Request-Id"] for _ in range(3)]
        echoed = (await http.get("/healthz", headers={"X-Request-Id": "req-1"})).headers
    assert len(set(given)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{16}", request_id) for request_id in given)
    assert echoed["X-Request-Id"] == "req-1"
