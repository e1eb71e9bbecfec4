"""Reconcile the provider, the ledger and Temporal; ``python -m audit`` or ``make audit``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from audit.reconcile import TITLES, Finding, FindingKind, Snapshot, reconcile
from audit.sources import Sources, read_snapshot

__all__ = ["AuditReport", "Finding", "FindingKind", "Sources", "run_audit"]

DEFAULT_STUCK_AFTER = timedelta(minutes=10)
_DETAIL_LINES = 50


@dataclass(frozen=True)
class AuditReport:
    snapshot: Snapshot
    findings: list[Finding]
    stuck_after: timedelta

    @property
    def clean(self) -> bool:
        return not self.findings

    def of_kind(self, kind: FindingKind) -> list[Finding]:
        return [f for f in self.findings if f.kind is kind]

    def render(self) -> str:
        s = self.snapshot
        charges = Counter(c.status for c in s.charges)
        payments = Counter(p.status for p in s.payments)
        rows: list[tuple[str, str, str]] = [
            ("provider", "charges succeeded", str(charges["succeeded"])),
            ("provider", "charges failed", str(charges["failed"])),
            ("provider", "charged (minor units)", str(sum(c.amount for c in s.charges
                                                          if c.status == "succeeded"))),
            ("provider", "refunds", str(len(s.refunds))),
            ("ledger", "payments succeeded", str(payments["succeeded"])),
            ("ledger", "payments failed", str(payments["failed"])),
            ("ledger", "payments processing", str(payments["processing"])),
            ("ledger", "entries (sum)", f"{len(s.entries)} ({sum(e.amount for e in s.entries)})"),
        ]  # fmt: skip
        if s.workflow_counts is None:
            rows.append(("temporal", "workflows", "not checked"))
        else:
            for status, count in sorted(s.workflow_counts.items()):
                rows.append(("temporal", f"workflows {status.lower()} (visibility)", str(count)))
        lines = ["Sources", *_table(("source", "figure", "value"), rows), ""]
        lines += ["Checks"]
        lines += _table(
            ("check", "problems", ""),
            [(TITLES[kind], str(len(self.of_kind(kind))), "") for kind in FindingKind],
        )
        if self.findings:
            lines += ["", "Problems"]
            lines += [f"  {f.kind}  {f.subject}  {f.detail}" for f in self.findings[:_DETAIL_LINES]]
            if len(self.findings) > _DETAIL_LINES:
                lines.append(f"  ... and {len(self.findings) - _DETAIL_LINES} more")
        lines += [
            "",
            f"Stuck means non-terminal for over {self.stuck_after.total_seconds():.0f} s, or "
            "processing while its workflow is closed. Workflow counts come from Temporal's "
            "visibility store and may lag by a few seconds; stuck payments are checked by "
            "describing each workflow, which does not lag.",
            "AUDIT CLEAN" if self.clean else f"AUDIT FAILED: {len(self.findings)} problem(s)",
        ]
        return "\n".join(lines)


def _table(header: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    fmt = "  {:<%d}  {:<%d}  {:>%d}" % tuple(widths)  # noqa: UP031 - widths computed above
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


async def run_audit(
    sources: Sources, *, stuck_after: timedelta = DEFAULT_STUCK_AFTER
) -> AuditReport:
    """Read the three sources and reconcile them; the fault tests call this at their end."""
    snapshot = await read_snapshot(sources)
    findings = reconcile(snapshot, now=datetime.now(UTC), stuck_after=stuck_after)
    return AuditReport(snapshot, findings, stuck_after)
