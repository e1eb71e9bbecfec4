"""The logs of real payments, as the API and the worker write them under the stack:
correlated, one canonical line per request and per activity attempt, no secrets,
and a bounded number of bytes per payment."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.payments import payment_workflow_id
from tests.e2e.conftest import e2e_stack
from tests.helpers.e2e import E2EStack, wait_until

pytestmark = pytest.mark.e2e

PAYMENTS = 10
# Issue 5's budget for one successful payment at INFO, API and worker together.
BYTES_PER_PAYMENT_BUDGET = 2048
ACTIVITIES = ["open_payment", "charge_payment", "record_outcome", "notify_webhook"]


@pytest.fixture(scope="module")
async def own_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[E2EStack]:
    """A stack of this module's own: the test counts every line the API and the worker
    write in its window, and another test's last lines would land in it."""
    async with e2e_stack(tmp_path_factory.mktemp("logs-stack")) as running:
        yield running


def _lines(path: Path, start: int) -> list[dict[str, Any]]:
    with path.open("rb") as file:
        file.seek(start)
        return [json.loads(line) for line in file.read().splitlines() if line.startswith(b"{")]


async def test_payments_log_correlated_canonical_lines_without_secrets(
    own_stack: E2EStack,
) -> None:
    stack = own_stack
    logs = stack.stack.logs_dir
    api_log, worker_log = logs / "api.log", logs / "worker.log"
    start = {path: path.stat().st_size for path in (api_log, worker_log)}

    sent: dict[str, str] = {}  # idempotency key -> request id
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        for _ in range(PAYMENTS):
            key, request_id = str(uuid.uuid4()), f"req-{uuid.uuid4().hex[:12]}"
            response = await http.post(
                "/v1/payments",
                json={"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa",
                      "description": "Order 1234", "metadata": {"order": "1234"}},
                headers={"Authorization": f"Bearer {stack.client.api_key}",
                         "Idempotency-Key": key, "X-Request-Id": request_id},
            )  # fmt: skip
            assert response.status_code == 201, response.text
            assert response.headers["X-Request-Id"] == request_id
            sent[key] = request_id

    workflow_ids = {payment_workflow_id(stack.client.client_id, key): key for key in sent}

    def webhooks_attempted() -> list[dict[str, Any]]:
        lines = _lines(worker_log, start[worker_log])
        done = [
            line
            for line in lines
            if line.get("activity") == "notify_webhook" and line["event"] == "activity.attempt"
        ]
        return lines if {d["workflow_id"] for d in done} >= workflow_ids.keys() else []

    worker_lines = await wait_until(webhooks_attempted, within=30)
    api_lines = _lines(api_log, start[api_log])

    requests = [line for line in api_lines if line["event"] == "http.request"]
    assert {(r["idempotency_key"], r["request_id"]) for r in requests} == set(sent.items())
    assert {r["client_id"] for r in requests} == {stack.client.client_id}
    assert {r["status"] for r in requests} == {201}

    for workflow_id in workflow_ids:
        ours = [line for line in worker_lines if line.get("workflow_id") == workflow_id]
        attempts = [line for line in ours if line["event"] == "activity.attempt"]
        assert Counter(a["activity"] for a in attempts) == Counter(ACTIVITIES), attempts
        assert {a["outcome"] for a in attempts} == {"completed"}
        assert len({line["run_id"] for line in ours}) == 1
        assert all(a["attempt"] == 1 and a["duration_ms"] >= 0 for a in attempts)

    everything = api_log.read_bytes() + worker_log.read_bytes()
    for secret in ("pm_card_visa", stack.client.api_key, stack.client.webhook_secret):
        assert secret.encode() not in everything

    correlated = [line for line in api_lines if line.get("idempotency_key") in sent] + [
        line for line in worker_lines if line.get("workflow_id") in workflow_ids
    ]
    written = sum(
        len(json.dumps(line, separators=(",", ":"), ensure_ascii=False)) + 1 for line in correlated
    )
    growth = sum(path.stat().st_size - start[path] for path in (api_log, worker_log))
    per_payment = growth / PAYMENTS
    print(
        f"\nlog bytes per successful payment at INFO (API + worker): {per_payment:.0f} "
        f"({written / PAYMENTS:.0f} in lines tied to the payment, "
        f"{len(correlated) / PAYMENTS:.1f} lines)"
    )
    # Every byte written in this window belongs to one of these payments.
    assert growth <= written * 1.05 + 200
    assert per_payment <= BYTES_PER_PAYMENT_BUDGET
