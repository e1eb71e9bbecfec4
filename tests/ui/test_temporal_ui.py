"""What support staff see: the Temporal UI of the real stack, driven by headless Chromium.

Payloads (inputs, results, summaries, details) are encrypted in Temporal, so the
UI shows them only to staff signed in to our codec endpoint (``/codec`` on the API).
The test does what docs/support.md tells staff to do: sign in at ``/codec/login``
(it sets a cookie for the codec endpoint), then in the UI's codec settings use the
browser setting with that endpoint and tick "Include cross-origin credentials". The
UI then decodes through the endpoint from the browser, across origins (CORS).

A payment is made over the API; the test searches the UI for its idempotency key
(and for its provider charge id), opens it and checks that the summary and the
charge are on screen, decoded. It also shows a declined payment and a charge the
provider keeps failing, as docs/support.md describes them, and that without
signing in the UI shows nothing decoded.

Each charge attempt is a local activity: the Timeline shows it as a marker named
``charge_payment`` (no summary, no colour for a failure); *Event History* has a
*Local Activity* row per attempt with its summary, and expanded, its *Failure*.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.async_api import Browser, Locator, Page, Response, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from temporalio.client import Client, WorkflowExecutionStatus

from admin.clients import CreatedClient
from devstack.stack import REPO_ROOT, Stack, StackConfig
from devstack.temporal_server import NAMESPACE
from domain.payments import payment_workflow_id
from tests.helpers.eventually import wait_until
from tests.helpers.history import charge_attempts
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
    decode_statuses: list[int] = field(default_factory=list)

    def record_decode(self, response: Response) -> None:
        """The UI's calls to our codec endpoint, made by the browser across origins."""
        if response.url.startswith(f"{self.stack.codec_url}/decode"):
            self.decode_statuses.append(response.status)

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

    async def failed_charges(self, workflow_id: str) -> int:
        """Charge attempts that failed so far (the workflow retries them itself)."""
        history = await self.temporal.get_workflow_handle(workflow_id).fetch_history()
        return sum(a.outcome == "failed" for a in charge_attempts(history.events))

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


async def sign_in_to_codec(ui: UIStack, page: Page, *, shots: bool = False) -> None:
    """What staff do once per shift: sign in to the codec endpoint (a cookie for 8 hours)."""
    await page.goto(f"{ui.stack.codec_url}/login")
    await page.get_by_label("Codec token").fill(ui.stack.dev_secrets["codec_token"])
    if shots:
        await ui.shot(page, "codec-sign-in.png")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Signed in for 8 hours")).to_be_visible()


async def use_codec_with_credentials(ui: UIStack, page: Page, *, shots: bool = False) -> None:
    """The UI's codec settings (stored in the browser): our endpoint, with the cookie."""
    await page.goto(f"{ui.ui_url}/namespaces/{NAMESPACE}/workflows")
    await page.get_by_role("button", name="Codec Server is configured").click()
    dialog = page.get_by_role("dialog", name="Codec Server")
    await dialog.get_by_text("Use my browser setting and ignore Cluster-level setting.").click()
    await dialog.get_by_role("textbox", name="Codec Server browser endpoint").fill(
        ui.stack.codec_url
    )
    # The switch itself is visually hidden; its label is what a person clicks.
    await dialog.get_by_text("Include cross-origin credentials", exact=True).click()
    await expect(
        dialog.get_by_role("switch", name="Include cross-origin credentials")
    ).to_be_checked()
    if shots:
        await ui.shot(page, "ui-codec-settings.png")
    await dialog.get_by_role("button", name="Apply").click()
    await expect(dialog).to_be_hidden()


@pytest.fixture(scope="module")
async def page(ui: UIStack) -> AsyncIterator[Page]:
    """One tab for the module, signed in as staff: the UI's bundle is loaded once."""
    context = await ui.browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    page.on("response", ui.record_decode)
    await sign_in_to_codec(ui, page, shots=True)
    await use_codec_with_credentials(ui, page, shots=True)
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


def local_activity_rows(page: Page, activity_type: str) -> Locator:
    """Event History's collapsed rows of a local activity (one per execution)."""
    return (
        page.get_by_role("row")
        .filter(has_text="Local Activity")
        .filter(has_text=activity_type)
        .filter(has=page.get_by_role("button", name="Expand details"))
    )


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

    # Open it: the charge (a local activity: a marker, named by its type) and the
    # webhook activity, with its summary, are on the timeline.
    await row.click()
    await page.get_by_role("tab", name="Timeline").click()
    await expect(page.get_by_text("charge_payment", exact=True)).to_be_visible()
    await expect(
        page.get_by_text("notify_webhook • Send the payment.succeeded webhook")
    ).to_be_visible()
    await expect(page.get_by_text(payment["provider_charge_id"]).first).to_be_visible()
    await ui.shot(page, "ui-payment-timeline.png", full_page=True)

    # Event History has the charge's row, with its summary (decoded).
    await page.get_by_test_id("history-tab").click()
    charge = local_activity_rows(page, "charge_payment")
    await expect(charge).to_have_count(1)
    await expect(charge).to_contain_text("Charge 12.50 EUR at the provider")

    # The static summary and details read like sentences.
    await page.get_by_test_id("user-metadata-tab").click()
    await expect_metadata(page, f"Charge 12.50 EUR for client acme, key {key}")
    await expect_metadata(page, f"Payment {payment['id']}")
    await expect_metadata(page, "Done: succeeded")
    await ui.shot(page, "ui-payment-summary.png")
    # Decoded by the browser through the codec endpoint: CORS and the cookie both work.
    assert set(ui.decode_statuses) == {200}, ui.decode_statuses

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
    # One charge attempt, and no backoff timer after it: a decline is never retried.
    # Expanded, the attempt's Failure carries the provider's words.
    charge = local_activity_rows(page, "charge_payment")
    await expect(charge).to_have_count(1)
    await expect(page.get_by_text("Back off before charge attempt")).to_have_count(0)
    await charge.get_by_role("button", name="Expand details").click()
    await expect(page.get_by_text("Failure", exact=True).first).to_be_visible()
    await expect(page.get_by_text("Your card was declined.").first).to_be_visible()
    assert await ui.failed_charges(workflow_id) == 1, "a decline is never retried"
    await page.get_by_text("Failure", exact=True).first.scroll_into_view_if_needed()
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

        await wait_until(lambda: ui.failed_charges(workflow_id), within=20)
        await page.goto(ui.workflows_url(f'IdempotencyKey="{key}"'))
        await page.get_by_role("link", name=workflow_id).click()
        # Each charge attempt is on the timeline, a backoff timer after each failed one
        # (the UI reopens the last tab used).
        await page.get_by_role("tab", name="Timeline").click()
        await expect(page.get_by_text("charge_payment", exact=True).first).to_be_visible()
        await expect(page.get_by_text("Back off before charge attempt 2").first).to_be_visible()
        # In the history, each attempt is a row with its summary; expanded, a failed
        # attempt carries the provider's words.
        await page.get_by_test_id("history-tab").click()
        first = local_activity_rows(page, "charge_payment").filter(has_not_text="(attempt")
        await expect(first).to_have_count(1)
        await expect(
            local_activity_rows(page, "charge_payment").filter(has_text="(attempt 2)")
        ).to_have_count(1)
        await first.get_by_role("button", name="Expand details").click()
        await expect(page.get_by_text("Failure", exact=True).first).to_be_visible()
        await expect(page.get_by_text("provider answered 500").first).to_be_visible()
        await ui.shot(page, "ui-retrying-charge.png", full_page=True)

        # The current details say which attempt it is at and what went wrong last.
        await page.get_by_test_id("user-metadata-tab").click()
        await expect_metadata(page, "Waiting for the provider to charge the card — attempt")
        await expect_metadata(page, "last error: provider answered 500")
        await ui.shot(page, "ui-current-details.png")
    finally:
        # The next retry charges (seconds away, by the backoff); the e2e tests follow
        # such payments to their end, this one only shows what staff see meanwhile.
        await provider.clear_faults()


async def test_without_signing_in_the_ui_decodes_nothing(ui: UIStack) -> None:
    """The codec endpoint answers only signed-in staff: a browser that has the same
    codec settings but no sign-in sees the payment, never its summary in clear."""
    key = f"order-{uuid.uuid4()}"
    response = await ui.pay(key, "pm_card_visa")
    assert response.status_code == 201
    workflow_id = payment_workflow_id(ui.client.client_id, key)
    await wait_until(lambda: ui.visible_to_search(f'IdempotencyKey="{key}"'), within=10)

    context = await ui.browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = await context.new_page()
        statuses: list[int] = []
        page.on(
            "response",
            lambda r: statuses.append(r.status) if "/codec/decode" in r.url else None,
        )
        await use_codec_with_credentials(ui, page)
        await page.goto(ui.workflows_url(f'IdempotencyKey="{key}"'))
        await page.get_by_role("link", name=workflow_id).click()
        # The history's charge row is there, its summary (decoded for staff) is not.
        await page.get_by_test_id("history-tab").click()
        await expect(local_activity_rows(page, "charge_payment")).to_have_count(1)
        await wait_until(lambda: statuses, within=20)
        assert set(statuses) == {401}, statuses
        await expect(page.get_by_text("Charge 12.50 EUR at the provider")).to_have_count(0)
    finally:
        await context.close()
