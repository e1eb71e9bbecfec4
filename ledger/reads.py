"""The API's idempotency reads: a payment by key or by id, as plain prepared SQL.

Every request to ``POST /v1/payments`` reads the payment by key at least once (a
duplicate of a finished payment reads nothing else), and a waiting request re-reads
it on each change. Through an ORM session one such read cost the API 2.3-2.6 ms of
CPU (session, unit of work, statement caching, row-to-object mapping); the same
two statements on a pooled psycopg connection cost 0.55 ms (measured side by side,
50 at once, a succeeded payment with its refunds). Under the storm the API's CPU is
the scarce thing, so these reads skip the ORM. Writes stay in ``repositories``.

``SessionPaymentReads`` answers the same through the repositories, for callers that
only have a session factory (tests, tools); ``tests/ledger/test_reads.py`` holds the
two to the same answers.
"""

from __future__ import annotations

from typing import Any, Protocol

import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.payments import Payment, PaymentStatus
from ledger.outcomes import libpq_url
from ledger.repositories import (
    PaymentRepository,
    StoredPayment,
    payment_to_domain,
    refund_to_domain,
)

# The columns ``Payment`` and ``StoredPayment`` need, and nothing else.
_BY_KEY = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version "
    "FROM payments WHERE client_id = %s AND idempotency_key = %s"
)
_BY_ID = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version "
    "FROM payments WHERE id = %s AND client_id = %s"
)
_REFUNDS = (
    "SELECT id, payment_id, idempotency_key, status, amount, currency, reason, failure_code, "
    "failure_message, provider_refund_id, created_at, updated_at "
    "FROM refunds WHERE payment_id = %s ORDER BY created_at, id"
)

# What a read raises when PostgreSQL is away or the pool has no connection in time
# (psycopg_pool.PoolTimeout is an OperationalError): the API answers 503.
DATABASE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


class PaymentReads(Protocol):
    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None: ...

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None: ...


class PooledPaymentReads:
    """Autocommit connections of the API process's own small pool: one round trip
    per statement, no BEGIN/ROLLBACK (under READ COMMITTED each statement has its own
    snapshot anyway). Never for writes or locking reads."""

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]]) -> None:
        self._pool = pool

    @classmethod
    def create(cls, database_url: str, *, size: int, timeout: float) -> PooledPaymentReads:
        """Not connected yet: ``open`` in the app's lifespan. The pool grows to ``size``
        on demand, so the API starts (and answers 503) while PostgreSQL is down."""
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            libpq_url(database_url),
            connection_class=psycopg.AsyncConnection[Any],
            kwargs={"autocommit": True, "row_factory": namedtuple_row},
            min_size=1,
            max_size=size,
            timeout=timeout,
            name="api-reads",
            open=False,
        )
        return cls(pool)

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    def load(self) -> tuple[int, int]:
        """(connections lent out or being opened, requests waiting for one). Under load
        a read holds its connection for a turn of the event loop, not for the query's
        time in PostgreSQL, so the pool's size over the loop's turn bounds the reads
        per second."""
        stats = self._pool.get_stats()
        in_use = stats.get("pool_size", 0) - stats.get("pool_available", 0)
        return in_use, stats.get("requests_waiting", 0)

    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_BY_KEY, (client_id, idempotency_key), prepare=True)
            row = await cursor.fetchone()
            if row is None:
                return None
            payment = await self._with_refunds(conn, row)
        return StoredPayment(payment, row.request_fingerprint, row.origin_request_id)

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_BY_ID, (payment_id, client_id), prepare=True)
            row = await cursor.fetchone()
            return None if row is None else await self._with_refunds(conn, row)

    @staticmethod
    async def _with_refunds(conn: psycopg.AsyncConnection[Any], row: Any) -> Payment:
        # Rows with the ORM models' attribute names, so the repositories' mappers
        # turn them into the same domain objects.
        if row.status != PaymentStatus.SUCCEEDED.value:
            # Only a succeeded payment takes refunds, as in PaymentRepository.
            return payment_to_domain(row, [])
        cursor = await conn.execute(_REFUNDS, (row.id,), prepare=True)
        return payment_to_domain(row, [refund_to_domain(r) for r in await cursor.fetchall()])


class SessionPaymentReads:
    """The same reads through the repositories and a session factory."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None:
        async with self._sessions() as session:
            return await PaymentRepository(session).get_by_key(client_id, idempotency_key)

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None:
        async with self._sessions() as session:
            return await PaymentRepository(session).get(client_id, payment_id)
