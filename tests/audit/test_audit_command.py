"""``python -m audit`` against the real PostgreSQL ledger and the real sandbox provider,
with discrepancies planted in each (Temporal's part is covered in test_reconcile and by
every fault test)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from admin.clients import add_client
from ledger.mapping import PROVIDER_RECEIVABLE_ACCOUNT, client_payable_account
from ledger.tables import LedgerEntry, PaymentRow
from tests.conftest import REPO_ROOT
from tests.helpers.provider import SandboxProvider


async def _charge(provider: SandboxProvider, key: str, amount: int = 1000) -> str:
    async with httpx.AsyncClient(base_url=provider.base_url) as http:
        response = await http.post(
            "/v1/charges",
            json={"amount": amount, "currency": "EUR", "payment_method": "pm_card_visa"},
            headers={"Authorization": f"Bearer {provider.api_key}", "Idempotency-Key": key},
        )
    response.raise_for_status()
    charge_id: str = response.json()["id"]
    return charge_id


async def _audit(database_url: str, provider: SandboxProvider) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audit",
        "--database-url", database_url,
        "--provider-url", provider.base_url,
        "--provider-api-key", provider.api_key,
        "--no-temporal",
        "--stuck-after", "600",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_audit_command_reports_each_planted_discrepancy_and_exits_non_zero(
    sessions: async_sessionmaker[AsyncSession],
    database_url: str,
    sandbox_provider: SandboxProvider,
) -> None:
    run = uuid.uuid4().hex[:8]
    ids = {name: f"pay_audit_{name}_{run}" for name in
           ("orphan", "nocharge", "unbalanced", "stuck", "double", "overrefund")}  # fmt: skip
    await _charge(sandbox_provider, ids["orphan"])  # charged, never recorded
    unbalanced_charge = await _charge(sandbox_provider, ids["unbalanced"])
    await _charge(sandbox_provider, ids["double"])
    other_charge = await _charge(sandbox_provider, f"{ids['double']}-second-key")
    overrefund_charge = await _charge(sandbox_provider, ids["overrefund"])

    async with sessions() as session, session.begin():
        client = await add_client(session, name=f"audit-{run}", webhook_url=None)

        def payment(
            name: str, status: str, charge: str | None, created: datetime | None = None
        ) -> dict[str, object]:
            return {
                "id": ids[name],
                "client_id": client.client_id,
                "idempotency_key": name + run,
                "request_fingerprint": "f" * 64,
                "amount": 1000,
                "currency": "EUR",
                "payment_method": "pm_card_visa",
                "metadata_": {},
                "status": status,
                "provider_charge_id": charge,
                "workflow_id": f"payment/{client.client_id}/{name}{run}",
                "created_at": created or datetime.now(UTC),
            }

        def legs(name: str, amount: int, kind: str = "charge") -> list[dict[str, object]]:
            return [
                {"payment_id": ids[name], "entry_kind": kind, "currency": "EUR",
                 "account": PROVIDER_RECEIVABLE_ACCOUNT, "amount": amount},
                {"payment_id": ids[name], "entry_kind": kind, "currency": "EUR",
                 "account": client_payable_account(client.client_id), "amount": -amount},
            ]  # fmt: skip

        # The database itself refuses unbalanced entries at commit; only a superuser
        # switching triggers off can plant one, which is what the audit is there to catch.
        await session.execute(text("SET LOCAL session_replication_role = replica"))
        await session.execute(
            insert(PaymentRow),
            [
                payment("nocharge", "succeeded", "ch_never_made"),
                payment("unbalanced", "succeeded", unbalanced_charge),
                payment("stuck", "processing", None, datetime.now(UTC) - timedelta(hours=1)),
                payment("double", "succeeded", other_charge),
                payment("overrefund", "succeeded", overrefund_charge),
            ],
        )
        await session.execute(
            insert(LedgerEntry),
            [
                *legs("nocharge", 1000),
                *legs("double", 1000),
                *legs("overrefund", 1000),
                *legs("overrefund", -1500, kind="refund"),
                legs("unbalanced", 1000)[0],  # one leg only
            ],
        )

    rc, output = await _audit(database_url, sandbox_provider)

    assert rc == 1, output
    expected = [
        ("charge_without_ledger", ids["orphan"]),
        ("ledger_without_charge", ids["nocharge"]),
        ("unbalanced_entries", ids["unbalanced"]),
        ("stuck_payment", ids["stuck"]),
        ("double_charge", ids["double"]),
        ("refund_over_captured", ids["overrefund"]),
    ]
    problems = [line for line in output.splitlines() if line.startswith("  ") and run in line]
    for kind, subject in expected:
        assert any(kind in line and subject in line for line in problems), (kind, output)
    assert "AUDIT FAILED" in output
