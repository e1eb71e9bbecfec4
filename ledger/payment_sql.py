"""The ledger statements on every payment's path, as plain prepared SQL.

Each payment opens its row, records its outcome and reads itself back for the
webhook. Through the ORM those were 12-14 round trips (BEGIN, the statements, a
read-back, COMMIT) and most of the worker's database CPU: in the storm's profile
SQLAlchemy and psycopg took 22 % of the worker's samples. Here each is one
statement in the common case, on a pooled autocommit connection in the worker
(``PooledPaymentLedger``) or on a session's connection inside its transaction
(``PaymentRepository.open`` and ``record_outcome`` delegate here), so there is one
implementation of the exactly-once rules.

- Opening inserts the row unless the (client, key) row exists and notifies the
  waiting API requests in the same statement; only when the row was there already
  does a second statement read it (a fresh snapshot: the conflicting insert may
  have committed after this statement's snapshot was taken).
- Recording moves the row from ``processing`` to its outcome, posts the charge's
  two entries and notifies, in one statement. ``WHERE status = 'processing'`` is
  the exactly-once rule: a concurrent recorder waits for the row lock, re-checks the
  condition on the committed row and updates nothing; a caller that updated nothing
  reads the payment as it stands. The entries' balance is checked at commit by the
  ``ledger_entries_balanced`` constraint trigger, as for any other writer.
- The webhook's read takes the payment, its refunds and the client's signing
  secrets in one statement, so they come from one snapshot: the payment's
  ``version`` (the event's ``sequence``) matches the refunds it lists.
"""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from domain.payments import (
    Payment,
    PaymentInput,
    PaymentStatus,
    RecordOutcomeInput,
    payment_workflow_id,
)
from ledger.mapping import (
    PROVIDER_RECEIVABLE_ACCOUNT,
    StoredPayment,
    WebhookTarget,
    client_payable_account,
    payment_to_domain,
    refund_to_domain,
)
from ledger.outcomes import OUTCOME_CHANNEL, libpq_url, row_opened_payload

# The columns ``Payment`` and ``StoredPayment`` need, under the ORM models' attribute
# names (``metadata_``), as ledger/reads.py selects them.
_BY_ID = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version FROM payments WHERE id = %s"
)
_BY_CLIENT_KEY = (
    "SELECT id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version FROM payments "
    "WHERE client_id = %s AND idempotency_key = %s"
)
_REFUNDS_OF_PAYMENT = (
    "SELECT id, payment_id, idempotency_key, status, amount, currency, reason, failure_code, "
    "failure_message, provider_refund_id, created_at, updated_at "
    "FROM refunds WHERE payment_id = %s ORDER BY created_at, id"
)
_OPEN = (
    "INSERT INTO payments (id, client_id, idempotency_key, request_fingerprint, "
    "origin_request_id, amount, currency, payment_method, description, metadata, status, "
    "workflow_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    # Any conflict: the id is derived from (client, key), so two opens of one payment
    # racing each other can meet on the primary key first, which a conflict clause
    # naming only uq_payments_client_key leaves a unique violation.
    "ON CONFLICT DO NOTHING "
    "RETURNING id, client_id, idempotency_key, request_fingerprint, origin_request_id, amount, "
    "currency, description, metadata AS metadata_, status, failure_code, failure_message, "
    "provider_charge_id, created_at, updated_at, version, "
    # Delivered at commit, and only by the statement that inserted the row.
    "pg_notify(%s, %s)"
)
# The charge's two entries are posted only for a payment that has just succeeded; the
# payable account's name is built by ``format`` from client_payable_account's pattern.
_RECORD = (
    "WITH recorded AS ("
    " UPDATE payments SET status = %(status)s, provider_charge_id = %(charge_id)s,"
    " failure_code = %(failure_code)s, failure_message = %(failure_message)s,"
    " updated_at = now(), version = version + 1"
    " WHERE id = %(payment_id)s AND status = %(processing)s"
    " RETURNING id, client_id, idempotency_key, request_fingerprint, origin_request_id,"
    " amount, currency, description, metadata AS metadata_, status, failure_code,"
    " failure_message, provider_charge_id, created_at, updated_at, version"
    "), posted AS ("
    " INSERT INTO ledger_entries (payment_id, entry_kind, account, amount, currency)"
    " SELECT recorded.id, 'charge', entry.account, entry.sign * recorded.amount,"
    " recorded.currency FROM recorded CROSS JOIN LATERAL (VALUES (%(receivable)s, 1),"
    " (format(%(payable_pattern)s, recorded.client_id), -1)) AS entry(account, sign)"
    " WHERE recorded.status = %(succeeded)s"
    ")"
    " SELECT recorded.*, pg_notify(%(channel)s, recorded.id) FROM recorded"
)
# Refunds only for a succeeded payment (no other takes them), as one json array.
_FOR_WEBHOOK = (
    "SELECT p.id, p.client_id, p.idempotency_key, p.request_fingerprint, p.origin_request_id,"
    " p.amount, p.currency, p.description, p.metadata AS metadata_, p.status, p.failure_code,"
    " p.failure_message, p.provider_charge_id, p.created_at, p.updated_at, p.version,"
    " c.webhook_url, c.webhook_secret,"
    " ARRAY(SELECT s.secret FROM previous_webhook_secrets s"
    "  WHERE s.client_id = p.client_id AND s.expires_at > now()"
    "  ORDER BY s.retired_at DESC, s.id DESC) AS previous_secrets,"
    " CASE WHEN p.status = %s THEN (SELECT json_agg(json_build_object("
    "  'id', r.id, 'payment_id', r.payment_id, 'idempotency_key', r.idempotency_key,"
    "  'status', r.status, 'amount', r.amount, 'currency', r.currency, 'reason', r.reason,"
    "  'failure_code', r.failure_code, 'failure_message', r.failure_message,"
    "  'provider_refund_id', r.provider_refund_id, 'created_at', r.created_at,"
    "  'updated_at', r.updated_at) ORDER BY r.created_at, r.id)"
    "  FROM refunds r WHERE r.payment_id = p.id) END AS refunds"
    " FROM payments p JOIN api_clients c ON c.id = p.client_id WHERE p.id = %s"
)

Connection = psycopg.AsyncConnection[Any]


async def _fetchone(conn: Connection, statement: str, params: Any) -> Any:
    async with conn.cursor(row_factory=namedtuple_row) as cursor:
        await cursor.execute(statement, params, prepare=True)
        return await cursor.fetchone()


async def payment_with_refunds(conn: Connection, row: Any) -> Payment:
    """A payment row (the models' attribute names) as a ``Payment``, with its refunds."""
    if row.status != PaymentStatus.SUCCEEDED.value:
        # Only a succeeded payment takes refunds (RefundRepository.reserve refuses the rest).
        return payment_to_domain(row, [])
    async with conn.cursor(row_factory=namedtuple_row) as cursor:
        await cursor.execute(_REFUNDS_OF_PAYMENT, (row.id,), prepare=True)
        refunds: list[Any] = await cursor.fetchall()
    return payment_to_domain(row, [refund_to_domain(refund) for refund in refunds])


async def open_payment(conn: Connection, payment: PaymentInput) -> StoredPayment:
    """The payment's row as ``processing``, inserted unless its (client, key) row exists."""
    request = payment.request
    row = await _fetchone(
        conn,
        _OPEN,
        (
            payment.payment_id,
            payment.client_id,
            payment.idempotency_key,
            payment.request_fingerprint,
            payment.origin_request_id or None,
            request.amount,
            request.currency,
            request.payment_method,
            request.description,
            Jsonb(dict(request.metadata)),
            PaymentStatus.PROCESSING.value,
            payment_workflow_id(payment.client_id, payment.idempotency_key),
            OUTCOME_CHANNEL,
            row_opened_payload(payment.payment_id),
        ),
    )
    if row is None:
        row = await _fetchone(conn, _BY_CLIENT_KEY, (payment.client_id, payment.idempotency_key))
        if row is None:  # pragma: no cover - the conflicting row is committed by now
            raise RuntimeError(f"payment {payment.payment_id} conflicted but is not there")
        return StoredPayment(
            await payment_with_refunds(conn, row), row.request_fingerprint, row.origin_request_id
        )
    return StoredPayment(payment_to_domain(row, []), row.request_fingerprint, row.origin_request_id)


async def record_payment_outcome(conn: Connection, outcome: RecordOutcomeInput) -> Payment:
    """Move a processing payment to its outcome and post its entries, exactly once; a
    payment already past ``processing`` is returned as it stands."""
    row = await _fetchone(
        conn,
        _RECORD,
        {
            "status": outcome.status.value,
            "charge_id": outcome.provider_charge_id,
            "failure_code": outcome.failure_code,
            "failure_message": outcome.failure_message,
            "payment_id": outcome.payment_id,
            "processing": PaymentStatus.PROCESSING.value,
            "succeeded": PaymentStatus.SUCCEEDED.value,
            "receivable": PROVIDER_RECEIVABLE_ACCOUNT,
            "payable_pattern": client_payable_account("%s"),
            "channel": OUTCOME_CHANNEL,
        },
    )
    if row is not None:
        # It was processing until this statement: no refunds yet.
        return payment_to_domain(row, [])
    row = await _fetchone(conn, _BY_ID, (outcome.payment_id,))
    if row is None:
        raise LookupError(f"payment {outcome.payment_id} does not exist")
    return await payment_with_refunds(conn, row)


def _refund_row(fields: dict[str, Any]) -> Any:
    """A refund from the JSON aggregate, with its timestamps as datetimes again."""
    return SimpleNamespace(
        **{
            **fields,
            "created_at": datetime.fromisoformat(fields["created_at"]),
            "updated_at": datetime.fromisoformat(fields["updated_at"]),
        }
    )


async def payment_for_webhook(
    conn: Connection, payment_id: str
) -> tuple[Payment, WebhookTarget] | None:
    """The payment with its refunds and its client's webhook target, from one snapshot."""
    row = await _fetchone(conn, _FOR_WEBHOOK, (PaymentStatus.SUCCEEDED.value, payment_id))
    if row is None:
        return None
    # psycopg decodes the json aggregate; NULL when there are none or it is not succeeded.
    refunds = [refund_to_domain(_refund_row(fields)) for fields in row.refunds or []]
    payment = payment_to_domain(row, refunds)
    target = WebhookTarget(
        url=row.webhook_url,
        secret=row.webhook_secret,
        previous_secrets=tuple(row.previous_secrets),
    )
    return payment, target


class PooledPaymentLedger:
    """The worker's ledger writes on autocommit connections of its own pool: each
    statement commits by itself, with no BEGIN or COMMIT round trip."""

    def __init__(self, pool: AsyncConnectionPool[Connection]) -> None:
        self._pool = pool

    @classmethod
    def create(cls, database_url: str, *, size: int, timeout: float) -> PooledPaymentLedger:
        """Not connected yet: ``open`` it. The pool grows to ``size`` on demand, so the
        worker starts while PostgreSQL is down, and its activities retry."""
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            libpq_url(database_url),
            connection_class=psycopg.AsyncConnection[Any],
            kwargs={"autocommit": True},
            min_size=1,
            max_size=size,
            timeout=timeout,
            name="worker-ledger",
            open=False,
        )
        return cls(pool)

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def open_payment(self, payment: PaymentInput) -> StoredPayment:
        async with self._pool.connection() as conn:
            return await open_payment(conn, payment)

    async def record_outcome(self, outcome: RecordOutcomeInput) -> Payment:
        async with self._pool.connection() as conn:
            return await record_payment_outcome(conn, outcome)

    async def payment_for_webhook(self, payment_id: str) -> tuple[Payment, WebhookTarget] | None:
        async with self._pool.connection() as conn:
            return await payment_for_webhook(conn, payment_id)
