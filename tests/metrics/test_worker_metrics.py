"""The worker's business metrics, recorded by the real activities against the real
PostgreSQL, sandbox provider and webhook receiver, read back over HTTP as Prometheus
scrapes them."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities import metrics
from activities.payments import PaymentActivities
from admin.clients import add_client
from config.logging import ActivityLoggingInterceptor, fold_into_attempt_line
from config.settings import Settings, venv_bin
from devstack.ports import free_port
from devstack.webhook_receiver import WebhookReceiver
from domain.payments import (
    ChargeInput,
    NotifyInput,
    OpenPaymentInput,
    PaymentInput,
    PaymentRequest,
    PaymentStatus,
    RecordOutcomeInput,
)
from ledger.db import create_engine, session_factory
from ledger.repositories import PaymentRepository
from tests.helpers.history import charge_attempts
from tests.helpers.provider import SandboxProvider
from tests.helpers.temporal import encrypting_data_converter, register_search_attributes
from workflows.payment import WEBHOOK_RETRY, WEBHOOK_START_TO_CLOSE, PaymentWorkflow


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def _payment(client_id: str, payment_method: str = "pm_card_visa") -> PaymentInput:
    key = str(uuid.uuid4())
    request = PaymentRequest(amount=700, currency="EUR", payment_method=payment_method)
    return PaymentInput.for_request(client_id, key, request, "r1")


def _charge(payment: PaymentInput) -> ChargeInput:
    return ChargeInput(
        payment_id=payment.payment_id,
        amount=payment.request.amount,
        currency=payment.request.currency,
        payment_method=payment.request.payment_method,
    )


@pytest.fixture
async def client_id(
    sessions: async_sessionmaker[AsyncSession], webhook_receiver: WebhookReceiver
) -> str:
    async with sessions() as session, session.begin():
        created = await add_client(session, name="metrics", webhook_url=webhook_receiver.url)
    webhook_receiver.secrets.append(created.webhook_secret)
    return created.client_id


@asynccontextmanager
async def served_metrics(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[httpx.AsyncClient]:
    """The worker's metrics server, its ledger gauges read from ``sessions``' database."""
    settings = Settings(worker_metrics_port=free_port(), worker_sdk_metrics_port=0)
    served = metrics.WorkerMetrics.start(settings, sessions)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{settings.worker_metrics_port}"
    ) as http:
        yield http
    await served.stop()


@pytest.fixture
async def scrape(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[httpx.AsyncClient]:
    async with served_metrics(sessions) as http:
        yield http


@pytest.fixture
def own_pending_webhooks(monkeypatch: pytest.MonkeyPatch) -> metrics.PendingWebhooks:
    """The webhook gauges are the process's: every test's deliveries in this process
    land in them, and one left undelivered stays 20 minutes. The test gets an empty
    tally of its own, as a worker process starts with one."""
    pending = metrics.PendingWebhooks()
    monkeypatch.setattr(metrics, "PENDING_WEBHOOKS", pending)
    return pending


async def test_charges_ledger_writes_and_outcomes_are_measured(
    activities: PaymentActivities, sandbox_provider: SandboxProvider, client_id: str
) -> None:
    env = ActivityEnvironment()
    good, declined, flaky = (
        _payment(client_id),
        _payment(client_id, "pm_card_chargeDeclined"),
        _payment(client_id),
    )
    charges_ok = _value(
        "payments_provider_call_duration_seconds_count", operation="charge", result="ok"
    )
    declines = _value(
        "payments_provider_call_duration_seconds_count", operation="charge", result="declined"
    )
    unknown = _value("payments_provider_errors_total", operation="charge", type="outcome_unknown")
    succeeded = _value("payments_outcomes_total", outcome="succeeded", failure_code="")
    failed = _value("payments_outcomes_total", outcome="failed", failure_code="card_declined")
    opens = _value(
        "payments_ledger_write_duration_seconds_count", operation="open_payment", result="ok"
    )

    for payment in (good, declined, flaky):
        await env.run(activities.open_payment, OpenPaymentInput(payment))
    charged = await env.run(activities.charge_payment, _charge(good))
    with pytest.raises(ApplicationError):
        await env.run(activities.charge_payment, _charge(declined))
    await sandbox_provider.set_faults(fail_next=1)
    with pytest.raises(ApplicationError):
        await env.run(activities.charge_payment, _charge(flaky))
    await env.run(
        activities.record_outcome,
        RecordOutcomeInput(good.payment_id, PaymentStatus.SUCCEEDED, charged.charge_id),
    )
    await env.run(
        activities.record_outcome,
        RecordOutcomeInput(declined.payment_id, PaymentStatus.FAILED, failure_code="card_declined"),
    )

    assert (
        _value("payments_provider_call_duration_seconds_count", operation="charge", result="ok")
        == charges_ok + 1
    )
    assert (
        _value(
            "payments_provider_call_duration_seconds_count", operation="charge", result="declined"
        )
        == declines + 1
    )
    # A 500 after a POST may hide a charge: counted as an unknown outcome, not a decline.
    assert (
        _value("payments_provider_errors_total", operation="charge", type="outcome_unknown")
        == unknown + 1
    )
    assert _value("payments_provider_errors_total", operation="charge", type="declined") == 0
    assert _value("payments_outcomes_total", outcome="succeeded", failure_code="") == succeeded + 1
    assert (
        _value("payments_outcomes_total", outcome="failed", failure_code="card_declined")
        == failed + 1
    )
    assert (
        _value(
            "payments_ledger_write_duration_seconds_count", operation="open_payment", result="ok"
        )
        == opens + 3
    )
    assert (
        _value(
            "payments_ledger_write_duration_seconds_count", operation="record_outcome", result="ok"
        )
        >= 2
    )


async def test_a_payment_run_by_the_worker_measures_and_logs_its_local_charge(
    activities: PaymentActivities,
    sandbox_provider: SandboxProvider,
    client_id: str,
    webhook_receiver: WebhookReceiver,
) -> None:
    """The charge runs as a local activity inside the workflow task: its provider call
    is still timed, and it still writes one ``activity.attempt`` line, as before."""
    payment = _payment(client_id)
    charges_ok = _value(
        "payments_provider_call_duration_seconds_count", operation="charge", result="ok"
    )
    charged_before = (await sandbox_provider.stats())["charges_by_key"].get(payment.payment_id, 0)
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_bin("temporal-test-server"),
        data_converter=encrypting_data_converter(),
    )
    try:
        await register_search_attributes(env.client)
        task_queue = f"tq-{uuid.uuid4()}"
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars, fold_into_attempt_line]
        ) as captured:
            async with Worker(
                env.client,
                task_queue=task_queue,
                workflows=[PaymentWorkflow],
                activities=[
                    activities.open_payment,
                    activities.charge_payment,
                    activities.find_charge,
                    activities.record_outcome,
                    activities.notify_webhook,
                ],
                interceptors=[ActivityLoggingInterceptor()],
            ):
                handle = await env.client.start_workflow(
                    PaymentWorkflow.run,
                    payment,
                    id=f"payment-{uuid.uuid4()}",
                    task_queue=task_queue,
                )
                result = await handle.result()
        history = await handle.fetch_history()
    finally:
        await env.shutdown()

    assert result.status is PaymentStatus.SUCCEEDED
    attempts = charge_attempts(history.events)
    assert [(a.outcome, a.local) for a in attempts] == [("completed", True)]
    assert (await sandbox_provider.stats())["charges_by_key"][payment.payment_id] == (
        charged_before + 1
    )
    assert (
        _value("payments_provider_call_duration_seconds_count", operation="charge", result="ok")
        == charges_ok + 1
    )
    lines = [line for line in captured if line["event"] == "activity.attempt"]
    assert [(line["activity"], line["outcome"], line["attempt"]) for line in lines] == [
        ("open_payment", "completed", 1),
        ("charge_payment", "completed", 1),
        ("record_outcome", "completed", 1),
        ("notify_webhook", "completed", 1),
    ]
    charge_line = lines[1]
    assert charge_line["workflow_id"] == handle.id
    # What the charge produced rides on its line; no event name repeats "completed".
    assert charge_line["charge_id"].startswith("ch_")
    assert charge_line["payment_id"] == payment.payment_id
    assert "events" not in charge_line


async def test_an_undelivered_webhook_ages_from_its_first_attempt_until_delivered(
    activities: PaymentActivities,
    webhook_receiver: WebhookReceiver,
    client_id: str,
    scrape: httpx.AsyncClient,
    own_pending_webhooks: metrics.PendingWebhooks,
) -> None:
    payment = _payment(client_id)
    env = ActivityEnvironment()
    await env.run(activities.open_payment, OpenPaymentInput(payment))
    # The activity was first scheduled ten minutes ago: this is a retry.
    env.info = dataclasses.replace(
        env.info, scheduled_time=datetime.now(UTC) - timedelta(minutes=10), attempt=4
    )
    notify = NotifyInput(payment_id=payment.payment_id, event_type="payment.succeeded")
    failed_before = _value("payments_webhook_delivery_attempts_total", result="failed")
    delivered_before = _value("payments_webhook_delivery_attempts_total", result="delivered")

    webhook_receiver.respond_with = 503
    try:
        with pytest.raises(ApplicationError):
            await env.run(activities.notify_webhook, notify)
    finally:
        webhook_receiver.respond_with = 204

    scraped = await _scraped(scrape)
    assert scraped["payments_webhook_delivery_attempts_total", ("result", "failed")] == (
        failed_before + 1
    )
    assert scraped["payments_webhook_undelivered", ()] == 1
    assert 600 <= scraped["payments_webhook_oldest_undelivered_age_seconds", ()] < 700

    await env.run(activities.notify_webhook, notify)
    scraped = await _scraped(scrape)
    assert scraped["payments_webhook_delivery_attempts_total", ("result", "delivered")] == (
        delivered_before + 1
    )
    assert scraped["payments_webhook_undelivered", ()] == 0
    assert scraped["payments_webhook_oldest_undelivered_age_seconds", ()] == 0


async def test_the_ledger_gauges_report_the_oldest_processing_payment(
    own_database_url: str,
) -> None:
    """Read from a database of the test's own: the gauges count the whole ledger, which
    every other test writes to."""
    engine = create_engine(Settings(database_url=own_database_url))
    sessions = session_factory(engine)
    try:
        async with sessions() as session, session.begin():
            client = await add_client(session, name="gauges", webhook_url=None)
            repository = PaymentRepository(session)
            await repository.open(_payment(client.client_id))
            await repository.open(_payment(client.client_id))
        async with served_metrics(sessions) as scrape:
            await metrics.refresh_ledger_gauges_once(sessions)
            scraped = await _scraped(scrape)
    finally:
        await engine.dispose()
    assert scraped["payments_processing", ()] == 2
    assert 0 < scraped["payments_processing_oldest_age_seconds", ()] < 60


def test_a_pending_delivery_is_forgotten_only_after_the_longest_retry_gap() -> None:
    assert WEBHOOK_RETRY.maximum_interval is not None
    longest_gap = WEBHOOK_RETRY.maximum_interval + WEBHOOK_START_TO_CLOSE
    assert longest_gap < metrics.WEBHOOK_PENDING_STALE_AFTER
    pending = metrics.PendingWebhooks(stale_after=timedelta(seconds=0))
    pending.attempt_started("evt_1", datetime.now(UTC) - timedelta(minutes=5))
    assert pending.count() == 0  # stale at once with a zero horizon
    fresh = metrics.PendingWebhooks()
    fresh.attempt_started("evt_1", datetime.now(UTC) - timedelta(minutes=5))
    fresh.attempt_started("evt_2", datetime.now(UTC) - timedelta(minutes=1))
    assert 299 < fresh.oldest_age_seconds() < 310
    fresh.delivered("evt_1")
    assert 59 < fresh.oldest_age_seconds() < 70
    fresh.delivered("evt_2")
    assert fresh.oldest_age_seconds() == 0


async def _scraped(http: httpx.AsyncClient) -> dict[tuple[str, tuple[str, ...]], float]:
    """Samples by (name, flattened sorted labels), as Prometheus would scrape them."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(part for item in sorted(sample.labels.items()) for part in item)): (
            sample.value
        )
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
