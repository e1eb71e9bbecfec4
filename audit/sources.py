"""Read the three sources of truth into one ``Snapshot``. Read-only everywhere.

Order matters: the ledger is read first and the provider last, so a payment that
completes while the audit runs shows up as a charge the ledger already has as
processing (young: not a finding) rather than as a ledger record without a charge.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from audit.reconcile import LedgerEntry, LedgerPayment, ProviderCharge, ProviderRefund, Snapshot
from config.settings import sqlalchemy_url
from ledger.tables import LedgerEntry as LedgerEntryRow
from ledger.tables import PaymentRow

_DESCRIBE_CONCURRENCY = 20


@dataclass(frozen=True)
class Sources:
    database_url: str
    provider_url: str
    provider_api_key: str
    temporal_address: str | None  # None: skip Temporal
    temporal_namespace: str = "default"


async def read_ledger(database_url: str, snapshot: Snapshot) -> None:
    # The audit's reads are its own: a plain SELECT of both tables, no repository state.
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            payments = await conn.execute(
                select(
                    PaymentRow.id,
                    PaymentRow.workflow_id,
                    PaymentRow.status,
                    PaymentRow.amount,
                    PaymentRow.currency,
                    PaymentRow.provider_charge_id,
                    PaymentRow.created_at,
                )
            )
            snapshot.payments = [LedgerPayment(*row) for row in payments]
            entries = await conn.execute(
                select(
                    LedgerEntryRow.payment_id,
                    LedgerEntryRow.entry_kind,
                    LedgerEntryRow.account,
                    LedgerEntryRow.amount,
                )
            )
            snapshot.entries = [LedgerEntry(*row) for row in entries]
    finally:
        await engine.dispose()


async def read_provider(provider_url: str, api_key: str, snapshot: Snapshot) -> None:
    async with httpx.AsyncClient(
        base_url=provider_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as http:
        response = await http.get("/sandbox/ledger")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
    snapshot.charges = [
        ProviderCharge(
            id=c["id"],
            idempotency_key=c["idempotency_key"],
            amount=int(c["amount"]),
            currency=str(c["currency"]).upper(),
            status=c["status"],
        )
        for c in body["charges"]
    ]
    snapshot.refunds = [
        ProviderRefund(id=r["id"], charge_id=r["charge"], amount=int(r["amount"]))
        for r in body["refunds"]
        if r.get("status", "succeeded") == "succeeded"
    ]


async def read_temporal(client: Client, snapshot: Snapshot) -> None:
    """Describe the workflow of every non-terminal payment; count the rest from visibility."""
    limit = asyncio.Semaphore(_DESCRIBE_CONCURRENCY)

    async def describe(workflow_id: str) -> tuple[str, str | None]:
        async with limit:
            try:
                described = await client.get_workflow_handle(workflow_id).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return workflow_id, None
                raise
        status = described.status
        return workflow_id, None if status is None else status.name

    open_ids = [p.workflow_id for p in snapshot.payments if p.status == "processing"]
    snapshot.open_payment_workflows = dict(await asyncio.gather(*map(describe, open_ids)))
    counts: Counter[str] = Counter()
    async for execution in client.list_workflows("WorkflowType = 'Payment'"):
        counts[execution.status.name if execution.status else "UNKNOWN"] += 1
    snapshot.workflow_counts = dict(counts)


async def read_snapshot(sources: Sources) -> Snapshot:
    snapshot = Snapshot(taken_at=datetime.now(UTC))
    await read_ledger(sources.database_url, snapshot)
    if sources.temporal_address is not None:
        client = await Client.connect(
            sources.temporal_address, namespace=sources.temporal_namespace
        )
        await read_temporal(client, snapshot)
    await read_provider(sources.provider_url, sources.provider_api_key, snapshot)
    return snapshot
