"""Signed delivery through the notify_webhook activity and the sender, against the real
PostgreSQL and a real receiver: secret rotation with its overlap, the target checked
again at delivery (DNS rebinding), redirects not followed."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.payments import PaymentActivities
from activities.provider_client import ProviderClient
from activities.url_safety import IPAddress, Resolver
from activities.webhooks import WebhookDeliveryError, WebhookSender, WebhookTargetRefused
from admin.clients import CreatedClient, add_client
from admin.credentials import new_webhook_secret
from admin.webhooks import rotate_webhook_secret_async
from devstack.ports import free_port
from devstack.webhook_receiver import ReceivedWebhook, WebhookReceiver
from domain.payments import (
    ErrorType,
    NotifyInput,
    OpenPaymentInput,
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from ledger.payment_sql import PooledPaymentLedger

env = ActivityEnvironment()
SECRET = new_webhook_secret()


def resolver(*addresses: str) -> Resolver:
    async def resolve(host: str, port: int) -> Sequence[IPAddress]:
        return [ipaddress.ip_address(a) for a in addresses]

    return resolve


def verifies(secret: str, event: ReceivedWebhook) -> bool:
    try:
        Webhook(secret).verify(event.body, event.headers)
    except WebhookVerificationError:
        return False
    return True


async def _client(sessions: async_sessionmaker[AsyncSession], url: str) -> CreatedClient:
    async with sessions() as session, session.begin():
        return await add_client(session, name="webhook-delivery", webhook_url=url)


async def _succeeded_payment(activities: PaymentActivities, client_id: str) -> str:
    key = str(uuid.uuid4())
    request = PaymentRequest(amount=1500, currency="EUR", payment_method="pm_card_visa")
    payment = PaymentInput.for_request(client_id, key, request, "r1")
    await env.run(activities.open_payment, OpenPaymentInput(payment))
    await env.run(
        activities.record_outcome,
        RecordOutcomeInput(payment.payment_id, PaymentStatus.SUCCEEDED, provider_charge_id="ch_w"),
    )
    return payment.payment_id


async def _deliver(
    activities: PaymentActivities, receiver: WebhookReceiver, payment_id: str
) -> ReceivedWebhook:
    await env.run(
        activities.notify_webhook,
        NotifyInput(payment_id=payment_id, event_type="payment.succeeded"),
    )
    return _received_for(receiver, payment_id)[-1]


def _received_for(receiver: WebhookReceiver, payment_id: str) -> list[ReceivedWebhook]:
    return [e for e in receiver.received if json.loads(e.body)["data"]["id"] == payment_id]


# -- rotation ---------------------------------------------------------------------


async def test_during_the_overlap_receivers_with_either_secret_verify(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    webhook_receiver: WebhookReceiver,
    database_url: str,
) -> None:
    client = await _client(sessions, webhook_receiver.url)
    old_secret = client.webhook_secret
    rotated = await rotate_webhook_secret_async(
        database_url, client.client_id, overlap=timedelta(hours=24)
    )
    assert rotated.webhook_secret != old_secret
    assert rotated.webhook_secret.startswith("whsec_")
    payment_id = await _succeeded_payment(activities, client.client_id)

    first = await _deliver(activities, webhook_receiver, payment_id)
    retried = await _deliver(activities, webhook_receiver, payment_id)

    for event in (first, retried):
        assert verifies(old_secret, event), "a receiver still holding the old secret"
        assert verifies(rotated.webhook_secret, event), "a receiver that switched already"
        assert not verifies(new_webhook_secret(), event), "a stranger's secret"
        entries = event.headers["webhook-signature"].split(" ")
        assert len(entries) == 2
        assert all(entry.startswith("v1,") for entry in entries)
    assert first.headers["webhook-id"] == retried.headers["webhook-id"]


async def test_after_the_overlap_only_the_new_secret_signs(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    webhook_receiver: WebhookReceiver,
    database_url: str,
) -> None:
    client = await _client(sessions, webhook_receiver.url)
    rotated = await rotate_webhook_secret_async(
        database_url, client.client_id, overlap=timedelta(seconds=1)
    )
    payment_id = await _succeeded_payment(activities, client.client_id)
    during = await _deliver(activities, webhook_receiver, payment_id)
    await asyncio.sleep(1.2)  # the overlap ends

    after = await _deliver(activities, webhook_receiver, payment_id)

    assert verifies(client.webhook_secret, during)
    assert not verifies(client.webhook_secret, after)
    assert verifies(rotated.webhook_secret, after)
    assert len(after.headers["webhook-signature"].split(" ")) == 1


async def test_rotating_twice_within_the_overlap_keeps_all_three_secrets_valid(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    webhook_receiver: WebhookReceiver,
    database_url: str,
) -> None:
    client = await _client(sessions, webhook_receiver.url)
    second = await rotate_webhook_secret_async(
        database_url, client.client_id, overlap=timedelta(hours=1)
    )
    third = await rotate_webhook_secret_async(
        database_url, client.client_id, overlap=timedelta(hours=1)
    )
    payment_id = await _succeeded_payment(activities, client.client_id)

    event = await _deliver(activities, webhook_receiver, payment_id)

    for secret in (client.webhook_secret, second.webhook_secret, third.webhook_secret):
        assert verifies(secret, event)
    # Newest first: a receiver that tries only the first entry has the newest secret's.
    newest = event.headers["webhook-signature"].split(" ")[0]
    assert verifies(third.webhook_secret, replace_signature(event, newest))


async def test_rotating_without_overlap_drops_the_old_secret_at_once(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    webhook_receiver: WebhookReceiver,
    database_url: str,
) -> None:
    client = await _client(sessions, webhook_receiver.url)
    rotated = await rotate_webhook_secret_async(database_url, client.client_id, overlap=timedelta())
    payment_id = await _succeeded_payment(activities, client.client_id)

    event = await _deliver(activities, webhook_receiver, payment_id)

    assert verifies(rotated.webhook_secret, event)
    assert not verifies(client.webhook_secret, event)


def replace_signature(event: ReceivedWebhook, signature: str) -> ReceivedWebhook:
    return ReceivedWebhook(
        event.path, {**event.headers, "webhook-signature": signature}, event.body, event.verified
    )


# -- the target, checked again at delivery -------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def _event() -> tuple[str, dict[str, object]]:
    event_id = f"evt_{uuid.uuid4().hex}"
    return event_id, {"id": event_id, "type": "payment.succeeded", "data": {"id": event_id}}


def _arrived(receiver: WebhookReceiver, event_id: str) -> list[ReceivedWebhook]:
    return [e for e in receiver.received if e.headers.get("webhook-id") == event_id]


async def test_delivery_connects_to_the_address_it_checked(
    http: httpx.AsyncClient, webhook_receiver: WebhookReceiver
) -> None:
    # 'hooks.acme.test' exists in no DNS: the request can only have reached the
    # receiver through the address the check resolved, with the name kept in Host.
    sender = WebhookSender(http, allow_loopback=True, resolver=resolver("127.0.0.1"))
    event_id, event = _event()
    url = f"http://hooks.acme.test:{webhook_receiver.port}/webhooks"

    status = await sender.send(url=url, secrets=[SECRET], event_id=event_id, event=event)

    assert status == 204
    [arrived] = _arrived(webhook_receiver, event_id)
    assert arrived.headers["host"] == f"hooks.acme.test:{webhook_receiver.port}"
    assert Webhook(SECRET).verify(arrived.body, arrived.headers)["id"] == event_id


async def test_delivery_tries_the_next_checked_address_when_one_refuses(
    http: httpx.AsyncClient, webhook_receiver: WebhookReceiver
) -> None:
    # The receiver listens on 127.0.0.1 only; 127.0.0.2 refuses the connection.
    sender = WebhookSender(http, allow_loopback=True, resolver=resolver("127.0.0.2", "127.0.0.1"))
    event_id, event = _event()
    url = f"http://hooks.acme.test:{webhook_receiver.port}/webhooks"

    await sender.send(url=url, secrets=[SECRET], event_id=event_id, event=event)

    assert len(_arrived(webhook_receiver, event_id)) == 1


@pytest.mark.parametrize(
    ("answers", "allow_loopback"),
    [
        (("10.0.0.7",), True),  # rebound to a private address
        (("169.254.169.254",), True),  # to the metadata service
        (("127.0.0.1",), False),  # to loopback, in production
        (("93.184.215.14", "127.0.0.1"), False),  # one bad answer among good ones
    ],
)
async def test_a_name_rebound_to_a_refused_address_is_not_contacted(
    http: httpx.AsyncClient,
    webhook_receiver: WebhookReceiver,
    answers: tuple[str, ...],
    allow_loopback: bool,
) -> None:
    sender = WebhookSender(http, allow_loopback=allow_loopback, resolver=resolver(*answers))
    event_id, event = _event()
    url = f"https://hooks.acme.test:{webhook_receiver.port}/webhooks"

    with pytest.raises(WebhookTargetRefused, match="public addresses only"):
        await sender.send(url=url, secrets=[SECRET], event_id=event_id, event=event)

    assert _arrived(webhook_receiver, event_id) == []


async def test_rebinding_fails_the_activity_retryably_and_sends_nothing(
    activities: PaymentActivities,
    sessions: async_sessionmaker[AsyncSession],
    payment_ledger: PooledPaymentLedger,
    webhook_receiver: WebhookReceiver,
    http: httpx.AsyncClient,
) -> None:
    # Stored when the name pointed at the (allowed, local) receiver; now it points inside.
    client = await _client(sessions, f"http://hooks.acme.test:{webhook_receiver.port}/webhooks")
    payment_id = await _succeeded_payment(activities, client.client_id)
    unused_provider = ProviderClient("http://127.0.0.1:9", "sk_unused", 1.0)
    rebound = PaymentActivities(
        payment_ledger,
        unused_provider,
        WebhookSender(http, allow_loopback=True, resolver=resolver("10.0.0.7")),
    )
    try:
        with pytest.raises(ApplicationError) as failed:
            await env.run(
                rebound.notify_webhook,
                NotifyInput(payment_id=payment_id, event_type="payment.succeeded"),
            )
    finally:
        await unused_provider.aclose()

    assert failed.value.type == ErrorType.WEBHOOK_DELIVERY_FAILED
    assert not failed.value.non_retryable, "the client may fix its DNS; retries re-check"
    assert "10.0.0.7" in str(failed.value)
    assert _received_for(webhook_receiver, payment_id) == []


# -- redirects ------------------------------------------------------------------------


@pytest.fixture
async def redirecting_server(webhook_receiver: WebhookReceiver) -> AsyncIterator[str]:
    """Answers every request with 307 to the receiver: a redirect that must not be followed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\n"
            + f"Location: {webhook_receiver.url}\r\n".encode()
            + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(answer, "127.0.0.1", port)
    async with server:
        yield f"http://127.0.0.1:{port}/webhooks"


async def test_a_redirect_is_a_failed_delivery_and_is_not_followed(
    http: httpx.AsyncClient, webhook_receiver: WebhookReceiver, redirecting_server: str
) -> None:
    # A client configured to follow redirects must not change that: the sender decides.
    following = httpx.AsyncClient(timeout=5, follow_redirects=True)
    sender = WebhookSender(following, allow_loopback=True)
    event_id, event = _event()
    try:
        with pytest.raises(WebhookDeliveryError, match="answered 307"):
            await sender.send(
                url=redirecting_server,
                secrets=[SECRET],
                event_id=event_id,
                event=event,
            )
    finally:
        await following.aclose()

    assert _arrived(webhook_receiver, event_id) == []
