"""Read-only figures over the ledger for monitoring (the worker's gauges).

Kept apart from the repositories the payment path uses: nothing here is on a
request's path, and it only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.payments import PaymentStatus
from ledger.tables import PaymentRow


@dataclass(frozen=True)
class ProcessingSummary:
    count: int
    oldest_created_at: datetime | None


class LedgerStatsRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def processing_summary(self) -> ProcessingSummary:
        """How many payments are not terminal yet, and since when the oldest one waits."""
        row = (
            await self._session.execute(
                select(func.count(), func.min(PaymentRow.created_at)).where(
                    PaymentRow.status == PaymentStatus.PROCESSING.value
                )
            )
        ).one()
        return ProcessingSummary(count=int(row[0]), oldest_created_at=row[1])
