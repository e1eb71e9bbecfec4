"""Fault tests 6-9: a provider that fails, hangs after charging, is slow, or lies.

The sandbox provider plays each fault (``PUT /sandbox/faults``); the real worker,
Temporal and PostgreSQL deal with it.
"""

from __future__ import annotations

import uuid

import pytest
from temporalio.client import Client

from devstack.temporal_server import NAMESPACE
from domain.payments import payment_workflow_id
from tests.faults.stack import FaultStack, assert_settled
from tests.helpers.eventually import wait_until
from tests.helpers.history import charge_attempts

pytestmark = pytest.mark.faults

# The worker's provider client gives up on an answer after this long (the settings' default).
PROVIDER_TIMEOUT_S = 10


async def _charge_attempts_in_history(fs: FaultStack, key: str) -> list[str]:
    """How each charge attempt ended, in order, as support staff read the history.

    The workflow runs one charge local activity per attempt (it retries the charge
    itself, so its current details can name the attempt and the last error): each
    attempt is a local-activity marker, its failure set when it failed.
    """
    client = await Client.connect(fs.stack.temporal_address, namespace=NAMESPACE)
    history = await client.get_workflow_handle(
        payment_workflow_id(fs.client.client_id, key)
    ).fetch_history()
    attempts = charge_attempts(history.events)
    assert all(a.local and a.attempt == 1 for a in attempts), attempts
    return [a.outcome for a in attempts]


async def test_provider_500_500_200_charges_once_after_three_attempts(faults: FaultStack) -> None:
    await faults.provider.set_faults(fail_next=2)
    key = str(uuid.uuid4())
    payment_id = await faults.pay_until_accepted(key)

    assert await assert_settled(faults, [payment_id]) == {payment_id: "succeeded"}
    assert await faults.charge_requests(payment_id) == 3
    assert await _charge_attempts_in_history(faults, key) == ["failed", "failed", "completed"]


@pytest.mark.slow
async def test_provider_charges_then_times_out_and_the_retry_finds_the_charge(
    faults: FaultStack,
) -> None:
    # The answer never comes: the worker's client times out, the retry with the same
    # idempotency key gets the first charge back.
    await faults.provider.set_faults(timeout_after_charge_next=1, hang_seconds=30)
    key = str(uuid.uuid4())
    payment_id = await faults.pay_until_accepted(key)

    await assert_settled(faults, [payment_id], within=60)
    assert await faults.ledger_status(payment_id) == "succeeded"
    assert await faults.charges(payment_id) == 1
    assert await faults.charge_requests(payment_id) == 2


async def test_provider_slow_within_the_timeout_is_one_attempt(faults: FaultStack) -> None:
    await faults.provider.set_faults(latency_ms=2500)
    key = str(uuid.uuid4())
    payment_id = await faults.pay_until_accepted(key)

    assert await assert_settled(faults, [payment_id]) == {payment_id: "succeeded"}
    assert await faults.charge_requests(payment_id) == 1
    assert await _charge_attempts_in_history(faults, key) == ["completed"]


@pytest.mark.slow
async def test_provider_slower_than_the_timeout_is_retried_and_charged_once(
    faults: FaultStack,
) -> None:
    await faults.provider.set_faults(latency_ms=(PROVIDER_TIMEOUT_S + 3) * 1000)
    key = str(uuid.uuid4())
    payment_id = await faults.pay_until_accepted(key)
    # The first request is held past the client's timeout; the provider then speeds up,
    # while it still works on that first request.
    await wait_until(lambda: faults.charge_requests(payment_id), within=10)
    await faults.provider.clear_faults()

    await assert_settled(faults, [payment_id], within=60)
    assert await faults.ledger_status(payment_id) == "succeeded"
    assert await faults.charges(payment_id) == 1
    assert await faults.charge_requests(payment_id) >= 2
    assert await _charge_attempts_in_history(faults, key) == ["failed", "completed"]


async def test_malformed_answer_after_charging_is_resolved_without_a_second_charge(
    faults: FaultStack,
) -> None:
    await faults.provider.set_faults(malformed_after_charge_next=1)
    key = str(uuid.uuid4())
    payment_id = await faults.pay_until_accepted(key)

    assert await assert_settled(faults, [payment_id]) == {payment_id: "succeeded"}
    assert await faults.charges(payment_id) == 1
    assert await faults.charge_requests(payment_id) == 2
