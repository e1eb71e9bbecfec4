"""Reconciliation as a pure function: three snapshots in, findings out.

The provider's idempotency key for a charge is the payment's id, so a charge and
a ledger payment meet on that key. Nothing here does I/O, so each kind of
discrepancy can be planted in a test and seen reported.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

PROVIDER_RECEIVABLE_ACCOUNT = "provider:receivable"
CHARGE_ENTRY_KIND = "charge"


class FindingKind(StrEnum):
    DOUBLE_CHARGE = "double_charge"
    CHARGE_WITHOUT_LEDGER = "charge_without_ledger"
    LEDGER_WITHOUT_CHARGE = "ledger_without_charge"
    UNBALANCED = "unbalanced_entries"
    REFUND_OVER_CAPTURED = "refund_over_captured"
    STUCK = "stuck_payment"


TITLES: dict[FindingKind, str] = {
    FindingKind.DOUBLE_CHARGE: "double charges",
    FindingKind.CHARGE_WITHOUT_LEDGER: "charges with no ledger record",
    FindingKind.LEDGER_WITHOUT_CHARGE: "ledger records with no charge",
    FindingKind.UNBALANCED: "unbalanced entries",
    FindingKind.REFUND_OVER_CAPTURED: "refunds over captured",
    FindingKind.STUCK: "payments stuck non-terminal",
}


@dataclass(frozen=True)
class ProviderCharge:
    id: str
    idempotency_key: str
    amount: int
    currency: str
    status: str  # succeeded | failed


@dataclass(frozen=True)
class ProviderRefund:
    id: str
    charge_id: str
    amount: int


@dataclass(frozen=True)
class LedgerPayment:
    id: str
    workflow_id: str
    status: str  # processing | succeeded | failed
    amount: int
    currency: str
    provider_charge_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class LedgerEntry:
    payment_id: str
    kind: str
    account: str
    amount: int


@dataclass
class Snapshot:
    charges: list[ProviderCharge] = field(default_factory=list)
    refunds: list[ProviderRefund] = field(default_factory=list)
    payments: list[LedgerPayment] = field(default_factory=list)
    entries: list[LedgerEntry] = field(default_factory=list)
    # Execution status (RUNNING, COMPLETED, ...) of the workflows of non-terminal
    # payments, by workflow id, read by describe (strongly consistent); None: not found.
    open_payment_workflows: dict[str, str | None] = field(default_factory=dict)
    # Workflow counts by status from visibility: summary only, may lag by seconds.
    workflow_counts: dict[str, int] | None = None
    taken_at: datetime | None = None


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    subject: str  # payment id, charge id or idempotency key
    detail: str


def reconcile(snapshot: Snapshot, *, now: datetime, stuck_after: timedelta) -> list[Finding]:
    findings: list[Finding] = []
    payments = {p.id: p for p in snapshot.payments}
    charges_by_key: dict[str, list[ProviderCharge]] = defaultdict(list)
    for charge in snapshot.charges:
        charges_by_key[charge.idempotency_key].append(charge)
    charges_by_id = {c.id: c for c in snapshot.charges}

    def stuck(payment: LedgerPayment) -> str | None:
        if payment.status != "processing":
            return None
        workflow = snapshot.open_payment_workflows.get(payment.workflow_id, "RUNNING")
        if workflow != "RUNNING":
            return f"processing in the ledger, workflow {workflow or 'not found'}"
        age = now - payment.created_at
        if age > stuck_after:
            limit = stuck_after.total_seconds()
            return f"processing for {age.total_seconds():.0f} s (threshold {limit:.0f} s)"
        return None

    # Provider side: every money movement is accounted for once.
    for key, key_charges in charges_by_key.items():
        succeeded = [c for c in key_charges if c.status == "succeeded"]
        if len(succeeded) > 1:
            ids = ", ".join(c.id for c in succeeded)
            findings.append(
                Finding(FindingKind.DOUBLE_CHARGE, key, f"{len(succeeded)} charges: {ids}")
            )
        payment = payments.get(key)
        for charge in succeeded:
            if payment is None:
                findings.append(
                    Finding(
                        FindingKind.CHARGE_WITHOUT_LEDGER,
                        charge.id,
                        f"{charge.amount} {charge.currency} under key {key}: no ledger payment",
                    )
                )
            elif payment.status == "failed" or (
                payment.status == "processing" and stuck(payment) is not None
            ):
                findings.append(
                    Finding(
                        FindingKind.CHARGE_WITHOUT_LEDGER,
                        charge.id,
                        f"{charge.amount} {charge.currency}: payment {payment.id} is "
                        f"{payment.status} in the ledger",
                    )
                )
            elif payment.status == "succeeded" and payment.provider_charge_id != charge.id:
                # The ledger names another charge: if that one is real, the payment was
                # charged twice; if not, this charge is the one the ledger failed to record.
                recorded = charges_by_id.get(payment.provider_charge_id or "")
                if recorded is not None and recorded.status == "succeeded":
                    findings.append(
                        Finding(
                            FindingKind.DOUBLE_CHARGE,
                            payment.id,
                            f"ledger records charge {recorded.id} (key "
                            f"{recorded.idempotency_key}), the provider also charged "
                            f"{charge.id} under the payment's key",
                        )
                    )
                else:
                    findings.append(
                        Finding(
                            FindingKind.CHARGE_WITHOUT_LEDGER,
                            charge.id,
                            f"{charge.amount} {charge.currency}: payment {payment.id} records "
                            f"charge {payment.provider_charge_id} instead",
                        )
                    )

    refunded: dict[str, int] = defaultdict(int)
    for refund in snapshot.refunds:
        refunded[refund.charge_id] += refund.amount
    for charge_id, amount in refunded.items():
        refunded_charge = charges_by_id.get(charge_id)
        captured = (
            refunded_charge.amount
            if refunded_charge is not None and refunded_charge.status == "succeeded"
            else 0
        )
        if amount > captured:
            findings.append(
                Finding(
                    FindingKind.REFUND_OVER_CAPTURED,
                    charge_id,
                    f"provider refunded {amount} of {captured} captured",
                )
            )

    # Ledger side.
    entries_by_payment: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in snapshot.entries:
        entries_by_payment[entry.payment_id].append(entry)
    for payment in snapshot.payments:
        entries = entries_by_payment.get(payment.id, [])
        total = sum(e.amount for e in entries)
        if total != 0:
            findings.append(
                Finding(FindingKind.UNBALANCED, payment.id, f"entries sum to {total}, not 0")
            )
        captured = sum(
            e.amount
            for e in entries
            if e.kind == CHARGE_ENTRY_KIND and e.account == PROVIDER_RECEIVABLE_ACCOUNT
        )
        expected = payment.amount if payment.status == "succeeded" else 0
        if captured != expected:
            findings.append(
                Finding(
                    FindingKind.UNBALANCED,
                    payment.id,
                    f"{payment.status} payment of {payment.amount} has {captured} captured "
                    f"in the ledger, expected {expected}",
                )
            )
        # Refunds post against the receivable with their own entry kinds.
        ledger_refunded = -sum(
            e.amount
            for e in entries
            if e.kind != CHARGE_ENTRY_KIND and e.account == PROVIDER_RECEIVABLE_ACCOUNT
        )
        if ledger_refunded > captured:
            findings.append(
                Finding(
                    FindingKind.REFUND_OVER_CAPTURED,
                    payment.id,
                    f"ledger refunded {ledger_refunded} of {captured} captured",
                )
            )
        if payment.status == "succeeded":
            recorded = charges_by_id.get(payment.provider_charge_id or "")
            if recorded is None or recorded.status != "succeeded":
                findings.append(
                    Finding(
                        FindingKind.LEDGER_WITHOUT_CHARGE,
                        payment.id,
                        f"succeeded with charge {payment.provider_charge_id}, which the "
                        "provider does not have as succeeded",
                    )
                )
        if (reason := stuck(payment)) is not None:
            findings.append(Finding(FindingKind.STUCK, payment.id, reason))
    return findings
