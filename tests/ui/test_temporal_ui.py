"""What support staff see: the Temporal UI of the real stack, driven by headless Chromium.

A payment is made over the API; the test searches the UI for its idempotency key
(and for its provider charge id), opens it and checks that the summary and the
charge activity are on screen. It also shows a declined payment and a charge the
provider keeps failing, as docs/support.md describes them.

Each step leaves a screenshot in pytest's temporary directory; with
``UPDATE_DOCS_IMAGES=1`` they go to ``docs/images/`` instead, which is how the
runbook's pictures are made::

    UPDATE_DOCS_IMAGES=1 .venv/bin/pytest tests/ui

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); Playwright
drives it by path and never downloads a browser of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from temporalio.client import Client, WorkflowExecutionStatus

from admin.clients import CreatedClient
from devstack.stack import REPO_ROOT, Stack, StackConfig
from devstack.temporal_server import NAMESPACE
from domain.payments import payment_workflow_id
from tests.helpers.eventually import wait_until
from tests.helpers.provider import SandboxProvider

CHROMIUM = Path("/usr/bin/chromium")
DOCS_IMAGES = REPO_ROOT / "docs" / "images"

# The UI's first page load on a cold dev server takes several seconds on 2 cores.
expect.set_options(timeout=20_000)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"browser test of the Temporal UI skipped: {CHROMIUM} not found "
        "(Debian: apt-get install chromium; .ci/run installs it)",
    ),
]


@dataclass
class UIStack:
    stack: Stack
    client: CreatedClient
    temporal: Client
    browser: Browser
    shots: Path

    @property
    def ui_url(self) -> str:
        url = self.stack.temporal.ui_url
        assert url is not None
        return url

    def workflows_url(self, query: str) -> str:
        return f"{self.ui_url}/namespaces/{NAMESPACE}/workflows?query={quote(query)}"

    async def pay(self, key: str, payment_method: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.post(
                f"{self.stack.api_url}/v1/payments",
                headers={"Authorization": f"Bearer {self.client.api_key}", "Idempotency-Key": key},
                json={
                    "amount": 1250,
                    "currency": "EUR",
                    "payment_method": payment_method,
                    "description": "Order 1234",
                },
            )

    async def visible_to_search(self, query: str) -> bool:
        """Visibility lags a little behind the workflow; the UI shows what it shows."""
        return [w async for w in self.temporal.list_workflows(query)] != []

    async def closed(self, workflow_id: str) -> bool:
        described = await self.temporal.get_workflow_handle(workflow_id).describe()
        return described.status == WorkflowExecutionStatus.COMPLETED

    async def shot(self, page: Page, name: str, *, full_page: bool = False) -> None:
        await page.screenshot(path=self.shots / name, full_page=full_page)


@pytest.fixture(scope="module")
async def ui(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[UIStack]:
    shots = DOCS_IMAGES if os.environ.get("UPDATE_DOCS_IMAGES") == "1" else (
        tmp_path_factory.mktemp("screenshots")
    )  # fmt: skip
    shots.mkdir(parents=True, exist_ok=True)
    config = StackConfig.for_tests(tmp_path_factory.mktemp("stack"), ui=True)
    async with Stack(config) as stack, async_playwright() as playwright:
        client = await stack.add_client("acme")
        temporal = await Client.connect(stack.temporal_address, namespace=NAMESPACE)
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield UIStack(stack, client, temporal, browser, shots)
        finally:
            await browser.close()


@pytest.fixture(scope="module")
async def page(ui: UIStack) -> AsyncIterator[Page]:
    """One tab for the module: the UI's bundle is loaded once, then comes from the cache."""
    context = await ui.browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    yield page
    await context.close()


async def expect_metadata(page: Page, text: str) -> None:
    """The UI renders the summary and the details as markdown, each in an iframe."""

    async def shown() -> bool:
        for frame in page.frames[1:]:
            try:
                if await frame.get_by_text(text).count():
                    return True
            except PlaywrightError:  # the UI re-rendered it meanwhile: look again
                continue
        return False

    await wait_until(shown, within=20, interval=0.25)


def _payment_body(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    return body


async def test_support_finds_a_payment_by_key_and_reads_its_summary_and_charge(
    ui: UIStack, page: Page
) -> None:
    key = f"order-{uuid.uuid4()}"
    response = await ui.pay(key, "pm_card_visa")
    assert response.status_code == 201
    payment = _payment_body(response)
    assert payment["status"] == "succeeded"
    workflow_id = payment_workflow_id(ui.client.client_id, key)
    await wait_until(lambda: ui.closed(workflow_id), within=30)
    await wait_until(lambda: ui.visible_to_search(f'IdempotencyKey="{key}"'), within=10)

    # Search by idempotency key, as a customer quotes it.
    await page.goto(ui.workflows_url(f'IdempotencyKey="{key}"'))
    row = page.get_by_role("link", name=workflow_id)
    await expect(row).to_be_visible()
    await expect(page.get_by_text("1 Workflow", exact=True)).to_be_visible()
    await ui.shot(page, "ui-search-by-key.png")

    # Open it: the charge activity, with its summary, is on the timeline.
    await row.click()
    await expect(
        page.get_by_text("charge_payment • Charge 1250 EUR at the provider")
    ).to_be_visible()
    await expect(
        page.get_by_text("notify_webhook • Send the payment.succeeded webhook")
    ).to_be_visible()
    await expect(page.get_by_text(payment["provider_charge_id"]).first).to_be_visible()
    await ui.shot(page, "ui-payment-timeline.png", full_page=True)

    # The static summary and details read like sentences.
    await page.get_by_test_id("user-metadata-tab").click()
    await expect_metadata(page, f"Charge 12.50 EUR for client acme, key {key}")
    await expect_metadata(page, f"Payment {payment['id']}")
    await expect_metadata(page, "Done: succeeded")
    await ui.shot(page, "ui-payment-summary.png")

    # The provider's charge id (from the provider's dashboard or a dispute) finds it too.
    charge_query = f'ProviderChargeId="{payment["provider_charge_id"]}"'
    await wait_until(lambda: ui.visible_to_search(charge_query), within=10)
    await page.goto(ui.workflows_url(charge_query))
    await expect(page.get_by_role("link", name=workflow_id)).to_be_visible()
    await ui.shot(page, "ui-search-by-charge-id.png")


async def test_support_sees_why_a_payment_was_declined(ui: UIStack, page: Page) -> None:
    key = f"order-{uuid.uuid4()}"
    response = await ui.pay(key, "pm_card_chargeDeclined")
    assert response.status_code == 201
    assert _payment_body(response)["failure_code"] == "card_declined"
    workflow_id = payment_workflow_id(ui.client.client_id, key)
    await wait_until(lambda: ui.closed(workflow_id), within=30)
    query = f'IdempotencyKey="{key}" AND PaymentStatus="failed" AND FailureCode="card_declined"'
    await wait_until(lambda: ui.visible_to_search(query), within=10)

    await page.goto(ui.workflows_url(query))
    await page.get_by_role("link", name=workflow_id).click()
    await page.get_by_test_id("history-tab").click()
    # The failed charge attempt carries the provider's words; expanded, the charge's
    # retry policy shows that a PaymentDeclined is never retried.
    failed = page.get_by_role("row").filter(has_text="Activity Task Failed").first
    await expect(failed).to_contain_text("Your card was declined.")
    await failed.get_by_role("button", name="Expand details").click()
    await expect(page.get_by_text("charge_payment", exact=True).first).to_be_visible()
    await expect(page.get_by_text('"PaymentDeclined"').first).to_be_visible()
    await ui.shot(page, "ui-declined-history.png", full_page=True)


async def test_support_sees_what_a_payment_is_waiting_for(ui: UIStack, page: Page) -> None:
    provider = SandboxProvider(
        ui.stack.provider_url, ui.stack.settings_env()["PAYMENTS_PROVIDER_API_KEY"]
    )
    key = f"order-{uuid.uuid4()}"
    workflow_id = payment_workflow_id(ui.client.client_id, key)
    await provider.set_faults(error_rate=1.0)
    try:
        response = await ui.pay(key, "pm_card_visa")
        assert response.status_code == 202  # the API's wait ran out: still processing
        await wait_until(lambda: ui.visible_to_search(f'IdempotencyKey="{key}"'), within=10)

        await page.goto(ui.workflows_url(f'IdempotencyKey="{key}"'))
        await page.get_by_role("link", name=workflow_id).click()
        await page.get_by_test_id("pending-activities-tab").click()
        await expect(page.get_by_text("charge_payment").first).to_be_visible()
        await expect(page.get_by_text("provider answered 500").first).to_be_visible()
        await ui.shot(page, "ui-pending-charge.png", full_page=True)

        await page.get_by_test_id("user-metadata-tab").click()
        await expect_metadata(page, "Waiting for the provider to charge the card")
        await ui.shot(page, "ui-current-details.png")
    finally:
        # The next retry charges (seconds away, by the backoff); the e2e tests follow
        # such payments to their end, this one only shows what staff see meanwhile.
        await provider.clear_faults()
