"""Request and response bodies. Requests forbid unknown fields: a client cannot
set ``status`` or ``client_id``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from domain.payments import Payment, PaymentRequest
from domain.refunds import Refund, RefundRequest

MAX_AMOUNT = 99_999_999  # minor units; larger payments go through a human
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=40)]
MetadataValue = Annotated[str, StringConstraints(max_length=500)]


class PaymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    amount: int = Field(gt=0, le=MAX_AMOUNT, strict=True, description="Minor units (cents).")
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$")] = Field(
        description="ISO 4217 code, e.g. EUR."
    )
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=255)] = Field(
        description="A payment-method token, e.g. pm_card_visa."
    )
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=20)

    def to_domain(self) -> PaymentRequest:
        return PaymentRequest(
            amount=self.amount,
            currency=self.currency.upper(),
            payment_method=self.payment_method,
            description=self.description,
            metadata=dict(self.metadata),
        )


class RefundOut(BaseModel):
    id: str
    object: Literal["refund"] = "refund"
    payment_id: str
    status: Literal["pending", "succeeded", "failed"]
    amount: int
    currency: str
    reason: str | None
    failure_code: str | None
    failure_message: str | None
    provider_refund_id: str | None
    idempotency_key: str
    created_at: str | None
    updated_at: str | None

    @classmethod
    def from_domain(cls, refund: Refund) -> RefundOut:
        return cls.model_validate(refund.public_dict())


class PaymentOut(BaseModel):
    id: str
    object: Literal["payment"] = "payment"
    status: Literal["processing", "succeeded", "failed"]
    amount: int
    currency: str
    description: str | None
    metadata: dict[str, str]
    failure_code: str | None
    failure_message: str | None
    provider_charge_id: str | None
    idempotency_key: str
    created_at: str | None
    updated_at: str | None
    amount_refunded: int = Field(0, description="Sum of succeeded refunds.")
    amount_refundable: int = Field(
        0, description="What a new refund may still take (pending refunds hold their amount)."
    )
    refunds: list[RefundOut] = Field(default_factory=list)

    @classmethod
    def from_domain(cls, payment: Payment) -> PaymentOut:
        return cls.model_validate(payment.public_dict())


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int | None = Field(
        None,
        gt=0,
        le=MAX_AMOUNT,
        strict=True,
        description="Minor units; leave out to refund what remains.",
    )
    reason: Literal["duplicate", "fraudulent", "requested_by_customer"] | None = None

    def to_domain(self, payment_id: str) -> RefundRequest:
        return RefundRequest(payment_id=payment_id, amount=self.amount, reason=self.reason)
