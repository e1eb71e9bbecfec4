"""The worker: runs PaymentWorkflow and its activities on the ``payments`` task queue.

SIGTERM or SIGINT stops polling, lets running activities finish within
``graceful_shutdown_timeout`` and exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import httpx
import structlog
from temporalio.client import Client
from temporalio.worker import Worker

from activities.metrics import (
    WorkerMetrics,
    install_sdk_runtime,
    report_suppressed_core_warnings,
)
from activities.payments import PaymentActivities
from activities.provider_client import ProviderClient
from activities.refunds import RefundActivities
from activities.webhooks import WebhookSender
from config.gc_tuning import tune_garbage_collector
from config.logging import ActivityLoggingInterceptor, configure_logging
from config.settings import Settings
from config.temporal import connect_temporal
from ledger.db import create_engine, session_factory
from ledger.payment_sql import PooledPaymentLedger
from workflows.payment import PaymentWorkflow
from workflows.refund import RefundWorkflow

log = structlog.get_logger("worker")

GRACEFUL_SHUTDOWN = timedelta(seconds=20)


async def run_worker(settings: Settings, *, tune_gc: bool = False) -> None:
    engine = create_engine(settings)
    provider = ProviderClient(
        base_url=settings.provider_url,
        api_key=settings.provider_api_key.get_secret_value(),
        timeout_seconds=settings.provider_timeout_seconds,
    )
    webhook_http = httpx.AsyncClient(
        timeout=settings.webhook_timeout_seconds, follow_redirects=False
    )
    webhooks = WebhookSender(webhook_http, allow_loopback=settings.webhook_allow_loopback)
    ledger = PooledPaymentLedger.create(
        settings.database_url,
        size=settings.database_pool_size + settings.database_max_overflow,
        timeout=settings.database_pool_timeout_seconds,
    )
    await ledger.open()
    activities = PaymentActivities(ledger, provider, webhooks)
    install_sdk_runtime(settings)  # before the client: it uses the default runtime
    refunds = RefundActivities(session_factory(engine), provider)
    client: Client = await connect_temporal(settings)
    worker = Worker(
        client,
        task_queue=settings.temporal_task_queue,
        workflows=[PaymentWorkflow, RefundWorkflow],
        activities=[
            activities.open_payment,
            activities.charge_payment,
            activities.find_charge,
            activities.record_outcome,
            activities.notify_webhook,
            refunds.open_refund,
            refunds.refund_at_provider,
            refunds.record_refund_outcome,
        ],
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        interceptors=[ActivityLoggingInterceptor()],
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    metrics = WorkerMetrics.start(settings, session_factory(engine))
    if tune_gc:  # only where the worker is the process (it freezes every live object)
        tune_garbage_collector()
    log.info("worker.started", task_queue=settings.temporal_task_queue)
    async with worker:
        await stop.wait()
        log.info("worker.stopping", drain_seconds=GRACEFUL_SHUTDOWN.total_seconds())
    report_suppressed_core_warnings()
    await metrics.stop()
    await provider.aclose()
    await webhook_http.aclose()
    await ledger.close()
    await engine.dispose()
    log.info("worker.stopped")


def main() -> int:
    # The workflow sandbox imports the workflow modules afresh for every run it starts;
    # without a cached .pyc (PYTHONDONTWRITEBYTECODE, a read-only checkout) each import
    # compiles them from source: 6 % of the worker's CPU in the storm benchmark.
    sys.dont_write_bytecode = False
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, environment=settings.environment)
    _run_on_uvloop(run_worker(settings, tune_gc=True))
    return 0


def _run_on_uvloop(coroutine: Coroutine[Any, Any, None]) -> None:
    """As the API runs; asyncio's own loop where uvloop is not installed (Windows)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
