"""All SQL lives here. Repositories never commit: the caller owns the transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.payments import (
    Payment,
    PaymentInput,
    PaymentStatus,
    RecordOutcomeInput,
    payment_workflow_id,
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
from ledger.outcomes import OUTCOME_CHANNEL, row_opened_payload
from ledger.tables import (
    ApiClient,
    ApiKey,
    LedgerEntry,
    PaymentRow,
    PreviousWebhookSecret,
    RefundRow,
)

PROVIDER_RECEIVABLE_ACCOUNT = "provider:receivable"


def client_payable_account(client_id: str) -> str:
    return f"client:{client_id}:payable"


@dataclass(frozen=True)
class StoredPayment:
    payment: Payment
    request_fingerprint: str
    # The API request whose start created the run (None on rows older than the column).
    origin_request_id: str | None = None


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


@dataclass(frozen=True)
class WebhookTarget:
    url: str | None
    secret: str
    # Replaced secrets still inside their rotation overlap, newest first.
    previous_secrets: tuple[str, ...] = ()

    @property
    def signing_secrets(self) -> tuple[str, ...]:
        """Every secret a delivery is signed with: the current one first."""
        return (self.secret, *self.previous_secrets)


def isoformat_utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payment_to_domain(row: PaymentRow, refunds: list[Refund] | None = None) -> Payment:
    return Payment(
        id=row.id,
        client_id=row.client_id,
        idempotency_key=row.idempotency_key,
        status=PaymentStatus(row.status),
        amount=row.amount,
        currency=row.currency,
        description=row.description,
        metadata=dict(row.metadata_ or {}),
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        provider_charge_id=row.provider_charge_id,
        created_at=isoformat_utc(row.created_at),
        updated_at=isoformat_utc(row.updated_at),
        refunds=list(refunds or []),
        version=row.version,
    )


def refund_to_domain(row: RefundRow) -> Refund:
    return Refund(
        id=row.id,
        payment_id=row.payment_id,
        idempotency_key=row.idempotency_key,
        status=RefundStatus(row.status),
        amount=row.amount,
        currency=row.currency,
        reason=row.reason,
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        provider_refund_id=row.provider_refund_id,
        created_at=isoformat_utc(row.created_at),
        updated_at=isoformat_utc(row.updated_at),
    )


def _key_record(key: ApiKey, client_name: str) -> ApiKeyRecord:
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
        """Insert the payment as ``processing`` unless its (client, key) row exists already."""
        request = payment.request
        inserted = await self._session.execute(
            insert(PaymentRow)
            .values(
                id=payment.payment_id,
                client_id=payment.client_id,
                idempotency_key=payment.idempotency_key,
                request_fingerprint=payment.request_fingerprint,
                origin_request_id=payment.origin_request_id or None,
                amount=request.amount,
                currency=request.currency,
                payment_method=request.payment_method,
                description=request.description,
                metadata_=request.metadata,
                status=PaymentStatus.PROCESSING.value,
                workflow_id=payment_workflow_id(payment.client_id, payment.idempotency_key),
            )
            .on_conflict_do_nothing(constraint="uq_payments_client_key")
            .returning(PaymentRow.id)
        )
        if inserted.scalar_one_or_none() is not None:
            # Requests attached to the run wait for its row too (delivered at commit).
            notice = row_opened_payload(payment.payment_id)
            await self._session.execute(select(func.pg_notify(OUTCOME_CHANNEL, notice)))
        stored = await self.get_by_key(payment.client_id, payment.idempotency_key)
        if stored is None:  # pragma: no cover - the insert or the conflicting row guarantees one
            raise RuntimeError("payment row vanished after insert")
        return stored

    async def record_outcome(self, outcome: RecordOutcomeInput) -> Payment:
        """Move a processing payment to its outcome and post its entries, exactly once.

        The row lock serialises concurrent recorders; a second call finds the payment
        terminal and returns it unchanged.
        """
        row = await self._session.scalar(
            select(PaymentRow).where(PaymentRow.id == outcome.payment_id).with_for_update()
        )
        if row is None:
            raise LookupError(f"payment {outcome.payment_id} does not exist")
        if row.status != PaymentStatus.PROCESSING.value:
            return await self._with_refunds(row)

        # RETURNING brings the server's updated_at and version back into ``row``
        # (populate_existing), in the statement's own round trip.
        await self._session.execute(
            update(PaymentRow)
            .where(PaymentRow.id == row.id)
            .values(
                status=outcome.status.value,
                provider_charge_id=outcome.provider_charge_id,
                failure_code=outcome.failure_code,
                failure_message=outcome.failure_message,
                updated_at=func.now(),
                version=PaymentRow.version + 1,
            )
            .returning(PaymentRow)
            .execution_options(populate_existing=True)
        )
        # Delivered at commit only: wakes the API requests waiting on this payment.
        await self._session.execute(select(func.pg_notify(OUTCOME_CHANNEL, row.id)))
        if outcome.status is PaymentStatus.SUCCEEDED:
            await self._session.execute(
                insert(LedgerEntry).values(
                    [
                        {
                            "payment_id": row.id,
                            "entry_kind": "charge",
                            "account": PROVIDER_RECEIVABLE_ACCOUNT,
                            "amount": row.amount,
                            "currency": row.currency,
                        },
                        {
                            "payment_id": row.id,
                            "entry_kind": "charge",
                            "account": client_payable_account(row.client_id),
                            "amount": -row.amount,
                            "currency": row.currency,
                        },
                    ]
                )
            )
        # No refunds to read: a payment takes refunds only once succeeded, and this one
        # was processing until now, under its row lock.
        return payment_to_domain(row, [])

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
        return None if row is None else _key_record(row[0], row[1])

    async def list_keys(self, client_id: str) -> list[ApiKeyRecord]:
        rows = (
            await self._session.execute(
                select(ApiKey, ApiClient.name)
                .join(ApiClient, ApiKey.client_id == ApiClient.id)
                .where(ApiKey.client_id == client_id)
                .order_by(ApiKey.created_at, ApiKey.id)
            )
        ).all()
        return [_key_record(key, name) for key, name in rows]

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
        return None if row is None else _key_record(row[0], row[1])

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
            .on_conflict_do_nothing(constraint="uq_refunds_client_key")
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
