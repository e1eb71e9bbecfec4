"""What support staff see: the Temporal UI of the real stack, driven by headless Chromium.

Payloads (inputs, results, summaries, details) are encrypted in Temporal, so the
UI shows them only to staff signed in to our codec endpoint (``/codec`` on the API).
The test does what staff do: sign in at ``/codec/login`` (it sets a cookie for the
codec endpoint), then follow the steps the signed-in page lists, word for word (each
by its first word, each UI element by the name the page gives it). The UI then
decodes through the endpoint from the browser, across origins (CORS).

A payment is made over the API; the test searches the UI for its idempotency key
(and for its provider charge id), opens it and checks that the summary and the
charge are on screen, decoded. It also shows a declined payment and a charge the
provider keeps failing, as docs/support.md describes them, the list's columns as
docs/support.md sets them up, and that without signing in the UI shows nothing
decoded, only the way to our sign-in.

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
import re
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
    if shots:
        await ui.shot(page, "codec-signed-in.png")


@dataclass
class Step:
    """One step of the signed-in page: its words, the UI names it gives (in bold) and
    the value to type (in code)."""

    text: str
    names: list[str]
    values: list[str]
    link: str | None

    @property
    def verb(self) -> str:
        return self.text.split()[0]


async def signed_in_steps(page: Page) -> list[Step]:
    steps = []
    for item in await page.locator("ol#steps > li").all():
        link = item.get_by_role("link")
        steps.append(
            Step(
                text=" ".join((await item.inner_text()).split()),
                names=[n.strip() for n in await item.locator("strong").all_inner_texts()],
                values=[v.strip() for v in await item.locator("code").all_inner_texts()],
                link=await link.get_attribute("href") if await link.count() else None,
            )
        )
    return steps


async def follow_signed_in_steps(
    ui: UIStack, page: Page, steps: list[Step], *, shots: bool = False
) -> None:
    """The signed-in page's steps, as a person reads them: each starts with what to do,
    and names in bold what to do it to."""
    dialog = page.get_by_role("dialog", name="Codec Server")
    for step in steps:
        if step.verb == "Open":
            assert step.link == ui.ui_url, step
            await page.goto(f"{step.link}/namespaces/{NAMESPACE}/workflows")
            [icon] = step.names
            await page.get_by_role("button", name=icon).click()
        elif step.verb == "Choose":
            [choice] = step.names
            await dialog.get_by_text(choice, exact=True).click()
        elif step.verb == "Enter":
            [field_name], [value] = step.names, step.values
            await dialog.get_by_role("textbox", name=field_name).fill(value)
        elif step.verb == "Switch":
            [switch] = step.names
            # The switch itself is visually hidden; its label is what a person clicks.
            await dialog.get_by_text(switch, exact=True).click()
            await expect(dialog.get_by_role("switch", name=switch)).to_be_checked()
        elif step.verb == "Click":
            if shots:
                await ui.shot(page, "ui-codec-settings.png")
            [button] = step.names
            await dialog.get_by_role("button", name=button).click()
            await expect(dialog).to_be_hidden()
        else:
            raise AssertionError(f"a step the test cannot follow: {step.text}")


async def use_codec_with_credentials(ui: UIStack, page: Page, *, shots: bool = False) -> None:
    """Signed in, the page's steps: the UI's codec settings (kept in the browser) with
    our endpoint, sending the cookie."""
    steps = await signed_in_steps(page)
    assert [step.verb for step in steps] == ["Open", "Choose", "Enter", "Switch", "Click"]
    assert steps[2].values == [ui.stack.codec_url]
    await follow_signed_in_steps(ui, page, steps, shots=shots)


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
    # Where staff look first: the outcome with its code and the provider's words.
    await page.get_by_test_id("user-metadata-tab").click()
    await expect_metadata(page, "Done: failed (card_declined: Your card was declined.)")
    await ui.shot(page, "ui-declined-details.png")


def documented_columns() -> tuple[list[str], list[str]]:
    """The list's columns docs/support.md tells staff to add, and those to remove."""
    text = " ".join((REPO_ROOT / "docs" / "support.md").read_text().split())
    found = re.search(
        r"add \(\*\*\+\*\*\) these, in this order: (.+?); remove \(\*\*\u2212\*\*\) (.+?)\.", text
    )
    assert found, "docs/support.md no longer says which columns to add"
    return re.findall(r"`([^`]+)`", found[1]), re.findall(r"`([^`]+)`", found[2])


async def test_the_list_shows_the_columns_support_md_sets_up(ui: UIStack, page: Page) -> None:
    key = f"order-{uuid.uuid4()}"
    response = await ui.pay(key, "pm_card_chargeDeclined")
    assert response.status_code == 201
    query = f'IdempotencyKey="{key}" AND PaymentStatus="failed"'
    await wait_until(lambda: ui.visible_to_search(query), within=10)
    added, removed = documented_columns()
    assert added[:2] == ["PaymentStatus", "FailureCode"]

    await page.goto(ui.workflows_url(query))
    await page.get_by_role("button", name="Configure Columns").click()
    for column in added:
        await page.get_by_role("button", name=f"Add {column} column").click()
    for column in removed:
        await page.get_by_role("button", name=f"Remove {column} column").click()
    await page.get_by_role("button", name="Close Workflows Table configuration").click()
    await expect(page.get_by_text("Configure Workflows Table")).to_be_hidden()
    headers = page.get_by_role("columnheader")
    for column in added:
        await expect(headers.filter(has_text=column)).to_have_count(1)
    for column in removed:
        await expect(headers.filter(has_text=column)).to_have_count(0)
    row = page.get_by_role("row").filter(
        has=page.get_by_role("link", name=payment_workflow_id(ui.client.client_id, key))
    )
    await expect(row).to_contain_text("failed")
    await expect(row).to_contain_text("card_declined")
    await page.set_viewport_size({"width": 2100, "height": 500})  # the whole row in view
    await ui.shot(page, "ui-list-columns.png")
    await page.set_viewport_size({"width": 1400, "height": 900})


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


async def test_staff_not_signed_in_are_led_to_the_sign_in_page(ui: UIStack) -> None:
    """The codec endpoint decodes for signed-in staff only. A browser that never signed
    in (the UI's own setting) or whose 8 hours are over (the cookie gone, the browser
    setting kept) sees, in place of each payload, where to sign in: a link to our page."""
    key = f"order-{uuid.uuid4()}"
    response = await ui.pay(key, "pm_card_visa")
    assert response.status_code == 201
    workflow_id = payment_workflow_id(ui.client.client_id, key)
    await wait_until(lambda: ui.visible_to_search(f'IdempotencyKey="{key}"'), within=10)
    hint = f"Encrypted. To read it, sign in at {ui.stack.codec_url}/login and reload this page."

    context = await ui.browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = await context.new_page()
        statuses: list[int] = []
        page.on(
            "response",
            lambda r: statuses.append(r.status) if "/codec/decode" in r.url else None,
        )
        for expired in (False, True):
            if expired:  # signed in and set up as the page says, then 8 hours pass
                await sign_in_to_codec(ui, page)
                await use_codec_with_credentials(ui, page)
                await context.clear_cookies()
            await page.goto(ui.workflows_url(f'IdempotencyKey="{key}"'))
            await page.get_by_role("link", name=workflow_id).click()
            await page.get_by_test_id("user-metadata-tab").click()
            await expect_metadata(page, hint)
            # Each step's summary in the history: the same line, never the payment's words.
            await page.get_by_test_id("history-tab").click()
            await expect(page.get_by_text(hint).first).to_be_visible()
            await expect(page.get_by_text("Charge 12.50 EUR")).to_have_count(0)
            if not expired:
                await ui.shot(page, "ui-not-signed-in.png")
        assert set(statuses) == {200}, statuses

        # The summary's link opens our sign-in page.
        await page.get_by_test_id("user-metadata-tab").click()

        async def sign_in_link() -> str | None:
            for frame in page.frames[1:]:
                try:
                    link = frame.get_by_role("link", name=f"{ui.stack.codec_url}/login")
                    if await link.count():
                        return await link.first.get_attribute("href")
                except PlaywrightError:  # the UI re-rendered it meanwhile: look again
                    continue
            return None

        sign_in = await wait_until(sign_in_link, within=20, interval=0.25)
        assert sign_in == f"{ui.stack.codec_url}/login"
        await page.goto(sign_in)
        await expect(page.get_by_label("Codec token")).to_be_visible()
    finally:
        await context.close()
