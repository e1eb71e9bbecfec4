"""Request and response bodies. Requests forbid unknown fields: a client cannot
set ``status`` or ``client_id``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from domain.currencies import is_active_currency
from domain.payments import Payment, PaymentRequest
from domain.refunds import Refund, RefundRequest

# Minor units. The ceiling of the schema; PAYMENTS_API_MAX_AMOUNT (default
# 99 999 999) is the bound each deployment enforces below it.
MAX_AMOUNT = 99_999_999_999
# PostgreSQL text cannot hold NUL: refused here, not discovered by the ledger later.
_NO_NUL = r"^[^\x00]*$"
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=_NO_NUL)]
MetadataValue = Annotated[str, StringConstraints(max_length=500, pattern=_NO_NUL)]


class PaymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    amount: int = Field(
        gt=0,
        le=MAX_AMOUNT,
        strict=True,
        description="Minor units (1250 = 12.50 EUR): an integer > 0, at most the "
        "deployment's bound (PAYMENTS_API_MAX_AMOUNT, default 99999999).",
    )
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$")] = Field(
        description="An active ISO 4217 code, e.g. EUR (case-insensitive)."
    )
    payment_method: Annotated[
        str, StringConstraints(min_length=1, max_length=255, pattern=_NO_NUL)
    ] = Field(description="A payment-method token, e.g. pm_card_visa.")
    description: Annotated[str, StringConstraints(max_length=1000, pattern=_NO_NUL)] | None = None
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict,
        max_length=20,
        description="Up to 20 string keys (1-40 characters) with string values "
        "(at most 500 characters).",
    )

    @field_validator("currency")
    @classmethod
    def _active_currency(cls, currency: str) -> str:
        if not is_active_currency(currency):
            raise ValueError(f"{currency!r} is not an active ISO 4217 currency")
        return currency

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


class PaymentList(BaseModel):
    """One page of payments, newest first (shaped like Stripe's lists)."""

    object: Literal["list"] = "list"
    url: str = "/v1/payments"
    data: list[PaymentOut]
    has_more: bool = Field(
        description="More payments follow: ask again with starting_after=<last id of data>."
    )


class FieldErrorOut(BaseModel):
    field: str = Field(description="The failing field, dotted (`metadata.color`), or a header.")
    message: str


class ProblemOut(BaseModel):
    """RFC 9457 problem details (`application/problem+json`)."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(description="A stable URI naming the error; switch on this.")
    title: str
    status: int = Field(description="The HTTP status code of the response.")
    detail: str
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[FieldErrorOut] | None = Field(
        default=None, description="Validation errors only: each failing field."
    )


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
