"""The API's plain-SQL payment reads answer exactly what the repositories answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from admin.clients import add_client
from admin.credentials import hash_api_key
from admin.keys import create_key_async, revoke_key_async
from domain.payments import (
    PaymentStatus,
)
from domain.refunds import (
    RefundStatus,
)
from ledger.db import autocommit_session_factory
from ledger.mapping import StoredPayment
from ledger.reads import (
    DATABASE_ERRORS,
    PooledApiKeyReads,
    PooledPaymentReads,
    SessionApiKeyReads,
    SessionPaymentReads,
)
from tests.helpers.ledger import payment_in_ledger, refund_in_ledger


@pytest.fixture
async def pooled(engine: AsyncEngine) -> AsyncIterator[PooledPaymentReads]:
    url = engine.url.render_as_string(hide_password=False)
    reads = PooledPaymentReads.create(url, size=3, timeout=5)
    await reads.open()
    yield reads
    await reads.close()


async def test_pooled_reads_equal_the_repositories_for_every_kind_of_payment(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    pooled: PooledPaymentReads,
) -> None:
    async with sessions() as session, session.begin():
        client = await add_client(session, name="reads", webhook_url=None)
        other = await add_client(session, name="reads-other", webhook_url=None)
    refunded = await payment_in_ledger(
        sessions, client.client_id, PaymentStatus.SUCCEEDED, description="Order 7"
    )
    for amount, ok in [(1000, True), (700, False), (250, True)]:
        await refund_in_ledger(sessions, refunded, amount, ok)
    payments = [
        await payment_in_ledger(sessions, client.client_id, None, metadata={"order": "1"}),
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.FAILED),
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.SUCCEEDED),
        refunded,
    ]
    orm = SessionPaymentReads(autocommit_session_factory(engine))

    for payment in payments:
        by_key = await pooled.by_key(payment.client_id, payment.idempotency_key)
        assert by_key is not None
        assert by_key == await orm.by_key(payment.client_id, payment.idempotency_key)
        assert by_key.request_fingerprint == payment.request_fingerprint
        assert by_key.origin_request_id == payment.origin_request_id
        by_id = await pooled.by_id(payment.client_id, payment.payment_id)
        assert by_id == by_key.payment
        assert by_id == await orm.by_id(payment.client_id, payment.payment_id)

    read = await pooled.by_id(refunded.client_id, refunded.payment_id)
    assert read is not None
    assert [r.amount for r in read.refunds] == [1000, 700, 250]
    assert [r.status for r in read.refunds] == [
        RefundStatus.SUCCEEDED,
        RefundStatus.FAILED,
        RefundStatus.SUCCEEDED,
    ]
    assert read.amount_refundable == 5000 - 1250
    assert read.description == "Order 7"
    assert read.created_at is not None
    assert read.created_at.endswith("Z")
    # Scoped to the client: another client's key or id reads nothing.
    assert await pooled.by_key(other.client_id, refunded.idempotency_key) is None
    assert await pooled.by_id(other.client_id, refunded.payment_id) is None
    assert await pooled.by_key(client.client_id, "no-such-key") is None


async def test_pooled_key_reads_equal_the_repository_for_active_revoked_and_unknown_keys(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    pooled: PooledPaymentReads,
) -> None:
    """The authenticator's lookup on the read pool answers what ClientRepository does:
    the client of an active key, the revocation of a revoked one, nothing for a hash no
    key has."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="key-reads", webhook_url=None)
    url = engine.url.render_as_string(hide_password=False)
    _, second_key = await create_key_async(url, client.client_id)
    await revoke_key_async(url, api_key=client.api_key)
    keys = PooledApiKeyReads(pooled.pool)
    orm = SessionApiKeyReads(autocommit_session_factory(engine))

    active = await keys.key_for_hash(hash_api_key(second_key))
    assert active is not None
    assert active == await orm.key_for_hash(hash_api_key(second_key))
    assert (active.client_id, active.client_name) == (client.client_id, "key-reads")
    assert active.revoked_at is None

    revoked = await keys.key_for_hash(hash_api_key(client.api_key))
    assert revoked is not None
    assert revoked == await orm.key_for_hash(hash_api_key(client.api_key))
    assert revoked.revoked_at is not None
    assert revoked.revoked_at.endswith("Z")

    assert await keys.key_for_hash(hash_api_key("sk_no_such_key")) is None
    assert await orm.key_for_hash(hash_api_key("sk_no_such_key")) is None

    mirrored = await keys.active_keys(10_000)
    assert mirrored == await orm.active_keys(10_000)
    assert active in mirrored
    assert revoked not in mirrored
    assert await keys.active_keys(1) == await orm.active_keys(1) == mirrored[:1]


async def test_reads_by_key_asked_at_once_share_one_statement_and_each_get_their_own(
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    pooled: PooledPaymentReads,
) -> None:
    """The storm's requests read by key in the same loop turn: one connection and one
    statement answer them all, each with exactly what it would have read alone."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="batch", webhook_url=None)
        other = await add_client(session, name="batch-other", webhook_url=None)
    refunded = await payment_in_ledger(sessions, client.client_id, PaymentStatus.SUCCEEDED)
    await refund_in_ledger(sessions, refunded, 1500, True)
    second_refunded = await payment_in_ledger(sessions, client.client_id, PaymentStatus.SUCCEEDED)
    await refund_in_ledger(sessions, second_refunded, 300, False)
    payments = [
        refunded,
        second_refunded,
        await payment_in_ledger(sessions, client.client_id, None),
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.FAILED),
        await payment_in_ledger(sessions, other.client_id, PaymentStatus.SUCCEEDED),
    ]
    asked = [(p.client_id, p.idempotency_key) for p in payments]
    asked += [
        (refunded.client_id, refunded.idempotency_key),  # the same key twice
        (other.client_id, refunded.idempotency_key),  # another client's key
        (client.client_id, "no-such-key"),
    ]
    await pooled._pool.wait()
    connections_before = pooled._pool.get_stats().get("requests_num", 0)

    answers = await asyncio.gather(*(pooled.by_key(c, k) for c, k in asked))

    assert pooled._pool.get_stats().get("requests_num", 0) == connections_before + 1
    orm = SessionPaymentReads(autocommit_session_factory(engine))
    for (client_id, key), answer in zip(asked, answers, strict=True):
        assert answer == await orm.by_key(client_id, key)
    assert answers[-2:] == [None, None]
    assert answers[0] is not None
    assert answers[1] is not None
    assert [r.amount for r in answers[0].payment.refunds] == [1500]
    assert [r.status for r in answers[1].payment.refunds] == [RefundStatus.FAILED]
    assert answers[4] is not None
    assert answers[4].payment.client_id == other.client_id


async def test_keys_past_the_batch_limit_go_in_the_next_batch(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async with sessions() as session, session.begin():
        client = await add_client(session, name="batch-limit", webhook_url=None)
    payments = [
        await payment_in_ledger(sessions, client.client_id, PaymentStatus.FAILED) for _ in range(5)
    ]
    url = engine.url.render_as_string(hide_password=False)
    reads = PooledPaymentReads.create(url, size=3, timeout=5, batch_limit=2)
    await reads.open()
    try:
        await reads._pool.wait()
        answers = await asyncio.gather(
            *(reads.by_key(p.client_id, p.idempotency_key) for p in payments)
        )
        assert reads._pool.get_stats().get("requests_num", 0) == 3  # 2 + 2 + 1 keys
    finally:
        await reads.close()
    assert [a.payment.id if a else None for a in answers] == [p.payment_id for p in payments]


async def test_an_asker_that_gives_up_leaves_the_others_their_answers(
    sessions: async_sessionmaker[AsyncSession], pooled: PooledPaymentReads
) -> None:
    """A request cancelled (its client left) while its batch waits for a connection."""
    async with sessions() as session, session.begin():
        client = await add_client(session, name="batch-cancel", webhook_url=None)
    payments = [await payment_in_ledger(sessions, client.client_id, None) for _ in range(3)]
    async with contextlib.AsyncExitStack() as held:
        for _ in range(3):  # the fixture's pool size
            await held.enter_async_context(pooled._pool.connection())
        askers = [
            asyncio.create_task(pooled.by_key(p.client_id, p.idempotency_key)) for p in payments
        ]
        while pooled.load()[1] < 1:
            await asyncio.sleep(0.01)
        askers[1].cancel()
    first, second, third = await asyncio.gather(*askers, return_exceptions=True)
    assert isinstance(second, asyncio.CancelledError)
    assert isinstance(first, StoredPayment)
    assert first.payment.id == payments[0].payment_id
    assert isinstance(third, StoredPayment)
    assert third.payment.id == payments[2].payment_id


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_database_that_cannot_be_reached_raises_a_database_error_in_time(
    engine: AsyncEngine,
) -> None:
    """The API maps these errors to a retry-safe 503; it must not hang for long."""
    url = make_url(engine.url).set(port=_closed_port()).render_as_string(hide_password=False)
    reads = PooledPaymentReads.create(url, size=2, timeout=0.5)
    await reads.open()  # does not wait: the API starts while PostgreSQL is down
    try:
        started = time.monotonic()
        with pytest.raises(DATABASE_ERRORS):
            await reads.by_key("cli_x", "key")
        assert time.monotonic() - started < 5
        # Every asker of a batch gets the error, not only the first.
        answers = await asyncio.gather(
            *(reads.by_key("cli_x", f"key-{n}") for n in range(3)), return_exceptions=True
        )
        assert all(isinstance(answer, DATABASE_ERRORS) for answer in answers), answers
    finally:
        await reads.close()


async def test_the_pool_says_how_many_reads_hold_a_connection_and_how_many_wait(
    pooled: PooledPaymentReads,
) -> None:
    """What the API exports as payments_api_read_pool_in_use / _waiting."""
    await pooled._pool.wait()  # its first connection opened
    assert pooled.load() == (0, 0)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(3):  # the fixture's pool size
            await held.enter_async_context(pooled._pool.connection())
        waiting = asyncio.create_task(pooled.by_key("cli_x", "a-key"))
        while pooled.load()[1] < 1:
            await asyncio.sleep(0.01)
        assert pooled.load() == (3, 1)
    assert await waiting is None  # served once a connection came back
    assert pooled.load() == (0, 0)


async def test_the_pool_opens_its_minimum_at_start_and_never_more_than_its_size(
    engine: AsyncEngine,
) -> None:
    """The connections a storm's first lookups need are open before it starts."""
    url = engine.url.render_as_string(hide_password=False)
    for min_size, size, opened in [(3, 5, 3), (8, 2, 2)]:
        reads = PooledPaymentReads.create(url, size=size, timeout=5, min_size=min_size)
        await reads.open()
        try:
            await reads.pool.wait(timeout=10)  # every connection of the minimum is open
            assert reads.pool.get_stats()["pool_size"] == opened
            assert reads.load() == (0, 0)
        finally:
            await reads.close()
