"""The webhook event body: stable ids, the payment's version as sequence, the full payment."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from activities.webhook_events import build_event, event_id_for
from domain.payments import Payment, PaymentStatus
from domain.refunds import Refund, RefundStatus

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _payment(version: int, refunds: list[Refund]) -> Payment:
    return Payment(
        id="pay_abc",
        client_id="cli_1",
        idempotency_key="k",
        status=PaymentStatus.SUCCEEDED,
        amount=1000,
        currency="EUR",
        provider_charge_id="ch_1",
        refunds=refunds,
        version=version,
    )


def _refund(status: RefundStatus, amount: int, refund_id: str = "ref_1") -> Refund:
    return Refund(
        id=refund_id,
        payment_id="pay_abc",
        idempotency_key="rk",
        status=status,
        amount=amount,
        currency="EUR",
    )


def test_a_refund_event_carries_the_whole_payment_and_its_version() -> None:
    refunds = [_refund(RefundStatus.SUCCEEDED, 300), _refund(RefundStatus.PENDING, 200, "ref_2")]
    event = build_event(
        event_type="refund.succeeded",
        payment=_payment(5, refunds),
        created_at=NOW,
        refund_id="ref_1",
    )

    assert event["id"] == "evt_ref_1_refund_succeeded"
    assert event["sequence"] == 5
    assert event["refund_id"] == "ref_1"
    assert event["created_at"] == "2026-11-25T12:00:00Z"
    data = event["data"]
    assert data["id"] == "pay_abc"
    assert data["amount_refunded"] == 300, "only succeeded refunds are refunded"
    assert data["amount_refundable"] == 500, "a pending refund holds its amount"
    assert [r["id"] for r in data["refunds"]] == ["ref_1", "ref_2"]


def test_event_ids_are_stable_per_payment_event_and_per_refund() -> None:
    first = build_event(event_type="payment.succeeded", payment=_payment(2, []), created_at=NOW)
    retried = build_event(
        event_type="payment.succeeded",
        payment=_payment(4, [_refund(RefundStatus.SUCCEEDED, 100)]),
        created_at=NOW,
    )
    assert first["id"] == retried["id"] == "evt_abc_payment_succeeded"
    assert retried["sequence"] > first["sequence"]
    assert event_id_for("pay_abc", "refund.succeeded", "ref_1") != event_id_for(
        "pay_abc", "refund.succeeded", "ref_2"
    )
    assert "refund_id" not in first


def test_an_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        build_event(event_type="payment.refunded", payment=_payment(1, []), created_at=NOW)
