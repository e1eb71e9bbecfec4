"""Refunds on the whole stack, driven over HTTP: never more than was captured."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from admin.clients import add_client
from audit import Sources, run_audit
from domain.payments import payment_id_for
from tests.helpers.e2e import E2EStack, wait_until

pytestmark = pytest.mark.e2e

CHARGE = 1000
VISA = {"amount": CHARGE, "currency": "EUR", "payment_method": "pm_card_visa"}
PROBLEM_BASE = "https://payments.example.com/problems/"


def _headers(api_key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


async def _paid(http: httpx.AsyncClient, stack: E2EStack, **body: Any) -> dict[str, Any]:
    response = await http.post(
        "/v1/payments",
        json={**VISA, **body},
        headers=_headers(stack.client.api_key, str(uuid.uuid4())),
    )
    assert response.status_code == 201, response.text
    payment: dict[str, Any] = response.json()
    return payment


async def _refund(
    http: httpx.AsyncClient,
    stack: E2EStack,
    payment_id: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
) -> httpx.Response:
    return await http.post(
        f"/v1/payments/{payment_id}/refunds",
        json=body if body is not None else {},
        headers=_headers(stack.client.api_key, key or str(uuid.uuid4())),
    )


async def _settled(http: httpx.AsyncClient, stack: E2EStack, response: httpx.Response) -> Any:
    """The refund's final state: a 202 is read back until it is no longer pending."""
    if response.status_code == 201:
        return response.json()
    assert response.status_code == 202, response.text

    async def terminal() -> Any:
        read = await http.get(response.headers["Location"], headers=_headers(stack.client.api_key))
        body = read.json()
        return body if body["status"] != "pending" else None

    return await wait_until(terminal, within=60)


async def _read(http: httpx.AsyncClient, stack: E2EStack, payment_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/payments/{payment_id}", headers=_headers(stack.client.api_key))
    assert response.status_code == 200, response.text
    payment: dict[str, Any] = response.json()
    return payment


async def test_twenty_concurrent_refunds_never_exceed_the_charge(stack: E2EStack) -> None:
    # 20 refunds of 70..165 sum to 2350, well over the 1000 captured.
    amounts = [70 + 5 * i for i in range(20)]
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        payment = await _paid(http, stack)
        responses = await asyncio.gather(
            *(_refund(http, stack, payment["id"], {"amount": amount}) for amount in amounts)
        )
        winners = [await _settled(http, stack, r) for r in responses if r.status_code in (201, 202)]
        losers = [r for r in responses if r.status_code not in (201, 202)]
        read_back = await _read(http, stack, payment["id"])

    statuses = [r.status_code for r in responses]
    assert winners, statuses
    assert losers, statuses
    assert {w["status"] for w in winners} == {"succeeded"}
    refunded = sum(w["amount"] for w in winners)
    assert refunded <= CHARGE
    for loser in losers:
        assert loser.status_code == 409, loser.text
        assert loser.headers["content-type"].startswith("application/problem+json")
        problem = loser.json()
        assert problem["type"] == PROBLEM_BASE + "refund-exceeds-refundable"
        assert problem["status"] == 409
        remaining = problem["amount_refundable"]
        assert 0 <= remaining < json.loads(loser.request.content)["amount"]
        assert f"{remaining} (minor units)" in problem["detail"]

    # The provider's own books agree: it refunded exactly the winners, never more.
    stats = await stack.provider_stats()
    provider_refunds = stats["refunds_by_charge"][payment["provider_charge_id"]]
    assert provider_refunds == {"count": len(winners), "amount": refunded}
    # Charge plus one reversal per winner, two legs each, summing to zero.
    assert await stack.ledger_balance(payment["id"]) == (2 + 2 * len(winners), 0)
    assert read_back["amount_refunded"] == refunded
    assert read_back["amount_refundable"] == CHARGE - refunded
    assert sorted(r["id"] for r in read_back["refunds"]) == sorted(w["id"] for w in winners)

    # The audit reconciles refunds too: provider refunds per charge against the ledger.
    # It reads the whole stack, every other test's payments included: only what it
    # finds about this payment is this test's to judge.
    report = await run_audit(
        Sources(
            database_url=stack.stack.database_url,
            provider_url=stack.stack.provider_url,
            provider_api_key=stack.provider.api_key,
            temporal_address=stack.temporal_address,
        )
    )
    mine = {payment["id"], payment["provider_charge_id"]}
    assert [f for f in report.findings if f.subject in mine] == [], report.render()
    assert {r.charge_id for r in report.snapshot.refunds} >= {payment["provider_charge_id"]}


async def test_a_duplicated_refund_key_makes_one_provider_refund(stack: E2EStack) -> None:
    key = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        payment = await _paid(http, stack)
        body = {"amount": 300, "reason": "requested_by_customer"}
        concurrent = await asyncio.gather(
            *(_refund(http, stack, payment["id"], body, key) for _ in range(10))
        )
        later = await _refund(http, stack, payment["id"], body, key)
        different = await _refund(http, stack, payment["id"], {"amount": 200}, key)
        read_back = await _read(http, stack, payment["id"])

    responses = [*concurrent, later]
    assert {r.status_code for r in responses} <= {201, 202}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count(None) == 1, f"exactly one request is the original: {replayed}"
    assert later.status_code == 201
    assert later.json()["status"] == "succeeded"
    assert later.json()["reason"] == "requested_by_customer"

    assert different.status_code == 422
    assert different.json()["type"] == PROBLEM_BASE + "idempotency-key-reused"

    stats = await stack.provider_stats()
    assert stats["refunds_by_charge"][payment["provider_charge_id"]] == {"count": 1, "amount": 300}
    assert await stack.ledger_balance(payment["id"]) == (4, 0)
    assert read_back["amount_refunded"] == 300
    assert read_back["amount_refundable"] == CHARGE - 300


async def test_a_declined_payment_cannot_be_refunded_and_nothing_changes(
    stack: E2EStack,
) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        payment = await _paid(http, stack, payment_method="pm_card_chargeDeclined")
        assert payment["status"] == "failed"
        key = str(uuid.uuid4())
        refused = await _refund(http, stack, payment["id"], {}, key)
        read_back = await _read(http, stack, payment["id"])

    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["type"] == PROBLEM_BASE + "payment-not-refundable"
    assert refused.json()["payment_status"] == "failed"
    assert read_back["refunds"] == []
    assert read_back["amount_refundable"] == 0
    assert await stack.ledger_balance(payment["id"]) == (0, 0)


async def test_a_refund_racing_the_charge_is_refused_until_the_charge_succeeds(
    stack: E2EStack,
) -> None:
    await stack.provider.set_faults(latency_ms=2500)
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
            key = str(uuid.uuid4())
            charging = asyncio.create_task(
                http.post("/v1/payments", json=VISA, headers=_headers(stack.client.api_key, key))
            )
            payment_id = await wait_until(lambda: _processing_payment_id(http, stack, key))
            racing_key = str(uuid.uuid4())
            racing = await _refund(http, stack, payment_id, {}, racing_key)
            charged = await charging
    finally:
        await stack.provider.clear_faults()

    assert racing.status_code == 409, racing.text
    assert racing.json()["type"] == PROBLEM_BASE + "payment-not-refundable"
    assert racing.json()["payment_status"] == "processing"
    assert charged.status_code == 201
    assert charged.json()["status"] == "succeeded"

    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        # The refused key changed nothing: it now refunds everything that remains.
        full = await _settled(http, stack, await _refund(http, stack, payment_id, {}, racing_key))
        nothing_left = await _refund(http, stack, payment_id, {"amount": 1})
        read_back = await _read(http, stack, payment_id)

    assert full["status"] == "succeeded"
    assert full["amount"] == CHARGE
    assert nothing_left.status_code == 409
    assert nothing_left.json()["amount_refundable"] == 0
    assert read_back["amount_refunded"] == CHARGE
    assert read_back["amount_refundable"] == 0
    assert await stack.ledger_balance(payment_id) == (4, 0)


async def _processing_payment_id(http: httpx.AsyncClient, stack: E2EStack, key: str) -> str:
    """The payment's id once the ledger has opened it and it is still processing."""
    payment_id = payment_id_for(stack.client.client_id, key)
    read = await http.get(f"/v1/payments/{payment_id}", headers=_headers(stack.client.api_key))
    if read.status_code == 200 and read.json()["status"] == "processing":
        return payment_id
    return ""


async def test_refund_webhook_carries_the_payment_and_a_higher_sequence(stack: E2EStack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        payment = await _paid(http, stack)

        def events_of(kind: str) -> list[dict[str, Any]]:
            return [
                {**json.loads(e.body), "_raw": e}
                for e in stack.webhooks()
                if json.loads(e.body)["data"]["id"] == payment["id"]
                and json.loads(e.body)["type"] == kind
            ]

        # Waited for, so the refund cannot be recorded before this event is built.
        paid_event = (await wait_until(lambda: events_of("payment.succeeded"), within=30))[0]
        refund = await _settled(
            http, stack, await _refund(http, stack, payment["id"], {"amount": 400})
        )
        refund_event = (await wait_until(lambda: events_of("refund.succeeded"), within=30))[0]

    raw = refund_event.pop("_raw")
    verified = Webhook(stack.client.webhook_secret).verify(raw.body, raw.headers)
    assert verified["type"] == "refund.succeeded"
    assert raw.headers["webhook-id"] == refund_event["id"] == f"evt_{refund['id']}_refund_succeeded"
    assert refund_event["refund_id"] == refund["id"]
    # opened (1), succeeded (2) | refund reserved (3), refund succeeded (4)
    assert paid_event["sequence"] == 2
    assert refund_event["sequence"] == 4
    data = refund_event["data"]
    assert data["object"] == "payment"
    assert data["amount_refunded"] == 400
    assert data["amount_refundable"] == CHARGE - 400
    assert [(r["id"], r["status"]) for r in data["refunds"]] == [(refund["id"], "succeeded")]
    assert paid_event["data"]["refunds"] == []


async def test_another_clients_payment_cannot_be_refunded(stack: E2EStack) -> None:
    async with stack.sessions() as session, session.begin():
        other = await add_client(session, name="other-refunds", webhook_url=None)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
        payment = await _paid(http, stack)
        response = await http.post(
            f"/v1/payments/{payment['id']}/refunds",
            json={},
            headers=_headers(other.api_key, str(uuid.uuid4())),
        )
        read_back = await _read(http, stack, payment["id"])

    assert response.status_code == 404
    assert response.json()["type"] == PROBLEM_BASE + "payment-not-found"
    assert read_back["refunds"] == []
