"""The whole stack, started the way ``make run`` starts it, driven over HTTP only."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from domain.payments import payment_workflow_id
from tests.e2e.conftest import PROCESSING_WAIT_SECONDS
from tests.helpers.e2e import E2EStack, wait_until

pytestmark = pytest.mark.e2e

VISA = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa", "description": "t"}


def _headers(api_key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


async def test_a_payment_succeeds_and_its_webhook_arrives_signed(stack: E2EStack) -> None:
    key = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        response = await http.post(
            "/v1/payments", json=VISA, headers=_headers(stack.client.api_key, key)
        )
        assert response.status_code == 201, response.text
        payment = response.json()
        assert payment["status"] == "succeeded"
        assert payment["amount"] == 1250
        assert payment["currency"] == "EUR"
        assert payment["provider_charge_id"].startswith("ch_")
        assert response.headers["Location"] == f"/v1/payments/{payment['id']}"
        assert "Idempotent-Replayed" not in response.headers

        read_back = await http.get(
            f"/v1/payments/{payment['id']}", headers=_headers(stack.client.api_key)
        )
        assert read_back.status_code == 200
        assert read_back.json()["status"] == "succeeded"

    events = await wait_until(
        lambda: [e for e in stack.webhooks() if json.loads(e.body)["data"]["id"] == payment["id"]],
        within=30,
    )
    event = events[0]
    verified = Webhook(stack.client.webhook_secret).verify(event.body, event.headers)
    assert verified["type"] == "payment.succeeded"
    assert verified["data"]["status"] == "succeeded"

    assert (await stack.provider_stats())["charges_by_key"][payment["id"]] == 1
    assert await stack.ledger_balance(payment["id"]) == (2, 0)


async def test_fifty_concurrent_duplicates_make_one_run_and_one_charge(stack: E2EStack) -> None:
    key = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:

        async def send() -> httpx.Response:
            return await http.post(
                "/v1/payments", json=VISA, headers=_headers(stack.client.api_key, key)
            )

        sent = await asyncio.gather(*(send() for _ in range(50)))
        # A repeat that arrives while the first request's start is not yet confirmed
        # may be told it is in progress (409, README); a client resends it.
        in_progress = [r for r in sent if r.status_code == 409]
        for response in in_progress:
            assert response.json()["type"].endswith("/idempotency-request-in-progress")
        resent = [await send() for _ in in_progress]
        responses = [r for r in sent if r.status_code != 409] + resent

    assert len(responses) == 50
    # The original waits for the outcome; a repeat answers the payment as it stands
    # (DESIGN.md: "its current state"): the outcome, or processing if it came first.
    original = next(r for r in responses if "Idempotent-Replayed" not in r.headers)
    assert original.status_code == 201, original.text
    assert original.json()["status"] == "succeeded"
    for response in responses:
        expected = 201 if response.json()["status"] == "succeeded" else 202
        assert response.status_code == expected, response.text
        assert response.json()["status"] in ("succeeded", "processing")
    bodies: list[dict[str, Any]] = [r.json() for r in responses]
    assert len({b["id"] for b in bodies}) == 1
    payment_id = bodies[0]["id"]
    assert (await stack.provider_stats())["charges_by_key"][payment_id] == 1
    assert await stack.ledger_balance(payment_id) == (2, 0)

    temporal = await stack.stack.temporal_client()
    runs = [
        execution
        async for execution in temporal.list_workflows(
            f"WorkflowId = '{payment_workflow_id(stack.client.client_id, key)}'"
        )
    ]
    # Visibility is eventually consistent; one run is what it must converge to.
    assert len(runs) <= 1
    handle = temporal.get_workflow_handle(payment_workflow_id(stack.client.client_id, key))
    description = await handle.describe()
    history = await handle.fetch_history()
    started = [
        e for e in history.events if e.HasField("workflow_execution_started_event_attributes")
    ]
    assert len(started) == 1
    assert (
        description.run_id
        == started[0].workflow_execution_started_event_attributes.original_execution_run_id
    )
    replayed = [r.headers.get("Idempotent-Replayed") for r in responses]
    assert replayed.count(None) == 1, f"exactly one request is the original: {replayed}"
    assert replayed.count("true") == 49


async def test_a_declined_card_ends_failed_with_its_code(stack: E2EStack) -> None:
    body = {**VISA, "payment_method": "pm_card_chargeDeclined"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        response = await http.post(
            "/v1/payments", json=body, headers=_headers(stack.client.api_key, str(uuid.uuid4()))
        )
    assert response.status_code == 201, response.text
    payment = response.json()
    assert payment["status"] == "failed"
    assert payment["failure_code"] == "card_declined"
    assert (await stack.provider_stats())["charges_by_key"].get(payment["id"], 0) == 0
    assert await stack.ledger_balance(payment["id"]) == (0, 0)


async def test_a_finished_payment_replays_and_a_different_body_is_refused(
    stack: E2EStack,
) -> None:
    key = str(uuid.uuid4())
    headers = _headers(stack.client.api_key, key)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        first = await http.post("/v1/payments", json=VISA, headers=headers)
        again = await http.post("/v1/payments", json=VISA, headers=headers)
        different = await http.post("/v1/payments", json={**VISA, "amount": 999}, headers=headers)

    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert different.status_code == 422
    assert different.headers["content-type"].startswith("application/problem+json")
    assert different.json()["type"].endswith("/idempotency-key-reused")
    assert (await stack.provider_stats())["charges_by_key"][first.json()["id"]] == 1


async def test_errors_are_problem_json(stack: E2EStack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        no_key = await http.post("/v1/payments", json=VISA, headers=_headers(stack.client.api_key))
        bad_auth = await http.post(
            "/v1/payments", json=VISA, headers=_headers("sk_not_a_key", str(uuid.uuid4()))
        )
        invalid = await http.post(
            "/v1/payments",
            json={**VISA, "amount": -5, "status": "succeeded"},
            headers=_headers(stack.client.api_key, str(uuid.uuid4())),
        )
        missing = await http.get("/v1/payments/pay_nope", headers=_headers(stack.client.api_key))

    assert no_key.status_code == 400
    assert no_key.json()["type"].endswith("/idempotency-key-missing")
    assert bad_auth.status_code == 401
    assert bad_auth.headers["WWW-Authenticate"].startswith("Bearer")
    assert invalid.status_code == 400
    fields = {error["field"] for error in invalid.json()["errors"]}
    assert {"amount", "status"} <= fields
    assert missing.status_code == 404
    for response in (no_key, bad_auth, invalid, missing):
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == response.status_code


async def test_a_slow_charge_answers_202_processing_then_completes_once(stack: E2EStack) -> None:
    # The provider takes longer than the API waits: the client gets 202 and polls.
    await stack.provider.set_faults(latency_ms=int(PROCESSING_WAIT_SECONDS * 1000) + 1000)
    key = str(uuid.uuid4())
    headers = _headers(stack.client.api_key, key)
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            first = await http.post("/v1/payments", json=VISA, headers=headers)
            duplicate = await http.post("/v1/payments", json=VISA, headers=headers)
            # A repeat that asks to wait waits for the outcome, as a first request does.
            waiting = await http.post(
                "/v1/payments", json=VISA, headers={**headers, "Prefer": "wait=20"}
            )
            location = first.headers["Location"]

            async def succeeded() -> dict[str, Any] | None:
                body: dict[str, Any] = (
                    await http.get(location, headers=_headers(stack.client.api_key))
                ).json()
                return body if body["status"] == "succeeded" else None

            final: dict[str, Any] | None = await wait_until(succeeded, within=30, interval=0.2)
            assert final is not None
    finally:
        await stack.provider.clear_faults()

    assert first.status_code == 202, first.text
    assert first.json()["status"] == "processing"
    assert "Idempotent-Replayed" not in first.headers
    # The charge is still running (a second longer than the wait): the repeat is told
    # so at once instead of waiting another 5 s.
    assert duplicate.status_code == 202, duplicate.text
    assert duplicate.json()["status"] == "processing"
    assert duplicate.headers["Idempotent-Replayed"] == "true"
    assert waiting.status_code == 201, waiting.text
    assert waiting.json()["status"] == "succeeded"
    assert waiting.headers["Idempotent-Replayed"] == "true"
    assert waiting.headers["Preference-Applied"] == "wait=20"
    assert duplicate.json()["id"] == waiting.json()["id"] == first.json()["id"] == final["id"]
    assert (await stack.provider_stats())["charges_by_key"][final["id"]] == 1


async def test_another_clients_same_key_is_an_unrelated_payment(stack: E2EStack) -> None:
    other = await stack.stack.add_client("other-tenant")
    key = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        mine = await http.post(
            "/v1/payments", json=VISA, headers=_headers(stack.client.api_key, key)
        )
        theirs = await http.post("/v1/payments", json=VISA, headers=_headers(other.api_key, key))
        peek = await http.get(f"/v1/payments/{mine.json()['id']}", headers=_headers(other.api_key))

    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    assert peek.status_code == 404, "another client's payment does not exist for you"
    stats = await stack.provider_stats()
    assert stats["charges_by_key"][mine.json()["id"]] == 1
    assert stats["charges_by_key"][theirs.json()["id"]] == 1


async def test_concurrent_requests_with_one_key_and_different_bodies_cannot_both_win(
    stack: E2EStack,
) -> None:
    await stack.provider.set_faults(latency_ms=1000)  # both arrive while the charge runs
    key = str(uuid.uuid4())
    headers = _headers(stack.client.api_key, key)
    bodies = [{**VISA, "amount": 1000 + n} for n in range(6)]
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            sent = await asyncio.gather(
                *(http.post("/v1/payments", json=body, headers=headers) for body in bodies)
            )
            # One sent while the winner's start is not yet confirmed is told it is in
            # progress (409); resent with its body, it meets the winner's row.
            responses = []
            for body, response in zip(bodies, sent, strict=True):
                if response.status_code == 409:
                    assert response.json()["type"].endswith("/idempotency-request-in-progress")
                    response = await http.post("/v1/payments", json=body, headers=headers)
                responses.append(response)
    finally:
        await stack.provider.clear_faults()

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 422, 422, 422, 422, 422], [r.text for r in responses]
    winner = next(r.json() for r in responses if r.status_code == 201)
    for loser in (r for r in responses if r.status_code == 422):
        assert loser.json()["type"].endswith("/idempotency-key-reused")
    stats = await stack.provider_stats()
    assert stats["charges_by_key"][winner["id"]] == 1
    assert await stack.ledger_balance(winner["id"]) == (2, 0)


async def test_a_payment_accepted_while_no_worker_runs_is_readable_and_completes_once(
    stack: E2EStack,
) -> None:
    key = str(uuid.uuid4())
    await stack.stack.worker.terminate()
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            accepted = await http.post(
                "/v1/payments", json=VISA, headers=_headers(stack.client.api_key, key)
            )
            read = await http.get(
                accepted.headers["Location"], headers=_headers(stack.client.api_key)
            )
    finally:
        await stack.stack.start_worker()

    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "processing"
    assert read.status_code == 200, "a 202 is durable: the payment can be read back at once"
    assert read.json()["status"] == "processing"

    async def succeeded() -> bool:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            body = (
                await http.get(accepted.headers["Location"], headers=_headers(stack.client.api_key))
            ).json()
        return bool(body["status"] == "succeeded")

    await wait_until(succeeded, within=60, interval=0.2)
    payment_id = accepted.json()["id"]
    assert (await stack.provider_stats())["charges_by_key"][payment_id] == 1
    assert await stack.ledger_balance(payment_id) == (2, 0)


async def test_an_unknown_payment_method_fails_the_payment_with_a_clear_code(
    stack: E2EStack,
) -> None:
    body = {**VISA, "payment_method": "pm_card_doesNotExist"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        response = await http.post(
            "/v1/payments", json=body, headers=_headers(stack.client.api_key, str(uuid.uuid4()))
        )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "failed"
    assert response.json()["failure_code"] == "invalid_payment_method"
    assert (await stack.provider_stats())["charges_by_key"].get(response.json()["id"], 0) == 0
