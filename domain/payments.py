"""Payment shapes shared by the API, the workflow and the activities.

Dataclasses, because Temporal's default converter stores them as plain JSON in
histories: a field added later needs a default so older histories still decode.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from domain.refunds import Refund, RefundStatus

TASK_QUEUE = "payments"


class PaymentStatus(StrEnum):
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self is not PaymentStatus.PROCESSING


class ErrorType(StrEnum):
    """``ApplicationError.type`` values: stable names that histories and the API rely on."""

    PAYMENT_DECLINED = "PaymentDeclined"
    INVALID_PAYMENT_REQUEST = "InvalidPaymentRequest"
    PROVIDER_UNAVAILABLE = "ProviderUnavailable"
    IDEMPOTENCY_KEY_REUSED = "IdempotencyKeyReused"
    WEBHOOK_DELIVERY_FAILED = "WebhookDeliveryFailed"
    CLIENT_NOT_FOUND = "ClientNotFound"


@dataclass(frozen=True)
class PaymentRequest:
    """What the client asked for; its fingerprint decides whether a key is reused."""

    amount: int
    currency: str
    payment_method: str
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        canonical = json.dumps(
            {
                "amount": self.amount,
                "currency": self.currency,
                "payment_method": self.payment_method,
                "description": self.description,
                "metadata": self.metadata,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _digest_id(prefix: str, *parts: str) -> str:
    # NUL cannot appear in a client id or an (ASCII-printable) key, so joined parts never collide.
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest[:15]).decode().lower()


def payment_id_for(client_id: str, idempotency_key: str) -> str:
    """Deterministic: every duplicate of a request names the same payment without a lookup."""
    return _digest_id("pay_", client_id, idempotency_key)


def payment_workflow_id(client_id: str, idempotency_key: str) -> str:
    """The client's key, scoped to the client, is the workflow ID support staff search for."""
    return f"payment/{client_id}/{idempotency_key}"


@dataclass(frozen=True)
class PaymentInput:
    """The workflow's input: everything needed to carry the payment to its end."""

    payment_id: str
    client_id: str
    idempotency_key: str
    request: PaymentRequest
    request_fingerprint: str
    # The request that started the run; later attaches with another id are replays.
    origin_request_id: str

    @classmethod
    def for_request(
        cls, client_id: str, idempotency_key: str, request: PaymentRequest, origin_request_id: str
    ) -> PaymentInput:
        """The run's input for a request: the payment id and the fingerprint are derived
        from the key and the body, so no caller can pass ones that do not match."""
        return cls(
            payment_id=payment_id_for(client_id, idempotency_key),
            client_id=client_id,
            idempotency_key=idempotency_key,
            request=request,
            request_fingerprint=request.fingerprint(),
            origin_request_id=origin_request_id,
        )


@dataclass(frozen=True)
class Payment:
    """A payment as the API shows it."""

    id: str
    client_id: str
    idempotency_key: str
    status: PaymentStatus
    amount: int
    currency: str
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    failure_code: str | None = None
    failure_message: str | None = None
    provider_charge_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    refunds: list[Refund] = field(default_factory=list)
    # Bumped with every recorded change (outcome, refund): a webhook's ``sequence``.
    version: int = 0

    @property
    def amount_refunded(self) -> int:
        return sum(r.amount for r in self.refunds if r.status is RefundStatus.SUCCEEDED)

    @property
    def amount_refundable(self) -> int:
        """What a new refund may still take: pending refunds hold their amount."""
        if self.status is not PaymentStatus.SUCCEEDED:
            return 0
        return self.amount - sum(
            r.amount for r in self.refunds if r.status is not RefundStatus.FAILED
        )

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "payment",
            "status": str(self.status),
            "amount": self.amount,
            "currency": self.currency,
            "description": self.description,
            "metadata": self.metadata,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "provider_charge_id": self.provider_charge_id,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "amount_refunded": self.amount_refunded,
            "amount_refundable": self.amount_refundable,
            "refunds": [refund.public_dict() for refund in self.refunds],
        }


@dataclass(frozen=True)
class AttachRequest:
    """Argument of the workflow's ``await_outcome`` update: who is asking, for what body."""

    request_id: str
    request_fingerprint: str


@dataclass(frozen=True)
class AttachResult:
    payment: Payment
    replayed: bool


# Activity inputs and results: one model each, so fields can be added with defaults.


@dataclass(frozen=True)
class OpenPaymentInput:
    payment: PaymentInput


@dataclass(frozen=True)
class ChargeInput:
    payment_id: str
    amount: int
    currency: str
    payment_method: str
    description: str | None = None


@dataclass(frozen=True)
class ChargeResult:
    charge_id: str
    status: str


@dataclass(frozen=True)
class FindChargeInput:
    payment_id: str


@dataclass(frozen=True)
class FindChargeResult:
    charge_id: str | None
    status: str | None = None
    failure_code: str | None = None


@dataclass(frozen=True)
class RecordOutcomeInput:
    payment_id: str
    status: PaymentStatus
    provider_charge_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None


@dataclass(frozen=True)
class NotifyInput:
    payment_id: str
    event_type: str
    # Set for refund events: names the refund in the event id and body.
    refund_id: str | None = None


@dataclass(frozen=True)
class DeclineDetails:
    """``ApplicationError.details[0]`` of a decline: what the payment reports to the client."""

    failure_code: str
    failure_message: str
