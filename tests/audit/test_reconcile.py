"""Each kind of discrepancy, planted in otherwise healthy snapshots, is reported; a healthy
snapshot reports nothing. Without these the audit could pass every fault test by never
finding anything."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from audit.reconcile import (
    PROVIDER_RECEIVABLE_ACCOUNT,
    FindingKind,
    LedgerEntry,
    LedgerPayment,
    ProviderCharge,
    ProviderRefund,
    Snapshot,
    reconcile,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
STUCK_AFTER = timedelta(minutes=10)


def _payment(
    n: int, status: str = "succeeded", *, charge: str | None = None, age_s: float = 60
) -> LedgerPayment:
    return LedgerPayment(
        id=f"pay_{n}",
        workflow_id=f"payment/c/{n}",
        status=status,
        amount=1000,
        currency="EUR",
        provider_charge_id=charge if charge is not None else
        (f"ch_{n}" if status == "succeeded" else None),
        created_at=NOW - timedelta(seconds=age_s),
    )  # fmt: skip


def _charge(n: int, *, key: str | None = None, status: str = "succeeded") -> ProviderCharge:
    return ProviderCharge(f"ch_{n}", key or f"pay_{n}", 1000, "EUR", status)


def _entries(payment_id: str, amount: int = 1000, kind: str = "charge") -> list[LedgerEntry]:
    sign = 1 if kind == "charge" else -1
    return [
        LedgerEntry(payment_id, kind, PROVIDER_RECEIVABLE_ACCOUNT, sign * amount),
        LedgerEntry(payment_id, kind, "client:c:payable", -sign * amount),
    ]


def _healthy() -> Snapshot:
    """A succeeded payment, a declined one, one in flight, one partly refunded."""
    return Snapshot(
        charges=[_charge(1), _charge(2, status="failed"), _charge(4)],
        refunds=[ProviderRefund("re_4", "ch_4", 400)],
        payments=[
            _payment(1),
            _payment(2, "failed"),
            _payment(3, "processing", age_s=5),
            _payment(4),
        ],
        entries=[*_entries("pay_1"), *_entries("pay_4"), *_entries("pay_4", 400, "refund")],
        open_payment_workflows={"payment/c/3": "RUNNING"},
    )


def _kinds(snapshot: Snapshot) -> list[FindingKind]:
    return [f.kind for f in reconcile(snapshot, now=NOW, stuck_after=STUCK_AFTER)]


def test_a_healthy_snapshot_is_clean() -> None:
    assert _kinds(_healthy()) == []


def test_an_in_flight_payment_already_charged_is_not_a_problem_yet() -> None:
    snapshot = _healthy()
    snapshot.charges.append(_charge(3))
    assert _kinds(snapshot) == []


def test_two_charges_under_one_key_are_a_double_charge() -> None:
    snapshot = _healthy()
    snapshot.charges.append(ProviderCharge("ch_1b", "pay_1", 1000, "EUR", "succeeded"))
    assert FindingKind.DOUBLE_CHARGE in _kinds(snapshot)


def test_a_ledger_naming_another_real_charge_is_a_double_charge() -> None:
    snapshot = _healthy()
    # The ledger records ch_9 (made under another key) while ch_1 sits under the payment's key.
    snapshot.charges.append(_charge(9, key="pay_1-retry"))
    snapshot.payments[0] = _payment(1, charge="ch_9")
    assert FindingKind.DOUBLE_CHARGE in _kinds(snapshot)


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda s: s.charges.append(_charge(7)), id="no-ledger-payment"),
        pytest.param(lambda s: s.charges.append(_charge(2, key="pay_2")), id="payment-failed"),
    ],
)
def test_a_charge_the_ledger_does_not_record_is_reported(
    plant: Callable[[Snapshot], None],
) -> None:
    snapshot = _healthy()
    plant(snapshot)
    assert FindingKind.CHARGE_WITHOUT_LEDGER in _kinds(snapshot)


def test_a_succeeded_payment_without_its_charge_is_reported() -> None:
    snapshot = _healthy()
    snapshot.charges = [c for c in snapshot.charges if c.id != "ch_1"]
    assert _kinds(snapshot) == [FindingKind.LEDGER_WITHOUT_CHARGE]


def test_entries_that_do_not_sum_to_zero_are_reported() -> None:
    snapshot = _healthy()
    snapshot.entries.pop(0)
    assert FindingKind.UNBALANCED in _kinds(snapshot)


def test_a_succeeded_payment_with_no_entries_is_reported() -> None:
    snapshot = _healthy()
    snapshot.entries = [e for e in snapshot.entries if e.payment_id != "pay_1"]
    assert _kinds(snapshot) == [FindingKind.UNBALANCED]


def test_refunds_over_the_captured_amount_are_reported_on_either_side() -> None:
    provider = _healthy()
    provider.refunds.append(ProviderRefund("re_4b", "ch_4", 700))
    assert _kinds(provider) == [FindingKind.REFUND_OVER_CAPTURED]

    ledger = _healthy()
    ledger.entries += _entries("pay_4", 700, "refund")
    assert _kinds(ledger) == [FindingKind.REFUND_OVER_CAPTURED]


def test_a_payment_processing_past_the_threshold_is_stuck() -> None:
    snapshot = _healthy()
    snapshot.payments[2] = _payment(3, "processing", age_s=3600)
    assert _kinds(snapshot) == [FindingKind.STUCK]


def test_a_processing_payment_whose_workflow_closed_or_vanished_is_stuck_at_once() -> None:
    for status in ("FAILED", "TERMINATED", None):
        snapshot = _healthy()
        snapshot.open_payment_workflows["payment/c/3"] = status
        assert _kinds(snapshot) == [FindingKind.STUCK], status
