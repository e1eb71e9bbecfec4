"""The sandbox provider behaves like a real processor, seen through our adapter."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from activities.provider_client import (
    ProviderClient,
    ProviderDeclined,
    ProviderInvalidRequest,
    ProviderUnavailable,
)
from config.settings import DEV_PROVIDER_API_KEY
from devstack.ports import free_port
from devstack.processes import ManagedProcess
from tests.helpers.provider import SandboxProvider

REPO_ROOT = Path(__file__).resolve().parents[2]


def _client(provider: SandboxProvider, timeout: float = 5.0) -> ProviderClient:
    return ProviderClient(provider.base_url, provider.api_key, timeout)


async def _charge(
    client: ProviderClient, key: str, payment_method: str = "pm_card_visa", amount: int = 500
) -> str:
    charge = await client.charge(
        idempotency_key=key, amount=amount, currency="EUR", payment_method=payment_method
    )
    return charge.id


async def test_a_charge_succeeds_once_per_key_and_replays(
    sandbox_provider: SandboxProvider,
) -> None:
    key = str(uuid.uuid4())
    client = _client(sandbox_provider)
    first = await client.charge(
        idempotency_key=key, amount=500, currency="EUR", payment_method="pm_card_visa"
    )
    again = await client.charge(
        idempotency_key=key, amount=500, currency="EUR", payment_method="pm_card_visa"
    )
    await client.aclose()

    assert first.status == "succeeded"
    assert (first.amount, first.currency) == (500, "EUR")
    assert again == first
    stats = await sandbox_provider.stats()
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 2


async def test_a_replay_is_marked_and_different_parameters_are_refused(
    sandbox_provider: SandboxProvider,
) -> None:
    key = str(uuid.uuid4())
    body = {"amount": 700, "currency": "eur", "payment_method": "pm_card_visa"}
    headers = {"Authorization": f"Bearer {DEV_PROVIDER_API_KEY}", "Idempotency-Key": key}
    async with httpx.AsyncClient(base_url=sandbox_provider.base_url, headers=headers) as http:
        first = await http.post("/v1/charges", json=body)
        replay = await http.post("/v1/charges", json=body)
        other = await http.post("/v1/charges", json={**body, "amount": 701})

    assert first.status_code == replay.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    assert other.status_code == 400
    assert other.json()["error"]["type"] == "idempotency_error"
    assert (await sandbox_provider.stats())["charges_by_key"][key] == 1


@pytest.mark.parametrize(
    ("payment_method", "code", "decline_code"),
    [
        ("pm_card_chargeDeclined", "card_declined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card"),
        ("pm_card_chargeDeclinedProcessingError", "processing_error", "processing_error"),
    ],
)
async def test_decline_tokens_decline_and_move_no_money(
    sandbox_provider: SandboxProvider, payment_method: str, code: str, decline_code: str
) -> None:
    key = str(uuid.uuid4())
    client = _client(sandbox_provider)
    for _ in range(2):  # a retried decline replays the same decline
        with pytest.raises(ProviderDeclined) as declined:
            await _charge(client, key, payment_method)
        assert (declined.value.code, declined.value.decline_code) == (code, decline_code)
    await client.aclose()
    assert key not in (await sandbox_provider.stats())["charges_by_key"]


async def test_an_unknown_payment_method_is_an_invalid_request(
    sandbox_provider: SandboxProvider,
) -> None:
    client = _client(sandbox_provider)
    with pytest.raises(ProviderInvalidRequest) as invalid:
        await _charge(client, str(uuid.uuid4()), "pm_card_doesNotExist")
    await client.aclose()
    assert invalid.value.code == "resource_missing"


async def test_thirty_concurrent_charges_with_one_key_make_one_charge(
    sandbox_provider: SandboxProvider,
) -> None:
    key = str(uuid.uuid4())
    client = _client(sandbox_provider)
    ids = await asyncio.gather(*(_charge(client, key) for _ in range(30)))
    await client.aclose()
    assert len(set(ids)) == 1
    assert (await sandbox_provider.stats())["charges_by_key"][key] == 1


async def test_a_charge_can_be_found_by_its_key(sandbox_provider: SandboxProvider) -> None:
    key = str(uuid.uuid4())
    client = _client(sandbox_provider)
    assert await client.find_charge(key) is None
    charge_id = await _charge(client, key)
    found = await client.find_charge(key)
    await client.aclose()
    assert found is not None
    assert found.id == charge_id


async def test_refunds_never_exceed_the_charge_even_concurrently(
    sandbox_provider: SandboxProvider,
) -> None:
    client = _client(sandbox_provider)
    charge_id = await _charge(client, str(uuid.uuid4()), amount=1000)
    partial = await client.refund(
        idempotency_key=str(uuid.uuid4()), charge_id=charge_id, amount=300
    )
    assert partial.amount == 300

    async def refund_200() -> int | str:
        try:
            refund = await client.refund(
                idempotency_key=str(uuid.uuid4()), charge_id=charge_id, amount=200
            )
        except ProviderInvalidRequest as refused:
            return refused.code
        return refund.amount

    outcomes = await asyncio.gather(*(refund_200() for _ in range(10)))
    await client.aclose()

    refunded = [outcome for outcome in outcomes if isinstance(outcome, int)]
    assert sum(refunded) == 600  # three of ten fit in the remaining 700
    assert outcomes.count("amount_too_large") == 7
    stats = await sandbox_provider.stats()
    assert stats["refunds_by_charge"][charge_id] == {"count": 4, "amount": 900}


async def test_a_failed_charge_cannot_be_refunded(sandbox_provider: SandboxProvider) -> None:
    headers = {"Authorization": f"Bearer {DEV_PROVIDER_API_KEY}"}
    async with httpx.AsyncClient(base_url=sandbox_provider.base_url, headers=headers) as http:
        declined = await http.post(
            "/v1/charges",
            json={"amount": 100, "currency": "eur", "payment_method": "pm_card_chargeDeclined"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        charge_id = declined.json()["error"]["charge"]
        refund = await http.post(
            "/v1/refunds", json={"charge": charge_id}, headers={"Idempotency-Key": "r"}
        )
    assert refund.status_code == 400
    assert refund.json()["error"]["code"] == "charge_not_refundable"


async def test_fail_next_answers_500_twice_then_charges(sandbox_provider: SandboxProvider) -> None:
    await sandbox_provider.set_faults(fail_next=2)
    key = str(uuid.uuid4())
    client = _client(sandbox_provider)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable) as unavailable:
            await _charge(client, key)
        assert unavailable.value.outcome_unknown
    charge_id = await _charge(client, key)
    await client.aclose()
    assert charge_id.startswith("ch_")
    stats = await sandbox_provider.stats()
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 3


@pytest.mark.parametrize(
    "fault",
    [
        {"timeout_after_charge_next": 1, "hang_seconds": 2.0},
        {"malformed_after_charge_next": 1},
    ],
)
async def test_a_lost_answer_leaves_one_charge_that_the_retry_finds(
    sandbox_provider: SandboxProvider, fault: dict[str, float]
) -> None:
    await sandbox_provider.set_faults(**fault)
    key = str(uuid.uuid4())
    client = _client(sandbox_provider, timeout=0.5)
    with pytest.raises(ProviderUnavailable) as lost:
        await _charge(client, key)
    assert lost.value.outcome_unknown, "money may have moved: only a lookup can tell"
    found = await client.find_charge(key)
    retried = await _charge(client, key)
    await client.aclose()
    assert found is not None
    assert retried == found.id
    assert (await sandbox_provider.stats())["charges_by_key"][key] == 1


async def test_requests_without_the_api_key_are_refused(sandbox_provider: SandboxProvider) -> None:
    async with httpx.AsyncClient(base_url=sandbox_provider.base_url) as http:
        response = await http.get("/sandbox/stats")
    assert response.status_code == 401


async def test_an_unreachable_provider_certainly_charged_nothing() -> None:
    client = ProviderClient(f"http://127.0.0.1:{free_port()}", DEV_PROVIDER_API_KEY, 1.0)
    with pytest.raises(ProviderUnavailable) as unavailable:
        await _charge(client, str(uuid.uuid4()))
    await client.aclose()
    assert not unavailable.value.outcome_unknown


async def test_charges_survive_a_restart_with_a_database_file(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "sandbox_provider", "--port", str(port),
            "--db", str(tmp_path / "provider.sqlite3")]  # fmt: skip
    provider = SandboxProvider(f"http://127.0.0.1:{port}", DEV_PROVIDER_API_KEY)
    key = str(uuid.uuid4())

    async def healthy() -> bool:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{provider.base_url}/healthz")).status_code == 200

    ids = []
    for _ in range(2):
        process = ManagedProcess("provider", argv, cwd=REPO_ROOT, log_path=tmp_path / "p.log")
        process.start()
        try:
            await process.wait_ready(healthy, within=30, what="answering /healthz")
            client = _client(provider)
            ids.append(await _charge(client, key))
            await client.aclose()
            stats = await provider.stats()
        finally:
            await process.terminate(grace=5)
    assert ids[0] == ids[1]
    assert stats["charges_by_key"][key] == 1
