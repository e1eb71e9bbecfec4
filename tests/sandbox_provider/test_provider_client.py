"""Our provider adapter against the real sandbox: outcomes, idempotency, and what
each kind of trouble becomes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from activities.provider_client import (
    ProviderCharge,
    ProviderClient,
    ProviderDeclined,
    ProviderError,
    ProviderInvalidRequest,
    ProviderUnavailable,
)
from tests.sandbox_provider.conftest import Sandbox, free_port

# Short enough to keep the suite fast, long enough for a healthy sandbox on a busy laptop.
LOST_ANSWER_TIMEOUT = 0.5
HANG_SECONDS = 2.0


def _key() -> str:
    return str(uuid.uuid4())


async def _charge(
    client: ProviderClient,
    key: str,
    *,
    amount: int = 500,
    payment_method: str = "pm_card_visa",
) -> ProviderCharge:
    return await client.charge(
        idempotency_key=key, amount=amount, currency="EUR", payment_method=payment_method
    )


@pytest.mark.parametrize("payment_method", ["pm_card_visa", "pm_card_mastercard"])
async def test_a_good_card_is_charged(
    provider_client: ProviderClient, sandbox: Sandbox, payment_method: str
) -> None:
    key = _key()
    charge = await provider_client.charge(
        idempotency_key=key,
        amount=1999,
        currency="usd",
        payment_method=payment_method,
        description="two books",
    )

    assert charge.id.startswith("ch_")
    assert (charge.amount, charge.currency, charge.status) == (1999, "USD", "succeeded")
    assert (charge.amount_refunded, charge.failure_code) == (0, None)
    assert (await sandbox.stats())["charges_by_key"][key] == 1


@pytest.mark.parametrize(
    ("payment_method", "code", "decline_code"),
    [
        ("pm_card_chargeDeclined", "card_declined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card"),
        ("pm_card_chargeDeclinedProcessingError", "processing_error", "processing_error"),
    ],
)
async def test_a_declining_card_raises_declined_every_time_and_moves_no_money(
    provider_client: ProviderClient,
    sandbox: Sandbox,
    payment_method: str,
    code: str,
    decline_code: str,
) -> None:
    key = _key()
    declines = []
    for _ in range(2):  # the retry replays the same decline
        with pytest.raises(ProviderDeclined) as declined:
            await _charge(provider_client, key, payment_method=payment_method)
        declines.append(declined.value)
    found = await provider_client.find_charge(key)

    assert [(d.code, d.decline_code) for d in declines] == [(code, decline_code)] * 2
    assert declines[0].charge_id is not None
    assert declines[0].charge_id == declines[1].charge_id
    assert found is not None
    assert (found.id, found.status, found.failure_code) == (
        declines[0].charge_id,
        "failed",
        decline_code,
    )
    assert key not in (await sandbox.stats())["charges_by_key"]


async def test_an_unknown_payment_method_is_an_invalid_request(
    provider_client: ProviderClient,
) -> None:
    with pytest.raises(ProviderInvalidRequest) as invalid:
        await _charge(provider_client, _key(), payment_method="pm_card_doesNotExist")

    assert invalid.value.code == "resource_missing"
    assert "pm_card_doesNotExist" not in str(invalid.value)


async def test_the_same_key_twice_is_one_charge(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    key = _key()
    first = await _charge(provider_client, key)
    again = await _charge(provider_client, key)
    stats = await sandbox.stats()

    assert again == first
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 2


async def test_the_same_key_with_another_amount_is_an_invalid_request(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    key = _key()
    await _charge(provider_client, key, amount=500)
    with pytest.raises(ProviderInvalidRequest) as reused:
        await _charge(provider_client, key, amount=501)

    assert reused.value.code == "idempotency_key_reused"
    assert (await sandbox.stats())["charges_by_key"][key] == 1


async def test_thirty_concurrent_charges_with_one_key_make_one_charge(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    key = _key()
    charges = await asyncio.gather(*(_charge(provider_client, key) for _ in range(30)))
    stats = await sandbox.stats()

    assert len({charge.id for charge in charges}) == 1
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 30


async def test_a_charge_is_found_by_its_key_with_its_refunds(
    provider_client: ProviderClient,
) -> None:
    key = _key()
    assert await provider_client.find_charge(key) is None
    charge = await _charge(provider_client, key, amount=800)
    await provider_client.refund(idempotency_key=_key(), charge_id=charge.id, amount=300)
    found = await provider_client.find_charge(key)

    assert found == ProviderCharge(charge.id, 800, "EUR", "succeeded", amount_refunded=300)


async def test_a_refund_is_idempotent_and_never_exceeds_what_remains(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    charge = await _charge(provider_client, _key(), amount=1000)
    refund_key = _key()
    first = await provider_client.refund(
        idempotency_key=refund_key, charge_id=charge.id, amount=700
    )
    again = await provider_client.refund(
        idempotency_key=refund_key, charge_id=charge.id, amount=700
    )
    with pytest.raises(ProviderInvalidRequest) as reused:
        await provider_client.refund(idempotency_key=refund_key, charge_id=charge.id, amount=600)
    with pytest.raises(ProviderInvalidRequest) as too_much:
        await provider_client.refund(idempotency_key=_key(), charge_id=charge.id, amount=301)

    assert first.id.startswith("re_")
    assert (first.charge_id, first.amount, first.currency, first.status) == (
        charge.id,
        700,
        "EUR",
        "succeeded",
    )
    assert again == first
    assert reused.value.code == "idempotency_key_reused"
    assert too_much.value.code == "amount_too_large"
    assert (await sandbox.stats())["refunds_by_charge"][charge.id] == {"count": 1, "amount": 700}


async def test_concurrent_refunds_never_refund_more_than_was_charged(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    charge = await _charge(provider_client, _key(), amount=1000)
    await provider_client.refund(idempotency_key=_key(), charge_id=charge.id, amount=300)

    async def refund_200(key: str) -> str:
        try:
            refund = await provider_client.refund(
                idempotency_key=key, charge_id=charge.id, amount=200
            )
        except ProviderInvalidRequest as refused:
            return refused.code
        return refund.id

    distinct_keys = await asyncio.gather(*(refund_200(_key()) for _ in range(10)))
    one_key = _key()
    same_key = await asyncio.gather(*(refund_200(one_key) for _ in range(10)))
    refunded = await sandbox.stats()

    # 700 remained: three refunds of 200 fit, the fourth would not.
    assert distinct_keys.count("amount_too_large") == 7
    assert [outcome.startswith("re_") for outcome in distinct_keys].count(True) == 3
    # 100 remained: every request under one key is that key's first answer, replayed.
    assert same_key == ["amount_too_large"] * 10
    assert refunded["refunds_by_charge"][charge.id] == {"count": 4, "amount": 900}


async def test_concurrent_refunds_under_one_key_refund_once(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    charge = await _charge(provider_client, _key(), amount=1000)
    key = _key()
    refunds = await asyncio.gather(
        *(
            provider_client.refund(idempotency_key=key, charge_id=charge.id, amount=250)
            for _ in range(20)
        )
    )

    assert len({refund.id for refund in refunds}) == 1
    assert (await sandbox.stats())["refunds_by_charge"][charge.id] == {"count": 1, "amount": 250}


async def test_a_declined_charge_cannot_be_refunded(provider_client: ProviderClient) -> None:
    with pytest.raises(ProviderDeclined) as declined:
        await _charge(provider_client, _key(), payment_method="pm_card_chargeDeclined")
    assert declined.value.charge_id is not None
    with pytest.raises(ProviderInvalidRequest) as refused:
        await provider_client.refund(
            idempotency_key=_key(), charge_id=declined.value.charge_id, amount=100
        )

    assert refused.value.code == "charge_not_refundable"


async def test_two_server_errors_then_the_retry_charges_once(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    await sandbox.set_faults(fail_next=2)
    key = _key()
    for _ in range(2):
        with pytest.raises(ProviderUnavailable) as unavailable:
            await _charge(provider_client, key)
        # A 5xx does not say whether the charge happened: ours did not, Stripe's might have.
        assert unavailable.value.outcome_unknown
    charge = await _charge(provider_client, key)
    stats = await sandbox.stats()

    assert charge.status == "succeeded"
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 3


@pytest.mark.parametrize(
    "lost_answer",
    [
        {"timeout_after_charge_next": 1, "hang_seconds": HANG_SECONDS},
        {"malformed_after_charge_next": 1},
    ],
    ids=["timeout", "malformed"],
)
async def test_a_lost_charge_answer_is_unknown_and_the_retry_finds_the_charge(
    sandbox: Sandbox, lost_answer: dict[str, float]
) -> None:
    await sandbox.set_faults(**lost_answer)
    key = _key()
    async with ProviderClient(sandbox.base_url, sandbox.api_key, LOST_ANSWER_TIMEOUT) as client:
        with pytest.raises(ProviderUnavailable) as lost:
            await _charge(client, key)
        found = await client.find_charge(key)
        retried = await _charge(client, key)

    assert lost.value.outcome_unknown, "money may have moved: only a lookup can tell"
    assert found is not None
    assert retried.id == found.id
    assert (await sandbox.stats())["charges_by_key"][key] == 1


async def test_a_lost_refund_answer_is_unknown_and_the_retry_refunds_once(
    provider_client: ProviderClient, sandbox: Sandbox
) -> None:
    charge = await _charge(provider_client, _key(), amount=1000)
    await sandbox.set_faults(timeout_after_charge_next=1, hang_seconds=HANG_SECONDS)
    key = _key()
    async with ProviderClient(sandbox.base_url, sandbox.api_key, LOST_ANSWER_TIMEOUT) as client:
        with pytest.raises(ProviderUnavailable) as lost:
            await client.refund(idempotency_key=key, charge_id=charge.id, amount=400)
        retried = await client.refund(idempotency_key=key, charge_id=charge.id, amount=400)

    assert lost.value.outcome_unknown
    assert retried.amount == 400
    assert (await sandbox.stats())["refunds_by_charge"][charge.id] == {"count": 1, "amount": 400}


async def test_a_wrong_api_key_is_retryable_trouble_that_charged_nothing(
    sandbox: Sandbox,
) -> None:
    key = _key()
    async with ProviderClient(sandbox.base_url, "sk_test_wrong", 5.0) as client:
        with pytest.raises(ProviderUnavailable) as refused:
            await _charge(client, key)

    assert not refused.value.outcome_unknown
    assert key not in (await sandbox.stats())["charge_requests_by_key"]


async def test_an_unreachable_provider_certainly_charged_nothing() -> None:
    async with ProviderClient(f"http://127.0.0.1:{free_port()}", "sk_test_any", 1.0) as client:
        with pytest.raises(ProviderUnavailable) as unavailable:
            await _charge(client, _key())

    assert not unavailable.value.outcome_unknown


@asynccontextmanager
async def _server_that_hangs_up_after_reading() -> AsyncIterator[str]:
    """A peer that takes the whole request, then closes without answering."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_closed_after_sending_leaves_a_charge_unknown_but_not_a_lookup() -> None:
    async with (
        _server_that_hangs_up_after_reading() as base_url,
        ProviderClient(base_url, "sk_test_any", 2.0) as client,
    ):
        with pytest.raises(ProviderUnavailable) as charge_lost:
            await _charge(client, _key())
        with pytest.raises(ProviderUnavailable) as lookup_lost:
            await client.find_charge(_key())

    assert charge_lost.value.outcome_unknown
    assert not lookup_lost.value.outcome_unknown, "a lookup cannot move money"


def _answering(status: int, content: bytes) -> httpx.AsyncClient:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


# Statuses the sandbox never sends but a real provider (or a proxy before it) does.
@pytest.mark.parametrize(
    ("status", "content", "expected", "outcome_unknown"),
    [
        (502, b"<html>Bad Gateway</html>", ProviderUnavailable, True),
        (503, b'{"error": {"type": "api_error"}}', ProviderUnavailable, True),
        (429, b'{"error": {"type": "invalid_request_error", "code": "rate_limit"}}',
         ProviderUnavailable, True),
        (409, b'{"error": {"type": "idempotency_error"}}', ProviderUnavailable, True),
        (403, b"", ProviderUnavailable, False),
        (200, b"[]", ProviderUnavailable, True),
        (200, b'{"id": "ch_1"}', ProviderUnavailable, True),
        (400, b'{"error": {"type": "idempotency_error", "message": "reused"}}',
         ProviderInvalidRequest, None),
        (404, b"not json", ProviderUnavailable, True),
        (402, b'{"error": {"type": "card_error"}}', ProviderDeclined, None),
    ],
)  # fmt: skip
async def test_each_answer_a_charge_may_get_becomes_one_of_our_exceptions(
    status: int,
    content: bytes,
    expected: type[Exception],
    outcome_unknown: bool | None,
) -> None:
    http = _answering(status, content)
    async with http, ProviderClient("http://provider.invalid", "sk_test_any", 1.0, http) as client:
        with pytest.raises(expected) as raised:
            await _charge(client, _key())

    if outcome_unknown is not None:
        assert isinstance(raised.value, ProviderUnavailable)
        assert raised.value.outcome_unknown is outcome_unknown
    if isinstance(raised.value, ProviderInvalidRequest):
        assert raised.value.code == "idempotency_error"


async def test_an_injected_http_client_gets_our_url_key_and_timeout_and_stays_open(
    sandbox: Sandbox,
) -> None:
    key = _key()
    async with httpx.AsyncClient() as http:
        client = ProviderClient(sandbox.base_url + "/", sandbox.api_key, 5.0, http=http)
        charge = await _charge(client, key)
        await client.aclose()
        assert not http.is_closed

    assert (await sandbox.stats())["charges_by_key"][key] == 1
    assert charge.status == "succeeded"


async def test_nothing_in_a_failure_names_the_card_token_or_the_api_key(
    sandbox: Sandbox,
) -> None:
    await sandbox.set_faults(fail_next=1)
    failures: list[BaseException] = []
    calls: list[Callable[[ProviderClient], Awaitable[object]]] = [
        lambda client: _charge(client, _key(), payment_method="pm_card_visa"),
        lambda client: _charge(client, _key(), payment_method="pm_card_unknownToken"),
        lambda client: _charge(client, _key(), payment_method="pm_card_chargeDeclined"),
    ]
    async with ProviderClient(sandbox.base_url, sandbox.api_key, 5.0) as client:
        for call in calls:
            with pytest.raises(ProviderError) as raised:
                await call(client)
            failures.append(raised.value)

    rendered = " ".join(f"{failure!s} {failure!r} {failure.args}" for failure in failures)
    assert "pm_card" not in rendered
    assert sandbox.api_key not in rendered
