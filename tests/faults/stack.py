"""What every fault test needs: the stack, a way to pay over HTTP, and one closing check.

``assert_settled`` is the fault tests' common ending: every accepted payment reaches
a terminal state; the provider charged each at most once, and exactly once for each
that succeeded; the ledger balances; the audit over the whole stack is clean.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus

from admin.clients import CreatedClient
from audit import Sources, run_audit
from devstack.stack import Stack
from devstack.temporal_server import NAMESPACE
from domain.payments import payment_id_for
from ledger.tables import LedgerEntry, PaymentRow
from tests.helpers.eventually import wait_until
from tests.helpers.provider import SandboxProvider

VISA = "pm_card_visa"
DECLINED = "pm_card_chargeDeclined"
# Payments of earlier tests share the stack; none of them may be stuck this long.
STUCK_AFTER = timedelta(minutes=5)


def body(amount: int = 1250, payment_method: str = VISA) -> dict[str, Any]:
    return {"amount": amount, "currency": "EUR", "payment_method": payment_method}


@dataclass
class FaultStack:
    stack: Stack
    client: CreatedClient
    sessions: async_sessionmaker[AsyncSession]
    provider: SandboxProvider
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=self.stack.api_url,
            timeout=httpx.Timeout(60, connect=5),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )

    async def pay(
        self,
        key: str | None = None,
        payload: dict[str, Any] | None = None,
        *,
        api_key: str | None = None,
    ) -> httpx.Response:
        return await self.http.post(
            "/v1/payments",
            json=payload or body(),
            headers={
                "Authorization": f"Bearer {api_key or self.client.api_key}",
                "Idempotency-Key": key or str(uuid.uuid4()),
            },
        )

    async def pay_until_accepted(
        self,
        key: str,
        payload: dict[str, Any] | None = None,
        *,
        within: float = 120,
        api_key: str | None = None,
    ) -> str:
        """As a client should: retry with the same key until the API accepts; the payment id."""
        deadline = time.monotonic() + within
        while True:
            try:
                response = await self.pay(key, payload, api_key=api_key)
                if response.status_code in (201, 202):
                    payment_id: str = response.json()["id"]
                    return payment_id
                # 409 only while the first request with this key is still in progress.
                in_progress = response.status_code == 409 and response.json()["type"].endswith(
                    "/idempotency-request-in-progress"
                )
                assert in_progress or response.status_code in (429, 500, 502, 503), response.text
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"payment {key} never accepted"
            await asyncio.sleep(1)

    async def ledger_status(self, payment_id: str) -> str | None:
        async with self.sessions() as session:
            status: str | None = await session.scalar(
                select(PaymentRow.status).where(PaymentRow.id == payment_id)
            )
            return status

    async def charge_requests(self, payment_id: str) -> int:
        count: int = (await self.provider.stats())["charge_requests_by_key"].get(payment_id, 0)
        return count

    async def charge_requests_for_key(self, key: str) -> int:
        return await self.charge_requests(payment_id_for(self.client.client_id, key))

    async def charges(self, payment_id: str) -> int:
        count: int = (await self.provider.stats())["charges_by_key"].get(payment_id, 0)
        return count

    async def heal(self) -> None:
        """Undo whatever a test left broken, so the next one starts from a working stack."""
        stack = self.stack
        stack.webhooks.respond_with = 204
        if not stack.postgres.process.running:
            await stack.postgres.start()
        if not stack.temporal.process.running:
            await stack.temporal.start()
        if stack.worker_env or not stack.worker.running:
            stack.worker_env.clear()
            await stack.restart_worker()
        if stack.api.running and not await self._api_answers():
            # Still draining after a SIGTERM (a test that failed before it ended): let it
            # exit, or every later test meets a dead API.
            await stack.api.terminate(grace=15)
        if not stack.api.running:
            stack.api.start()
            await stack.api.wait_ready(self._api_healthy, within=30, what="answering /healthz")
        await self.provider.clear_faults()

    async def _api_answers(self) -> bool:
        try:
            return await self._api_healthy()
        except httpx.TransportError:
            return False

    async def _api_healthy(self) -> bool:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(f"{self.stack.api_url}/healthz")).status_code == 200


async def _terminal(fs: FaultStack, payment_ids: Collection[str]) -> dict[str, str] | None:
    try:
        async with fs.sessions() as session:
            rows = (
                await session.execute(
                    select(PaymentRow.id, PaymentRow.status).where(PaymentRow.id.in_(payment_ids))
                )
            ).all()
    except DBAPIError as exc:
        if exc.connection_invalidated:
            # A pooled connection from before a PostgreSQL restart (the pool does not
            # ping, ledger/db.py): the pool is discarded, the next poll reconnects.
            return None
        raise
    statuses = {row.id: row.status for row in rows}
    if len(statuses) == len(payment_ids) and "processing" not in statuses.values():
        return statuses
    return None


async def assert_settled(
    fs: FaultStack, payment_ids: Collection[str], *, within: float = 120
) -> dict[str, str]:
    """Wait for every accepted payment to end, then check money and books. Their statuses."""
    ids = set(payment_ids)
    assert ids, "no accepted payment to check"
    started = time.monotonic()
    settled = await wait_until(lambda: _terminal(fs, ids), within=within, interval=0.5)
    assert settled is not None
    statuses: dict[str, str] = settled

    ledger_done = time.monotonic() - started
    await _workflows_completed(fs, ids, within=within)
    workflows_done = time.monotonic() - started

    listing = await _provider_listing(fs.provider)
    charges_by_key: dict[str, list[dict[str, Any]]] = {}
    for charge in listing["charges"]:
        charges_by_key.setdefault(charge["idempotency_key"], []).append(charge)
    async with fs.sessions() as session:
        recorded = {
            row.id: row.provider_charge_id
            for row in await session.execute(
                select(PaymentRow.id, PaymentRow.provider_charge_id).where(PaymentRow.id.in_(ids))
            )
        }
        sums = {
            row.payment_id: (row.n, row.total)
            for row in await session.execute(
                select(
                    LedgerEntry.payment_id,
                    func.count().label("n"),
                    func.sum(LedgerEntry.amount).label("total"),
                )
                .where(LedgerEntry.payment_id.in_(ids))
                .group_by(LedgerEntry.payment_id)
            )
        }
    for payment_id, status in statuses.items():
        charges = charges_by_key.get(payment_id, [])
        succeeded = [c for c in charges if c["status"] == "succeeded"]
        assert len(charges) <= 1, (payment_id, charges)
        entries = sums.get(payment_id, (0, 0))
        if status == "succeeded":
            assert len(succeeded) == 1, (payment_id, charges)
            assert recorded[payment_id] == succeeded[0]["id"], payment_id
            assert entries == (2, 0), (payment_id, entries)
        else:
            assert succeeded == [], (payment_id, charges)
            assert entries == (0, 0), (payment_id, entries)

    report = await run_audit(
        Sources(
            database_url=fs.stack.database_url,
            provider_url=fs.stack.provider_url,
            provider_api_key=fs.provider.api_key,
            temporal_address=fs.stack.temporal_address,
        ),
        stuck_after=STUCK_AFTER,
    )
    assert report.clean, report.render()
    print(
        f"\n[settled {len(ids)}: ledger terminal after {ledger_done:.1f} s, workflows "
        f"completed after {workflows_done:.1f} s, checked and audited after "
        f"{time.monotonic() - started:.1f} s]"
    )
    return statuses


async def _workflows_completed(fs: FaultStack, ids: set[str], *, within: float) -> None:
    """Each payment's workflow has run to completion (webhook delivered), by describe."""
    async with fs.sessions() as session:
        workflow_ids = list(
            await session.scalars(select(PaymentRow.workflow_id).where(PaymentRow.id.in_(ids)))
        )
    client = await Client.connect(fs.stack.temporal_address, namespace=NAMESPACE)
    limit = asyncio.Semaphore(20)
    pending = set(workflow_ids)

    async def completed(workflow_id: str) -> bool:
        async with limit:
            described = await client.get_workflow_handle(workflow_id).describe()
        assert described.status in (
            WorkflowExecutionStatus.RUNNING,
            WorkflowExecutionStatus.COMPLETED,
        ), (workflow_id, described.status)
        return described.status == WorkflowExecutionStatus.COMPLETED

    async def all_completed() -> bool:
        waiting = sorted(pending)
        done = await asyncio.gather(*map(completed, waiting))
        pending.difference_update(w for w, ok in zip(waiting, done, strict=True) if ok)
        return not pending

    await wait_until(all_completed, within=within, interval=0.5)


async def _provider_listing(provider: SandboxProvider) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=provider.base_url, headers={"Authorization": f"Bearer {provider.api_key}"}
    ) as http:
        response = await http.get("/sandbox/ledger")
        response.raise_for_status()
        listing: dict[str, Any] = response.json()
        return listing
