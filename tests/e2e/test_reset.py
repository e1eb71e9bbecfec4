"""Someone resets a payment past its charge anyway (the runbook says never to): the new
run charges nothing twice and ends with the same outcome, the ledger balanced.

The reset is the one support could click: a completed payment, reset to its first
workflow task (``temporal workflow reset --type FirstWorkflowTask``), so the new run
does everything again: open, charge, record, notify.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus

from devstack.temporal_server import NAMESPACE
from domain.payments import Payment, payment_workflow_id
from tests.helpers.e2e import E2EStack, temporal_cli, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("payment_method", ["pm_card_visa", "pm_card_chargeDeclined"])
async def test_a_payment_reset_to_its_first_task_charges_nothing_twice(
    stack: E2EStack, payment_method: str
) -> None:
    key = str(uuid.uuid4())
    auth = {"Authorization": f"Bearer {stack.client.api_key}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        created = await http.post(
            "/v1/payments",
            json={"amount": 2500, "currency": "EUR", "payment_method": payment_method},
            headers={**auth, "Idempotency-Key": key},
        )
        assert created.status_code == 201, created.text
        before: dict[str, Any] = created.json()

        temporal = await stack.stack.temporal_client()
        workflow_id = payment_workflow_id(stack.client.client_id, key)
        first = temporal.get_workflow_handle(workflow_id, result_type=Payment)
        await first.result()
        first_run = (await first.describe()).run_id
        stats_before = await stack.provider_stats()
        charged_before = stats_before["charges_by_key"].get(before["id"], 0)
        asked_before = stats_before["charge_requests_by_key"][before["id"]]
        entries_before = await stack.ledger_balance(before["id"])

        await temporal_cli(
            "workflow", "reset", "--address", stack.temporal_address, "--namespace", NAMESPACE,
            "--workflow-id", workflow_id, "--run-id", first_run, "--type", "FirstWorkflowTask",
            "--reason", "tests/e2e/test_reset.py: a reset past the charge",
        )  # fmt: skip

        latest = temporal.get_workflow_handle(workflow_id, result_type=Payment)

        async def new_run_completed() -> bool:
            described = await latest.describe()
            return (
                described.run_id != first_run
                and described.status == WorkflowExecutionStatus.COMPLETED
            )

        await wait_until(new_run_completed, within=60)
        result = await latest.result()
        after = (await http.get(f"/v1/payments/{before['id']}", headers=auth)).json()

    stats = await stack.provider_stats()
    # The new run asked the provider again, with the same idempotency key: one charge.
    assert stats["charge_requests_by_key"][before["id"]] == asked_before + 1
    assert stats["charges_by_key"].get(before["id"], 0) == charged_before
    assert charged_before == (1 if payment_method == "pm_card_visa" else 0)
    # The same outcome, in the new run's result and in the API's answer.
    outcome = (before["status"], before["provider_charge_id"], before["failure_code"])
    assert (after["status"], after["provider_charge_id"], after["failure_code"]) == outcome
    assert (str(result.status), result.provider_charge_id, result.failure_code) == outcome
    # Nothing recorded twice: the same entries, summing to zero.
    entries, total = await stack.ledger_balance(before["id"])
    assert (entries, total) == entries_before
    assert total == 0
