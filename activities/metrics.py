"""The worker's metrics: the SDK's own (Temporal Core's Prometheus exporter) and ours.

Two HTTP endpoints per worker process, because the SDK's exporter owns its port:

- ``worker_sdk_metrics_port``: ``temporal_*`` metrics (workflow and activity task
  latencies, failures, slots, sticky cache, ...), served by Temporal Core.
- ``worker_metrics_port``: the business metrics below, served by prometheus-client.

Business metrics are recorded where the work happens (activities call the small
helpers here), except the two ledger gauges, which a background task reads from
PostgreSQL: every worker reports the same value, so alerts take ``max()``.

The age of the oldest undelivered webhook is tracked in memory: a delivery joins
the pending set when an attempt starts and leaves it when the receiver takes it.
Its age counts from the activity's first scheduled time (the same on every retry,
whichever worker runs it), so a restarted worker or another worker learns the true
age again at the next attempt. An entry no attempt has refreshed for longer than
the webhook retry policy's longest back-off is dropped (its retries moved to
another worker, or the workflow gave up). Chosen over a table because no table
records deliveries, and over Temporal visibility because pending activities are
not searchable there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from activities.provider_client import (
    ProviderDeclined,
    ProviderInvalidRequest,
    ProviderUnavailable,
)
from config.gc_tuning import GC_PAUSE
from config.logging import LineSampler
from config.settings import Settings
from domain.payments import Payment
from ledger.stats import LedgerStatsRepository

log = structlog.get_logger(__name__)

# Longer than WEBHOOK_RETRY.maximum_interval (15 min) + WEBHOOK_START_TO_CLOSE (30 s)
# in workflows/payment.py: a delivery still being retried is seen again within it.
WEBHOOK_PENDING_STALE_AFTER = timedelta(minutes=20)
LEDGER_GAUGES_INTERVAL = timedelta(seconds=15)

# Our own registry: the API process imports this module too (through the workflow
# module) and must not serve the worker's metrics on its /metrics.
REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, GC_PAUSE):
    REGISTRY.register(_collector)

PAYMENTS = Counter(
    "payments_outcomes",
    "Payments recorded in the ledger with their outcome, by outcome and failure code.",
    ["outcome", "failure_code"],
    registry=REGISTRY,
)
PROVIDER_CALL_DURATION = Histogram(
    "payments_provider_call_duration_seconds",
    "Calls to the payment provider, by operation (charge, find_charge, refund) and result.",
    ["operation", "result"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
PROVIDER_ERRORS = Counter(
    "payments_provider_errors",
    "Provider calls that failed, by operation and type (unavailable: nothing happened; "
    "outcome_unknown: money may have moved; invalid_request). Declines are not errors.",
    ["operation", "type"],
    registry=REGISTRY,
)
LEDGER_WRITE_DURATION = Histogram(
    "payments_ledger_write_duration_seconds",
    "Ledger transactions, by operation and result.",
    ["operation", "result"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
WEBHOOK_ATTEMPTS = Counter(
    "payments_webhook_delivery_attempts",
    "Webhook delivery attempts, by result (delivered, failed).",
    ["result"],
    registry=REGISTRY,
)


class PendingWebhooks:
    """Deliveries not taken by their receiver yet, with the time each was first scheduled.

    Read by the metrics server's thread, written by the event loop: hence the lock.
    """

    def __init__(self, stale_after: timedelta = WEBHOOK_PENDING_STALE_AFTER) -> None:
        self._stale_after = stale_after.total_seconds()
        self._lock = threading.Lock()
        # event id -> (first scheduled, unix seconds; last attempt seen, monotonic seconds)
        self._pending: dict[str, tuple[float, float]] = {}

    def attempt_started(self, event_id: str, first_scheduled: datetime) -> None:
        with self._lock:
            self._pending[event_id] = (first_scheduled.timestamp(), time.monotonic())

    def delivered(self, event_id: str) -> None:
        with self._lock:
            self._pending.pop(event_id, None)

    def _live(self) -> list[float]:
        horizon = time.monotonic() - self._stale_after
        with self._lock:
            for event_id in [e for e, (_, seen) in self._pending.items() if seen < horizon]:
                del self._pending[event_id]
            return [first for first, _ in self._pending.values()]

    def count(self) -> int:
        return len(self._live())

    def oldest_age_seconds(self) -> float:
        firsts = self._live()
        return max(0.0, time.time() - min(firsts)) if firsts else 0.0


PENDING_WEBHOOKS = PendingWebhooks()
# Both read the module's PENDING_WEBHOOKS when scraped, not the instance of import time:
# a test gives itself an empty one, so no other test's deliveries reach its figures.
Gauge(
    "payments_webhook_undelivered",
    "Webhook deliveries this worker has attempted and not delivered yet.",
    registry=REGISTRY,
).set_function(lambda: float(PENDING_WEBHOOKS.count()))
Gauge(
    "payments_webhook_oldest_undelivered_age_seconds",
    "Age of the oldest webhook this worker has attempted and not delivered yet, "
    "counted from its first scheduled attempt (0 when none).",
    registry=REGISTRY,
).set_function(lambda: PENDING_WEBHOOKS.oldest_age_seconds())


@dataclass
class _LedgerFigures:
    processing: int = 0
    oldest_processing: datetime | None = None

    def oldest_age_seconds(self) -> float:
        if self.oldest_processing is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - self.oldest_processing).total_seconds())


_LEDGER = _LedgerFigures()
Gauge(
    "payments_processing",
    "Payments not terminal yet in the ledger (read every 15 s).",
    registry=REGISTRY,
).set_function(lambda: float(_LEDGER.processing))
Gauge(
    "payments_processing_oldest_age_seconds",
    "How long the oldest non-terminal payment in the ledger has been processing (0 when none).",
    registry=REGISTRY,
).set_function(_LEDGER.oldest_age_seconds)


# -- helpers the activities call ------------------------------------------------------


def payment_recorded(payment: Payment) -> None:
    if payment.status.is_terminal:
        PAYMENTS.labels(str(payment.status), payment.failure_code or "").inc()


@contextlib.contextmanager
def provider_call(operation: str) -> Iterator[None]:
    """Time one provider call and count its error, if any, by type."""
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    except ProviderDeclined:
        result = "declined"
        raise
    except ProviderInvalidRequest:
        result = "invalid_request"
        raise
    except ProviderUnavailable as exc:
        result = "outcome_unknown" if exc.outcome_unknown else "unavailable"
        raise
    finally:
        PROVIDER_CALL_DURATION.labels(operation, result).observe(time.perf_counter() - started)
        if result not in ("ok", "declined"):
            PROVIDER_ERRORS.labels(operation, result).inc()


@contextlib.contextmanager
def ledger_write(operation: str) -> Iterator[None]:
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    finally:
        LEDGER_WRITE_DURATION.labels(operation, result).observe(time.perf_counter() - started)


@contextlib.contextmanager
def webhook_delivery(event_id: str) -> Iterator[None]:
    """One delivery attempt: pending until the receiver takes it."""
    first_scheduled = activity.info().scheduled_time if activity.in_activity() else None
    if first_scheduled is None or first_scheduled.timestamp() <= 0:
        first_scheduled = datetime.now(UTC)  # unknown (the SDK's test environment says 1970)
    PENDING_WEBHOOKS.attempt_started(event_id, first_scheduled)
    try:
        yield
    except BaseException:
        WEBHOOK_ATTEMPTS.labels("failed").inc()
        raise
    WEBHOOK_ATTEMPTS.labels("delivered").inc()
    PENDING_WEBHOOKS.delivered(event_id)


# -- worker process set-up --------------------------------------------------------------


class _CoreLogFields(logging.Filter):
    """A forwarded core record carries the core's entry object, which the JSON
    renderer would print as ``<builtins.BufferedLogEntry …>``: keep its target."""

    def filter(self, record: logging.LogRecord) -> bool:
        entry = record.__dict__.pop("temporal_log", None)
        if entry is not None:
            record.core_target = entry.target
        return True


CORE_LOGGER = logging.getLogger("temporalio.core")
CORE_LOGGER.addFilter(_CoreLogFields())

_CORE_WARNING_CODE = re.compile(r"\[(TMPRL\d+)\]")


class _SampleRepeatedCoreWarnings(logging.Filter):
    """The core's coded warnings, "[TMPRL1104] <run>:<event>:<attempt> Workflow task
    duration exceeded 5 seconds" above all, come once per slow workflow task: when the
    worker is behind, for most runs, each line saying the same of another run (1,249
    lines, 93 bytes per payment, in a storm benchmark run). A few a second are written;
    the rest are counted by code and reported on one ``sdk.warnings_suppressed`` line
    with the next warning after the second is over, and at shutdown. Lines without a
    code are all written."""

    def __init__(self, sampler: LineSampler) -> None:
        super().__init__()
        self._sampler = sampler

    def filter(self, record: logging.LogRecord) -> bool:
        self.report()
        code = _CORE_WARNING_CODE.match(record.getMessage())
        return code is None or self._sampler.admit(code.group(1))

    def report(self, *, force: bool = False) -> None:
        summary = self._sampler.take_summary(force=force)
        if summary is not None:
            log.warning("sdk.warnings_suppressed", suppressed=summary, total=sum(summary.values()))


_core_warnings: _SampleRepeatedCoreWarnings | None = None


def report_suppressed_core_warnings() -> None:
    """At shutdown: the counts of the current second too."""
    if _core_warnings is not None:
        _core_warnings.report(force=True)


def core_logging(core_level: str = "WARN") -> LoggingConfig:
    """The SDK core's own log lines (Rust: "workflow task duration exceeded 5 seconds"
    and the like), forwarded to the ``temporalio.core`` logger. Left to itself the
    core writes them to stderr as coloured console text, the one kind of line in the
    worker's log that was not JSON; forwarded, they go through our processor chain."""
    return LoggingConfig(
        filter=TelemetryFilter(core_level=core_level, other_level="ERROR"),
        # One logger (the core's target becomes a field); the extra fields (payload
        # sizes and counts, mostly zeros) would more than double each line.
        forwarding=LogForwardingConfig(
            logger=CORE_LOGGER,
            append_target_to_name=False,
            prepend_target_on_message=False,
            append_log_fields_to_message=False,
        ),
    )


def install_sdk_runtime(settings: Settings) -> None:
    """Make the SDK's default runtime forward the core's logs and, when a port is
    set, export its metrics for Prometheus.

    Call before the first Temporal client is created: clients use the default runtime.
    """
    global _core_warnings
    if _core_warnings is None:
        _core_warnings = _SampleRepeatedCoreWarnings(
            LineSampler(settings.worker_core_warning_lines_per_second)
        )
        CORE_LOGGER.addFilter(_core_warnings)
    metrics: PrometheusConfig | None = None
    bind = f"{settings.metrics_host}:{settings.worker_sdk_metrics_port}"
    if settings.worker_sdk_metrics_port:
        metrics = PrometheusConfig(bind_address=bind)
    try:
        runtime = Runtime(telemetry=TelemetryConfig(logging=core_logging(), metrics=metrics))
    except Exception as exc:
        if metrics is None:
            raise
        # Payments matter more than their metrics: run on, loudly, without them.
        log.error("metrics.sdk_unavailable", address=bind, error=str(exc))
        metrics = None
        runtime = Runtime(telemetry=TelemetryConfig(logging=core_logging()))
    Runtime.set_default(runtime, error_if_already_set=True)
    if metrics is not None:
        log.info("metrics.sdk_serving", address=bind)


class WorkerMetrics:
    """The business metrics' HTTP server and the task that refreshes the ledger gauges."""

    def __init__(self, server: WSGIServer | None, refresher: asyncio.Task[None]) -> None:
        self._server = server
        self._refresher = refresher

    @classmethod
    def start(cls, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> WorkerMetrics:
        server = None
        if settings.worker_metrics_port:
            try:
                server, _ = start_http_server(
                    settings.worker_metrics_port, settings.metrics_host, registry=REGISTRY
                )
            except OSError as exc:
                log.error("metrics.unavailable", port=settings.worker_metrics_port, error=str(exc))
            else:
                log.info(
                    "metrics.serving",
                    address=f"{settings.metrics_host}:{settings.worker_metrics_port}",
                )
        return cls(server, asyncio.create_task(_refresh_ledger_gauges(sessions)))

    async def stop(self) -> None:
        self._refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._refresher
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()


async def refresh_ledger_gauges_once(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        summary = await LedgerStatsRepository(session).processing_summary()
    _LEDGER.processing = summary.count
    _LEDGER.oldest_processing = summary.oldest_created_at


async def _refresh_ledger_gauges(sessions: async_sessionmaker[AsyncSession]) -> None:
    while True:
        try:
            await refresh_ledger_gauges_once(sessions)
        except (SQLAlchemyError, OSError) as exc:
            # The gauges keep their last value; the ledger's own alerts say it is down.
            log.warning("metrics.ledger_gauges_failed", error=type(exc).__name__)
        await asyncio.sleep(LEDGER_GAUGES_INTERVAL.total_seconds())
