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
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.payments import Payment, PaymentStatus
from domain.refunds import Refund, RefundStatus
from ledger.outcomes import libpq_url
from ledger.repositories import PaymentRepository, StoredPayment, isoformat_utc

# The columns ``Payment`` and ``StoredPayment`` need, and nothing else.
_BY_KEY = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version "
    "FROM payments WHERE client_id = %s AND idempotency_key = %s"
)
_BY_ID = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata, status, failure_code, failure_message, "
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


def _refund(row: dict[str, Any]) -> Refund:
    return Refund(
        id=row["id"],
        payment_id=row["payment_id"],
        idempotency_key=row["idempotency_key"],
        status=RefundStatus(row["status"]),
        amount=row["amount"],
        currency=row["currency"],
        reason=row["reason"],
        failure_code=row["failure_code"],
        failure_message=row["failure_message"],
        provider_refund_id=row["provider_refund_id"],
        created_at=isoformat_utc(row["created_at"]),
        updated_at=isoformat_utc(row["updated_at"]),
    )


def _payment(row: dict[str, Any], refunds: list[Refund]) -> Payment:
    return Payment(
        id=row["id"],
        client_id=row["client_id"],
        idempotency_key=row["idempotency_key"],
        status=PaymentStatus(row["status"]),
        amount=row["amount"],
        currency=row["currency"],
        description=row["description"],
        metadata=dict(row["metadata"] or {}),
        failure_code=row["failure_code"],
        failure_message=row["failure_message"],
        provider_charge_id=row["provider_charge_id"],
        created_at=isoformat_utc(row["created_at"]),
        updated_at=isoformat_utc(row["updated_at"]),
        refunds=refunds,
        version=row["version"],
    )


class PooledPaymentReads:
    """Autocommit connections of the API process's own small pool: one round trip
    per statement, no BEGIN/ROLLBACK (under READ COMMITTED each statement has its own
    snapshot anyway). Never for writes or locking reads."""

    def __init__(self, pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]) -> None:
        self._pool = pool

    @classmethod
    def create(cls, database_url: str, *, size: int, timeout: float) -> PooledPaymentReads:
        """Not connected yet: ``open`` in the app's lifespan. The pool grows to ``size``
        on demand, so the API starts (and answers 503) while PostgreSQL is down."""
        pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
            libpq_url(database_url),
            connection_class=psycopg.AsyncConnection[dict[str, Any]],
            kwargs={"autocommit": True, "row_factory": dict_row},
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

    async def by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_BY_KEY, (client_id, idempotency_key), prepare=True)
            row = await cursor.fetchone()
            if row is None:
                return None
            payment = await self._with_refunds(conn, row)
        return StoredPayment(payment, row["request_fingerprint"], row["origin_request_id"])

    async def by_id(self, client_id: str, payment_id: str) -> Payment | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_BY_ID, (payment_id, client_id), prepare=True)
            row = await cursor.fetchone()
            return None if row is None else await self._with_refunds(conn, row)

    @staticmethod
    async def _with_refunds(
        conn: psycopg.AsyncConnection[dict[str, Any]], row: dict[str, Any]
    ) -> Payment:
        if row["status"] != PaymentStatus.SUCCEEDED.value:
            # Only a succeeded payment takes refunds, as in PaymentRepository.
            return _payment(row, [])
        cursor = await conn.execute(_REFUNDS, (row["id"],), prepare=True)
        return _payment(row, [_refund(r) for r in await cursor.fetchall()])


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
