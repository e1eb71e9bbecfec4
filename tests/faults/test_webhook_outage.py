"""Fault test 10, end to end: the client's webhook endpoint is down (connections
refused), then failing (503), then up; the event arrives, signed, with one webhook-id
across every attempt. Hours of downtime are covered on the time-skipping server by
tests/workflows (test_webhook_failing_for_hours_never_fails_the_payment)."""

from __future__ import annotations

import json
import uuid

import pytest
from standardwebhooks import Webhook

from admin.clients import create_client_async
from tests.faults.stack import FaultStack, assert_settled
from tests.helpers.eventually import wait_until
from tests.helpers.faultproxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def test_webhook_endpoint_down_then_up_gets_the_event_once_signed_same_id(
    faults: FaultStack,
) -> None:
    receiver = faults.stack.webhooks
    async with FaultProxy(receiver.host, receiver.port) as proxy:
        proxy.refuse = True  # the endpoint is down: every connection is reset
        client = await create_client_async(
            faults.stack.database_url,
            name="webhook-outage",
            webhook_url=f"http://{proxy.address}/webhooks",
            allow_loopback=True,  # a local endpoint, as the test stack's settings allow
        )
        receiver.secrets.append(client.webhook_secret)

        payment_id = await faults.pay_until_accepted(str(uuid.uuid4()), api_key=client.api_key)

        # The payment never waits for its webhook: it succeeds while the endpoint is down.
        async def succeeded() -> bool:
            return await faults.ledger_status(payment_id) == "succeeded"

        await wait_until(succeeded, within=30)

        def for_payment() -> list[dict[str, str]]:
            return [
                w.headers
                for w in receiver.received
                if json.loads(w.body)["data"]["id"] == payment_id
            ]

        await wait_until(lambda: proxy.connections_accepted >= 1, within=15)
        proxy.heal()
        receiver.respond_with = 503  # up, but failing
        await wait_until(for_payment, within=30)
        receiver.respond_with = 204
        await wait_until(lambda: len(for_payment()) >= 2, within=60)
        # Inside the proxy's lifetime: the worker must read the 204 through it.
        await assert_settled(faults, [payment_id])  # the workflow, webhook included, is done

    attempts = [w for w in receiver.received if json.loads(w.body)["data"]["id"] == payment_id]
    # One answered 503, one accepted; nothing sent after the accepted one.
    assert len(attempts) == 2
    assert len({w.headers["webhook-id"] for w in attempts}) == 1
    assert all(w.verified for w in attempts)
    delivered = attempts[-1]
    event = Webhook(client.webhook_secret).verify(delivered.body, delivered.headers)
    assert event["type"] == "payment.succeeded"
    assert event["data"]["id"] == payment_id
