"""The ledger through the ORM. Repositories never commit: the caller owns the transaction.

The statements on every payment's path are plain SQL in ``ledger.payment_sql``; the
API's idempotency reads are in ``ledger.reads``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.payments import (
    Payment,
    PaymentInput,
    PaymentStatus,
    RecordOutcomeInput,
)
from domain.refunds import (
    RecordRefundInput,
    Refund,
    RefundInput,
    RefundRefusal,
    RefundStatus,
    Reservation,
    refund_entry_kind,
    refund_workflow_id,
)
from ledger import payment_sql
from ledger.mapping import (
    PROVIDER_RECEIVABLE_ACCOUNT,
    StoredPayment,
    WebhookTarget,
    client_payable_account,
    isoformat_utc,
    payment_to_domain,
    refund_to_domain,
)
from ledger.tables import (
    ApiClient,
    ApiKey,
    LedgerEntry,
    PaymentRow,
    PreviousWebhookSecret,
    RefundRow,
)


@dataclass(frozen=True)
class ClientIdentity:
    client_id: str
    name: str


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    client_id: str
    client_name: str
    key_hash: str
    display_prefix: str
    created_at: str
    revoked_at: str | None


@dataclass(frozen=True)
class PaymentPage:
    payments: list[Payment]
    has_more: bool


class UnknownCursor(LookupError):
    """``starting_after`` names no payment of this client."""


def key_record(key: ApiKey, client_name: str) -> ApiKeyRecord:
    """A key's row (the ORM's, or a plain row with the same columns) as a record."""
    return ApiKeyRecord(
        key_id=key.id,
        client_id=key.client_id,
        client_name=client_name,
        key_hash=key.key_hash,
        display_prefix=key.display_prefix,
        created_at=isoformat_utc(key.created_at),
        revoked_at=None if key.revoked_at is None else isoformat_utc(key.revoked_at),
    )


class PaymentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def _with_refunds(self, row: PaymentRow) -> Payment:
        if row.status != PaymentStatus.SUCCEEDED.value:
            # Only a succeeded payment takes refunds (RefundRepository.open refuses the
            # rest) and it stays succeeded: the idempotency path's reads of processing
            # payments save a round trip.
            return payment_to_domain(row, [])
        refunds = await RefundRepository(self._session).for_payment(row.id)
        return payment_to_domain(row, refunds)

    async def count_processing(self) -> int:
        """Payments whose outcome is not recorded yet, across every client (a partial
        index keeps this proportional to the payments in flight)."""
        count = await self._session.scalar(
            select(func.count())
            .select_from(PaymentRow)
            .where(PaymentRow.status == PaymentStatus.PROCESSING.value)
        )
        return int(count or 0)

    async def get_by_key(self, client_id: str, idempotency_key: str) -> StoredPayment | None:
        row = await self._session.scalar(
            select(PaymentRow).where(
                PaymentRow.client_id == client_id,
                PaymentRow.idempotency_key == idempotency_key,
            )
        )
        if row is None:
            return None
        return StoredPayment(
            await self._with_refunds(row), row.request_fingerprint, row.origin_request_id
        )

    async def get(self, client_id: str, payment_id: str) -> Payment | None:
        row = await self._session.scalar(
            select(PaymentRow).where(PaymentRow.id == payment_id, PaymentRow.client_id == client_id)
        )
        return None if row is None else await self._with_refunds(row)

    async def get_by_id(self, payment_id: str) -> Payment | None:
        """Unscoped read, for the worker only: the API always scopes by client.

        FOR SHARE waits out and holds off every writer of the payment (they all lock
        its row FOR UPDATE), so its version and its refunds are read as one state:
        what a webhook's ``sequence`` and ``data`` promise.
        """
        row = await self._session.scalar(
            select(PaymentRow).where(PaymentRow.id == payment_id).with_for_update(read=True)
        )
        return None if row is None else await self._with_refunds(row)

    async def open(self, payment: PaymentInput) -> StoredPayment:
        """Insert the payment as ``processing`` unless its (client, key) row exists already
        (in the session's transaction; ``ledger.payment_sql`` has the statements)."""
        return await payment_sql.open_payment(await self._driver_connection(), payment)

    async def record_outcome(self, outcome: RecordOutcomeInput) -> Payment:
        """Move a processing payment to its outcome and post its entries, exactly once;
        a second call finds the payment terminal and returns it unchanged."""
        return await payment_sql.record_payment_outcome(await self._driver_connection(), outcome)

    async def _driver_connection(self) -> payment_sql.Connection:
        """The psycopg connection under the session, inside its transaction."""
        connection = await self._session.connection()
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        if driver is None:  # pragma: no cover - a checked-out connection has its driver's
            raise RuntimeError("the session's connection is closed")
        return driver  # type: ignore[no-any-return]

    async def list_for_client(
        self,
        client_id: str,
        *,
        limit: int,
        starting_after: str | None = None,
        status: PaymentStatus | None = None,
    ) -> PaymentPage:
        """One page of a client's payments, newest first; the cursor is a payment id.

        Ordered by (created_at, id) descending so payments created in the same
        microsecond still page without gaps or repeats.
        """
        query = select(PaymentRow).where(PaymentRow.client_id == client_id)
        if status is not None:
            query = query.where(PaymentRow.status == status.value)
        if starting_after is not None:
            cursor = (
                await self._session.execute(
                    select(PaymentRow.created_at, PaymentRow.id).where(
                        PaymentRow.id == starting_after, PaymentRow.client_id == client_id
                    )
                )
            ).first()
            if cursor is None:
                raise UnknownCursor(starting_after)
            query = query.where(
                tuple_(PaymentRow.created_at, PaymentRow.id) < tuple_(cursor[0], cursor[1])
            )
        rows = (
            await self._session.scalars(
                query.order_by(PaymentRow.created_at.desc(), PaymentRow.id.desc()).limit(limit + 1)
            )
        ).all()
        page = rows[:limit]
        refunds = await RefundRepository(self._session).for_payments([row.id for row in page])
        return PaymentPage(
            [payment_to_domain(row, refunds.get(row.id, [])) for row in page],
            has_more=len(rows) > limit,
        )

    async def entries_balance(self, payment_id: str) -> tuple[int, int]:
        """(number of entries, their sum) for one payment."""
        result = await self._session.execute(
            select(
                func.count(LedgerEntry.id), func.coalesce(func.sum(LedgerEntry.amount), 0)
            ).where(LedgerEntry.payment_id == payment_id)
        )
        count, total = result.one()
        return int(count), int(total)


class ClientRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self,
        *,
        client_id: str,
        name: str,
        webhook_url: str | None,
        webhook_secret: str,
    ) -> None:
        self._session.add(
            ApiClient(
                id=client_id, name=name, webhook_url=webhook_url, webhook_secret=webhook_secret
            )
        )
        await self._session.flush()

    async def add_key(
        self, *, key_id: str, client_id: str, key_hash: str, display_prefix: str
    ) -> None:
        self._session.add(
            ApiKey(id=key_id, client_id=client_id, key_hash=key_hash, display_prefix=display_prefix)
        )
        await self._session.flush()

    async def exists(self, client_id: str) -> bool:
        return (await self._session.get(ApiClient, client_id)) is not None

    async def identity_for_key_hash(self, key_hash: str) -> ClientIdentity | None:
        row = (
            await self._session.execute(
                select(ApiClient.id, ApiClient.name)
                .join(ApiKey, ApiKey.client_id == ApiClient.id)
                .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
            )
        ).first()
        return None if row is None else ClientIdentity(client_id=row[0], name=row[1])

    async def key_for_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash, revoked or not, with its client's name."""
        row = (
            await self._session.execute(
                select(ApiKey, ApiClient.name)
                .join(ApiClient, ApiKey.client_id == ApiClient.id)
                .where(ApiKey.key_hash == key_hash)
            )
        ).first()
        return None if row is None else key_record(row[0], row[1])

    async def active_keys(self, limit: int) -> list[ApiKeyRecord]:
        """Keys not revoked, with their clients' names: the newest ``limit`` of them."""
        rows = (
            await self._session.execute(
                select(ApiKey, ApiClient.name)
                .join(ApiClient, ApiKey.client_id == ApiClient.id)
                .where(ApiKey.revoked_at.is_(None))
                .order_by(ApiKey.created_at.desc(), ApiKey.id)
                .limit(limit)
            )
        ).all()
        return [key_record(key, name) for key, name in rows]

    async def list_keys(self, client_id: str) -> list[ApiKeyRecord]:
        rows = (
            await self._session.execute(
                select(ApiKey, ApiClient.name)
                .join(ApiClient, ApiKey.client_id == ApiClient.id)
                .where(ApiKey.client_id == client_id)
                .order_by(ApiKey.created_at, ApiKey.id)
            )
        ).all()
        return [key_record(key, name) for key, name in rows]

    async def revoke_key(self, key_id: str) -> ApiKeyRecord | None:
        """Mark the key revoked (once: a second call keeps the first time). None if unknown."""
        await self._session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
        row = (
            await self._session.execute(
                select(ApiKey, ApiClient.name)
                .join(ApiClient, ApiKey.client_id == ApiClient.id)
                .where(ApiKey.id == key_id)
                .execution_options(populate_existing=True)
            )
        ).first()
        return None if row is None else key_record(row[0], row[1])

    async def webhook_target(self, client_id: str) -> WebhookTarget | None:
        client = await self._session.get(ApiClient, client_id)
        if client is None:
            return None
        previous = await self._session.scalars(
            select(PreviousWebhookSecret.secret)
            .where(
                PreviousWebhookSecret.client_id == client_id,
                PreviousWebhookSecret.expires_at > func.now(),
            )
            .order_by(PreviousWebhookSecret.retired_at.desc(), PreviousWebhookSecret.id.desc())
        )
        return WebhookTarget(
            url=client.webhook_url, secret=client.webhook_secret, previous_secrets=tuple(previous)
        )

    async def set_webhook_url(self, client_id: str, webhook_url: str | None) -> bool:
        """Point the client's webhooks at a (checked) URL, or at none; False if no such client."""
        updated = await self._session.scalar(
            update(ApiClient)
            .where(ApiClient.id == client_id)
            .values(webhook_url=webhook_url)
            .returning(ApiClient.id)
        )
        return updated is not None

    async def rotate_webhook_secret(
        self, client_id: str, new_secret: str, *, overlap: timedelta
    ) -> datetime:
        """Make ``new_secret`` current; the replaced one keeps signing for ``overlap``.

        Returns when the replaced secret stops being valid. The client row is locked,
        so two rotations at once serialise and neither secret is lost.
        """
        current = await self._session.scalar(
            select(ApiClient.webhook_secret).where(ApiClient.id == client_id).with_for_update()
        )
        if current is None:
            raise LookupError(f"client {client_id} does not exist")
        await self._session.execute(
            delete(PreviousWebhookSecret).where(
                PreviousWebhookSecret.client_id == client_id,
                PreviousWebhookSecret.expires_at <= func.now(),
            )
        )
        valid_until: datetime | None = await self._session.scalar(select(func.now() + overlap))
        if valid_until is None:  # pragma: no cover - SELECT now() + interval always answers
            raise RuntimeError("the database did not tell the time")
        if overlap > timedelta(0):
            self._session.add(
                PreviousWebhookSecret(client_id=client_id, secret=current, expires_at=valid_until)
            )
        await self._session.execute(
            update(ApiClient).where(ApiClient.id == client_id).values(webhook_secret=new_secret)
        )
        await self._session.flush()
        return valid_until


@dataclass(frozen=True)
class StoredRefund:
    refund: Refund
    request_fingerprint: str
    client_id: str


class RefundRepository:
    """Refunds: reserved under the payment's row lock, so none can take more than is left."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def for_payment(self, payment_id: str) -> list[Refund]:
        rows = await self._session.scalars(
            select(RefundRow)
            .where(RefundRow.payment_id == payment_id)
            .order_by(RefundRow.created_at, RefundRow.id)
        )
        return [refund_to_domain(row) for row in rows]

    async def for_payments(self, payment_ids: list[str]) -> dict[str, list[Refund]]:
        """The refunds of several payments in one query (a listing page)."""
        if not payment_ids:
            return {}
        rows = await self._session.scalars(
            select(RefundRow)
            .where(RefundRow.payment_id.in_(payment_ids))
            .order_by(RefundRow.created_at, RefundRow.id)
        )
        found: dict[str, list[Refund]] = {}
        for row in rows:
            found.setdefault(row.payment_id, []).append(refund_to_domain(row))
        return found

    async def get(self, client_id: str, payment_id: str, refund_id: str) -> Refund | None:
        row = await self._session.scalar(
            select(RefundRow).where(
                RefundRow.id == refund_id,
                RefundRow.payment_id == payment_id,
                RefundRow.client_id == client_id,
            )
        )
        return None if row is None else refund_to_domain(row)

    async def get_by_key(self, client_id: str, idempotency_key: str) -> StoredRefund | None:
        row = await self._session.scalar(
            select(RefundRow).where(
                RefundRow.client_id == client_id, RefundRow.idempotency_key == idempotency_key
            )
        )
        if row is None:
            return None
        return StoredRefund(refund_to_domain(row), row.request_fingerprint, row.client_id)

    async def reserve(self, refund: RefundInput) -> Reservation:
        """Reserve the refund as ``pending``, or say why not; idempotent per (client, key).

        The payment's row lock serialises every reservation and outcome of one payment:
        what is left is computed and taken in the same transaction.
        """
        request = refund.request
        payment = await self._session.scalar(
            select(PaymentRow)
            .where(PaymentRow.id == request.payment_id, PaymentRow.client_id == refund.client_id)
            .with_for_update()
        )
        if payment is None:
            return Reservation(refund=None, refusal=RefundRefusal.PAYMENT_NOT_FOUND)
        existing = await self._replay(refund)
        if existing is not None:
            return Reservation(
                refund=existing.refund if existing.refusal is None else None,
                refusal=existing.refusal,
                provider_charge_id=payment.provider_charge_id,
            )
        if payment.status != PaymentStatus.SUCCEEDED.value:
            return Reservation(
                refund=None,
                refusal=RefundRefusal.PAYMENT_NOT_REFUNDABLE,
                payment_status=payment.status,
                amount_refundable=0,
            )
        held = await self._session.scalar(
            select(func.coalesce(func.sum(RefundRow.amount), 0)).where(
                RefundRow.payment_id == payment.id,
                RefundRow.status != RefundStatus.FAILED.value,
            )
        )
        remaining = payment.amount - int(held or 0)
        amount = remaining if request.amount is None else request.amount
        if amount <= 0 or amount > remaining:
            return Reservation(
                refund=None,
                refusal=RefundRefusal.AMOUNT_EXCEEDS_REFUNDABLE,
                payment_status=payment.status,
                amount_refundable=remaining,
            )
        inserted = await self._session.scalar(
            insert(RefundRow)
            .values(
                id=refund.refund_id,
                payment_id=payment.id,
                client_id=refund.client_id,
                idempotency_key=refund.idempotency_key,
                request_fingerprint=refund.request_fingerprint,
                amount=amount,
                currency=payment.currency,
                reason=request.reason,
                status=RefundStatus.PENDING.value,
                workflow_id=refund_workflow_id(refund.client_id, refund.idempotency_key),
            )
            # Any conflict: the id is derived from (client, key), so the same key raced
            # for two payments (each under its own row lock) can meet on the primary key.
            .on_conflict_do_nothing()
            .returning(RefundRow.id)
        )
        if inserted is None:
            # The same key, committed meanwhile for another payment: a replay or a reuse.
            raced = await self._replay(refund)
            if raced is None:  # pragma: no cover - the conflicting row exists
                raise RuntimeError("refund row vanished after a key conflict")
            return Reservation(
                refund=raced.refund if raced.refusal is None else None,
                refusal=raced.refusal,
                provider_charge_id=payment.provider_charge_id,
            )
        await self._bump_version(payment.id)
        stored = await self.get_by_key(refund.client_id, refund.idempotency_key)
        assert stored is not None
        return Reservation(
            refund=stored.refund,
            created=True,
            payment_status=payment.status,
            amount_refundable=remaining - amount,
            provider_charge_id=payment.provider_charge_id,
        )

    async def _replay(self, refund: RefundInput) -> _Replay | None:
        stored = await self.get_by_key(refund.client_id, refund.idempotency_key)
        if stored is None:
            return None
        if stored.request_fingerprint != refund.request_fingerprint:
            return _Replay(stored.refund, RefundRefusal.IDEMPOTENCY_KEY_REUSED)
        return _Replay(stored.refund, None)

    async def record_outcome(self, outcome: RecordRefundInput) -> Refund:
        """Move a pending refund to its outcome and post its entries, exactly once.

        A failed refund releases its reservation: it no longer counts against the payment.
        """
        refund_row = await self._session.get(RefundRow, outcome.refund_id)
        if refund_row is None:
            raise LookupError(f"refund {outcome.refund_id} does not exist")
        # Same lock order as reserve(): the payment first, then its refund.
        await self._session.execute(
            select(PaymentRow.id).where(PaymentRow.id == refund_row.payment_id).with_for_update()
        )
        await self._session.refresh(refund_row)
        if refund_row.status != RefundStatus.PENDING.value:
            return refund_to_domain(refund_row)
        await self._session.execute(
            update(RefundRow)
            .where(RefundRow.id == refund_row.id)
            .values(
                status=outcome.status.value,
                provider_refund_id=outcome.provider_refund_id,
                failure_code=outcome.failure_code,
                failure_message=outcome.failure_message,
                updated_at=func.now(),
            )
        )
        if outcome.status is RefundStatus.SUCCEEDED:
            kind = refund_entry_kind(refund_row.id)
            payment_client = await self._session.scalar(
                select(PaymentRow.client_id).where(PaymentRow.id == refund_row.payment_id)
            )
            # The reverse of the charge's entries, for the refunded amount.
            await self._session.execute(
                insert(LedgerEntry).values(
                    [
                        {
                            "payment_id": refund_row.payment_id,
                            "entry_kind": kind,
                            "account": PROVIDER_RECEIVABLE_ACCOUNT,
                            "amount": -refund_row.amount,
                            "currency": refund_row.currency,
                        },
                        {
                            "payment_id": refund_row.payment_id,
                            "entry_kind": kind,
                            "account": client_payable_account(str(payment_client)),
                            "amount": refund_row.amount,
                            "currency": refund_row.currency,
                        },
                    ]
                )
            )
        await self._bump_version(refund_row.payment_id)
        await self._session.refresh(refund_row)
        return refund_to_domain(refund_row)

    async def _bump_version(self, payment_id: str) -> None:
        await self._session.execute(
            update(PaymentRow)
            .where(PaymentRow.id == payment_id)
            .values(version=PaymentRow.version + 1, updated_at=func.now())
        )


@dataclass(frozen=True)
class _Replay:
    refund: Refund
    refusal: RefundRefusal | None
