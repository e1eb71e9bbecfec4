"""Fault tests 1-3 and 11: the worker dies (SIGKILL) or is stopped (SIGTERM) at the
worst moments; a new worker takes over and nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from devstack.temporal_server import NAMESPACE
from domain.payments import payment_id_for, payment_workflow_id
from tests.faults.stack import FaultStack, assert_settled
from tests.helpers.eventually import wait_until
from tests.helpers.faultproxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# A killed worker's charge (a local activity) is run again by the next worker once the
# dead one's workflow task times out (10 s); within 90 s on a loaded machine.
AFTER_KILL_S = 90


def _paying(fs: FaultStack, key: str) -> asyncio.Task[str]:
    """The client's request, retried with its key on a 503 (the API's answer when its
    bounded look at Temporal runs out under load); the payment id it is accepted as."""
    return asyncio.create_task(fs.pay_until_accepted(key))


async def test_worker_killed_while_the_provider_holds_the_charge(faults: FaultStack) -> None:
    await faults.provider.set_faults(latency_ms=4000)
    key = str(uuid.uuid4())
    payment_id = payment_id_for(faults.client.client_id, key)
    answer = _paying(faults, key)
    await wait_until(lambda: faults.charge_requests(payment_id), within=15)

    await faults.stack.worker.kill()
    await faults.provider.clear_faults()
    await faults.stack.start_worker()

    assert await answer == payment_id
    await assert_settled(faults, [payment_id], within=AFTER_KILL_S)
    assert await faults.ledger_status(payment_id) == "succeeded"
    assert await faults.charges(payment_id) == 1


async def test_worker_killed_after_the_provider_charged_before_the_activity_completed(
    faults: FaultStack,
) -> None:
    # The provider charges, then sits on its answer: the activity is mid-flight with
    # the money already moved when the worker dies.
    await faults.provider.set_faults(timeout_after_charge_next=1, hang_seconds=60)
    key = str(uuid.uuid4())
    payment_id = payment_id_for(faults.client.client_id, key)
    answer = _paying(faults, key)
    await wait_until(lambda: faults.charges(payment_id), within=15)

    await faults.stack.worker.kill()
    await faults.provider.clear_faults()
    await faults.stack.start_worker()

    assert await answer == payment_id
    await assert_settled(faults, [payment_id], within=AFTER_KILL_S)
    assert await faults.ledger_status(payment_id) == "succeeded"
    assert await faults.charges(payment_id) == 1
    assert await faults.charge_requests(payment_id) == 2


async def test_worker_killed_right_after_the_ledger_commit_posts_no_duplicate_entries(
    faults: FaultStack,
) -> None:
    stack = faults.stack
    host, port = stack.temporal_address.rsplit(":", 1)
    async with FaultProxy(host, int(port)) as proxy:
        # The worker reaches Temporal through the proxy; a second of latency opens a
        # window between the ledger commit and Temporal hearing of it.
        stack.worker_env["PAYMENTS_TEMPORAL_ADDRESS"] = proxy.address
        await stack.restart_worker()
        proxy.latency = 1.0
        key = str(uuid.uuid4())
        payment_id = payment_id_for(faults.client.client_id, key)
        answer = _paying(faults, key)

        async def committed() -> bool:
            return await faults.ledger_status(payment_id) == "succeeded"

        await wait_until(committed, within=30, interval=0.01)
        await stack.worker.kill()
    stack.worker_env.clear()
    await stack.start_worker()

    assert await answer == payment_id
    await assert_settled(faults, [payment_id], within=AFTER_KILL_S)
    assert await faults.charges(payment_id) == 1

    # Proof the kill landed in the window: the dead worker's workflow task timed out and
    # the record was replayed by the new worker (against a terminal row: a no-op).
    client = await Client.connect(stack.temporal_address, namespace=NAMESPACE)
    history = await client.get_workflow_handle(
        payment_workflow_id(faults.client.client_id, key)
    ).fetch_history()
    types = [event.event_type for event in history.events]
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT in types, " ".join(
        EventType.Name(t)[11:] for t in types
    )


async def test_worker_sigterm_under_load_drains_and_a_new_worker_finishes_the_rest(
    faults: FaultStack,
) -> None:
    stack = faults.stack
    await faults.provider.set_faults(latency_ms=1500)
    keys = [str(uuid.uuid4()) for _ in range(100)]
    ids = [payment_id_for(faults.client.client_id, key) for key in keys]
    # Clients retry a 503 with the same key, as the API asks them to.
    accepting = [asyncio.create_task(faults.pay_until_accepted(key)) for key in keys]

    async def charging() -> bool:
        requested = (await faults.provider.stats())["charge_requests_by_key"]
        return sum(1 for i in ids if i in requested) >= 20

    await wait_until(charging, within=30)
    at_provider = set((await faults.provider.stats())["charge_requests_by_key"]) & set(ids)
    stopping = time.monotonic()
    await stack.worker.terminate(grace=30, signum=signal.SIGTERM)
    drained_in = time.monotonic() - stopping
    # Exit code 0: it drained within its own bound, not SIGKILLed at ours.
    assert stack.worker.returncode == 0, (drained_in, stack.worker.tail())
    print(f"\n[worker drained in {drained_in:.1f} s]")
    await faults.provider.clear_faults()
    await stack.start_worker()

    assert sorted(await asyncio.gather(*accepting)) == sorted(ids)
    settled = await assert_settled(faults, ids, within=120)
    assert set(settled.values()) == {"succeeded"}
    # The charges in flight at SIGTERM finished inside the drain and were reported:
    # none timed out into a second attempt.
    requests = (await faults.provider.stats())["charge_requests_by_key"]
    assert {i: requests[i] for i in at_provider} == dict.fromkeys(at_provider, 1)
