"""The idempotency table of the design, row by row, against the running stack.

HTTP for everything a client does; the provider's charge counts, the ledger's sums
and Temporal itself (to play its retention) for what a client cannot see.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from devstack.temporal_server import NAMESPACE
from domain.payments import payment_workflow_id
from tests.e2e.conftest import PROCESSING_WAIT_SECONDS
from tests.helpers.e2e import E2EStack, wait_until

pytestmark = pytest.mark.e2e

VISA = {"amount": 4200, "currency": "EUR", "payment_method": "pm_card_visa"}
TYPES = "https://payments.example.com/problems/"


def _headers(api_key: str, key: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {api_key}", **extra}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


async def test_row_missing_or_malformed_key_is_400(stack: E2EStack) -> None:
    api_key = stack.client.api_key
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        missing = await http.post("/v1/payments", json=VISA, headers=_headers(api_key))
        too_long = await http.post("/v1/payments", json=VISA, headers=_headers(api_key, "k" * 256))
        quoted_badly = await http.post(
            "/v1/payments", json=VISA, headers=_headers(api_key, '"a"b"')
        )
        non_ascii = await http.post(
            "/v1/payments",
            json=VISA,
            headers=[
                (b"Authorization", f"Bearer {api_key}".encode()),
                (b"Idempotency-Key", "caf\u00e9".encode("latin-1")),
            ],
        )
    assert missing.status_code == 400
    assert missing.json()["type"] == TYPES + "idempotency-key-missing"
    for response in (too_long, quoted_badly, non_ascii):
        assert response.status_code == 400, response.text
        assert response.json()["type"] == TYPES + "idempotency-key-invalid"
        assert response.headers["content-type"] == "application/problem+json"


async def test_rows_first_replay_different_body_and_other_client(stack: E2EStack) -> None:
    key = str(uuid.uuid4())
    mine = stack.client.api_key
    other = await stack.stack.add_client("contract-other")
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        first = await http.post("/v1/payments", json=VISA, headers=_headers(mine, f'"{key}"'))
        payment: dict[str, Any] = first.json()
        replay = await http.post("/v1/payments", json=VISA, headers=_headers(mine, key))
        different = await http.post(
            "/v1/payments", json={**VISA, "amount": 4201}, headers=_headers(mine, key)
        )
        after = await http.get(first.headers["Location"], headers=_headers(mine))
        theirs = await http.post("/v1/payments", json=VISA, headers=_headers(other.api_key, key))
        listed = await http.get("/v1/payments", params={"limit": 1}, headers=_headers(mine))

    # First: 201, Location, the outcome; quoted and bare keys are the same key.
    assert first.status_code == 201, first.text
    assert first.headers["Location"] == f"/v1/payments/{payment['id']}"
    assert payment["status"] == "succeeded"
    assert payment["idempotency_key"] == key
    assert "Idempotent-Replayed" not in first.headers
    assert first.headers["RateLimit-Policy"] == '"default";q=100;w=1'
    assert first.headers["RateLimit"].startswith('"default";r=')
    # Same key, same body, after it ended: the same payment, replayed.
    assert replay.status_code == 201
    assert replay.json() == payment
    assert replay.headers["Idempotent-Replayed"] == "true"
    # Same key, different body: 422 and nothing changed.
    assert different.status_code == 422
    assert different.json()["type"] == TYPES + "idempotency-key-reused"
    assert after.json() == payment
    # Another client, same key: an unrelated payment of its own.
    assert theirs.status_code == 201
    assert theirs.json()["id"] != payment["id"]
    assert "Idempotent-Replayed" not in theirs.headers
    # Listed from the ledger at once, newest first.
    assert [p["id"] for p in listed.json()["data"]] == [payment["id"]]

    stats = await stack.provider_stats()
    assert stats["charges_by_key"][payment["id"]] == 1
    assert stats["charges_by_key"][theirs.json()["id"]] == 1
    assert await stack.ledger_balance(payment["id"]) == (2, 0)


async def test_row_in_flight_duplicates_answer_at_once_or_wait_when_they_ask(
    stack: E2EStack,
) -> None:
    await stack.provider.set_faults(latency_ms=1500)
    key = str(uuid.uuid4())
    headers = _headers(stack.client.api_key, key)
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/payments", json=VISA, headers=headers))
            await asyncio.sleep(0.5)  # the charge is running when the duplicates arrive
            duplicates = await asyncio.gather(
                *(http.post("/v1/payments", json=VISA, headers=headers) for _ in range(3))
            )
            first_pending_after_duplicates = not first.done()
            waiting = await asyncio.gather(
                *(
                    http.post("/v1/payments", json=VISA, headers={**headers, "Prefer": "wait=10"})
                    for _ in range(2)
                )
            )
            original = await first
    finally:
        await stack.provider.clear_faults()

    assert original.status_code == 201, original.text
    assert "Idempotent-Replayed" not in original.headers
    # DESIGN.md: a repeat gets the payment's current state. The charge takes 1.5 s, so
    # the repeats were answered while it ran: processing, without waiting for it.
    assert first_pending_after_duplicates
    for duplicate in duplicates:
        assert duplicate.status_code == 202, duplicate.text
        assert duplicate.headers["Idempotent-Replayed"] == "true"
        assert duplicate.json()["id"] == original.json()["id"]
        assert duplicate.json()["status"] == "processing"
    # Repeats that ask to wait (RFC 7240 Prefer: wait) attach and get the outcome.
    for repeat in waiting:
        assert repeat.status_code == 201, "attached and waited for the outcome"
        assert repeat.headers["Idempotent-Replayed"] == "true"
        assert repeat.json() == original.json()
    assert original.json()["status"] == "succeeded"
    assert (await stack.provider_stats())["charges_by_key"][original.json()["id"]] == 1
    # Every request waited on the ledger, not on the run: its history holds no update
    # and one workflow start, so duplicates cost the engine nothing.
    temporal = await stack.stack.temporal_client()
    history = await temporal.get_workflow_handle(
        payment_workflow_id(stack.client.client_id, key)
    ).fetch_history()
    accepted = [
        e
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    ]
    assert accepted == []
    started = [
        e for e in history.events if e.HasField("workflow_execution_started_event_attributes")
    ]
    assert len(started) == 1


async def test_row_replay_after_temporal_forgot_the_run_answers_from_the_ledger(
    stack: E2EStack,
) -> None:
    key = str(uuid.uuid4())
    headers = _headers(stack.client.api_key, key)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        first = await http.post("/v1/payments", json=VISA, headers=headers)
    assert first.status_code == 201, first.text
    payment: dict[str, Any] = first.json()

    # Retention, played fast: Temporal deletes the closed run and forgets its id.
    temporal = await Client.connect(stack.temporal_address, namespace=NAMESPACE)
    workflow_id = payment_workflow_id(stack.client.client_id, key)
    await temporal.workflow_service.delete_workflow_execution(
        DeleteWorkflowExecutionRequest(
            namespace=NAMESPACE, workflow_execution=WorkflowExecution(workflow_id=workflow_id)
        )
    )

    async def forgotten() -> bool:
        try:
            await temporal.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            return exc.status == RPCStatusCode.NOT_FOUND
        return False

    await wait_until(forgotten, within=30, interval=0.2)

    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        replay = await http.post("/v1/payments", json=VISA, headers=headers)
        different = await http.post("/v1/payments", json={**VISA, "amount": 1}, headers=headers)
    assert replay.status_code == 201, replay.text
    assert replay.json() == payment
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert different.status_code == 422
    assert await forgotten(), "no new run was started for the key"
    assert (await stack.provider_stats())["charges_by_key"][payment["id"]] == 1
    assert await stack.ledger_balance(payment["id"]) == (2, 0)


async def test_prefer_wait_shortens_and_lengthens_the_bounded_wait(stack: E2EStack) -> None:
    charge_ms = int(PROCESSING_WAIT_SECONDS * 1000) + 1500  # longer than the default wait
    await stack.provider.set_faults(latency_ms=charge_ms)
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as http:
            started = time.monotonic()
            short = await http.post(
                "/v1/payments",
                json=VISA,
                headers=_headers(stack.client.api_key, str(uuid.uuid4()), Prefer="wait=1"),
            )
            short_took = time.monotonic() - started
            long = await http.post(
                "/v1/payments",
                json=VISA,
                headers=_headers(
                    stack.client.api_key,
                    str(uuid.uuid4()),
                    Prefer=f"wait={int(PROCESSING_WAIT_SECONDS) + 10}",
                ),
            )
    finally:
        await stack.provider.clear_faults()

    assert short.status_code == 202, short.text
    assert short.headers["Preference-Applied"] == "wait=1"
    assert short.json()["status"] == "processing"
    assert short_took < PROCESSING_WAIT_SECONDS, "answered before the default wait ran out"
    assert long.status_code == 201, long.text
    assert long.json()["status"] == "succeeded"
    assert long.headers["Preference-Applied"] == f"wait={int(PROCESSING_WAIT_SECONDS) + 10}"


async def test_an_idle_client_connection_is_kept_past_uvicorns_default(stack: E2EStack) -> None:
    """The API keeps an idle connection for PAYMENTS_API_KEEP_ALIVE_SECONDS (75 s), not
    uvicorn's 5 s: a client (or a load balancer with a 60 s idle timeout) reusing it
    never sends into a connection the API has just closed."""
    url = httpx.URL(stack.api_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    request = f"GET /healthz HTTP/1.1\r\nHost: {url.host}\r\n\r\n".encode()
    try:
        for _ in range(2):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            await asyncio.sleep(6)  # past uvicorn's default keep-alive of 5 s
        assert not reader.at_eof()
    finally:
        writer.close()
