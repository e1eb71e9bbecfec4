"""Refund shapes shared by the API, the refund workflow and the activities.

Sandbox-safe: no I/O, no settings. Fields added later get defaults so older
histories still decode.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class RefundStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self is not RefundStatus.PENDING


class RefundReason(StrEnum):
    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    REQUESTED_BY_CUSTOMER = "requested_by_customer"


class RefundRefusal(StrEnum):
    """Why a refund was not reserved; each is one problem type in the API."""

    PAYMENT_NOT_FOUND = "payment_not_found"
    PAYMENT_NOT_REFUNDABLE = "payment_not_refundable"
    AMOUNT_EXCEEDS_REFUNDABLE = "amount_exceeds_refundable"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"


# ApplicationError types of the refund path, stable in histories.
REFUND_REFUSED_ERROR = "RefundRefused"
REFUND_REJECTED_BY_PROVIDER_ERROR = "RefundRejectedByProvider"


@dataclass(frozen=True)
class RefundRequest:
    """What the client asked for; its fingerprint decides whether a key is reused.

    ``amount`` stays ``None`` when the client asked for "what remains": the
    fingerprint is of the request, not of the amount it resolved to.
    """

    payment_id: str
    amount: int | None = None
    reason: str | None = None

    def fingerprint(self) -> str:
        canonical = json.dumps(
            {"payment_id": self.payment_id, "amount": self.amount, "reason": self.reason},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def refund_id_for(client_id: str, idempotency_key: str) -> str:
    """Deterministic, like payment ids; also the provider's idempotency key."""
    digest = hashlib.sha256(f"refund\0{client_id}\0{idempotency_key}".encode()).digest()
    return "ref_" + base64.b32encode(digest[:15]).decode().lower()


def refund_workflow_id(client_id: str, idempotency_key: str) -> str:
    return f"refund/{client_id}/{idempotency_key}"


def refund_entry_kind(refund_id: str) -> str:
    """Ledger entry kind of one refund: unique per refund, so a replay cannot post twice."""
    return f"refund:{refund_id}"


@dataclass(frozen=True)
class Refund:
    """A refund as the API shows it."""

    id: str
    payment_id: str
    idempotency_key: str
    status: RefundStatus
    amount: int
    currency: str
    reason: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    provider_refund_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None

    def public_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "refund",
            "payment_id": self.payment_id,
            "status": str(self.status),
            "amount": self.amount,
            "currency": self.currency,
            "reason": self.reason,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "provider_refund_id": self.provider_refund_id,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class RefundInput:
    """The refund workflow's input."""

    refund_id: str
    client_id: str
    idempotency_key: str
    request: RefundRequest
    request_fingerprint: str
    origin_request_id: str

    @classmethod
    def for_request(
        cls, client_id: str, idempotency_key: str, request: RefundRequest, origin_request_id: str
    ) -> RefundInput:
        """The run's input for a request: the refund id and the fingerprint are derived
        from the key and the body, so no caller can pass ones that do not match."""
        return cls(
            refund_id=refund_id_for(client_id, idempotency_key),
            client_id=client_id,
            idempotency_key=idempotency_key,
            request=request,
            request_fingerprint=request.fingerprint(),
            origin_request_id=origin_request_id,
        )


@dataclass(frozen=True)
class Reservation:
    """The outcome of reserving a refund: the refund, or why there is none."""

    refund: Refund | None
    # True only for the call that inserted the reservation; every other call is a replay.
    created: bool = False
    refusal: RefundRefusal | None = None
    payment_status: str | None = None
    amount_refundable: int | None = None
    provider_charge_id: str | None = None


@dataclass(frozen=True)
class RefundRefusalDetails:
    """``ApplicationError.details[0]`` of a refusal inside the workflow."""

    refusal: RefundRefusal
    payment_status: str | None = None
    amount_refundable: int | None = None


@dataclass(frozen=True)
class OpenRefundInput:
    refund: RefundInput


@dataclass(frozen=True)
class OpenRefundResult:
    refund: Refund
    provider_charge_id: str


@dataclass(frozen=True)
class ProviderRefundInput:
    refund_id: str
    provider_charge_id: str
    amount: int


@dataclass(frozen=True)
class ProviderRefundResult:
    provider_refund_id: str


@dataclass(frozen=True)
class RecordRefundInput:
    refund_id: str
    status: RefundStatus
    provider_refund_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None


@dataclass(frozen=True)
class RefundAttachRequest:
    request_id: str
    request_fingerprint: str


@dataclass(frozen=True)
class RefundAttachResult:
    refund: Refund
    replayed: bool
