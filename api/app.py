"""The API application factory: ``uvicorn api.app:create_app --factory``; ``python -m api``
serves ``create_served_app``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from api.access_log import AccessLogMiddleware, RequestLines, log_shed_summary
from api.admission import AdmissionGate, install_admission
from api.admission_board import AdmissionBoard
from api.auth import ApiKeyAuthenticator
from api.backlog import BacklogGate, StartSlots, processing_counter
from api.codec_server import create_codec_app
from api.limits import BodyLimitMiddleware
from api.metrics import (
    ADMISSION_WAITING,
    BACKLOG_WAITING,
    READ_POOL_IN_USE,
    READ_POOL_WAITING,
    STARTS_IN_FLIGHT,
    install_metrics,
    watch_event_loop,
)
from api.openapi import install_openapi
from api.payments import PaymentService
from api.problems import install_problem_handlers
from api.ratelimit import RateLimiter
from api.refunds import RefundService
from api.routes import payments, refunds
from config.gc_tuning import tune_garbage_collector
from config.logging import LineSampler, configure_logging
from config.settings import Settings
from config.temporal import connect_temporal
from ledger.db import autocommit_session_factory, create_engine, session_factory
from ledger.outcomes import OutcomeListener
from ledger.payment_sql import PooledPaymentLedger
from ledger.reads import PooledApiKeyReads, PooledPaymentReads

log = structlog.get_logger("api")


def create_served_app() -> FastAPI:
    """The factory ``python -m api`` serves: the app, with the garbage collector tuned
    once it has started. Not for an app run inside another process (the tests'): the
    tuning freezes every object alive at that moment, that process's own included."""
    return create_app(tune_gc=True)


def create_app(settings: Settings | None = None, *, tune_gc: bool = False) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format, environment=settings.environment)
    shed_lines = LineSampler(settings.api_shed_log_lines_per_second)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        sessions = session_factory(engine)
        reads = autocommit_session_factory(engine)
        # Lazy: the API starts (and answers 503) even while Temporal is down.
        temporal = await connect_temporal(settings, lazy=True)
        app.state.settings = settings
        lookups = PooledPaymentReads.create(
            settings.database_url,
            size=settings.database_read_pool_size,
            min_size=settings.database_read_pool_min_size,
            timeout=settings.database_pool_timeout_seconds,
        )
        await lookups.open()
        app.state.authenticator = ApiKeyAuthenticator(
            PooledApiKeyReads(lookups.pool),
            settings.api_key_cache_seconds,
            # A quarter of the read pool at most waits on keys looked up one by one.
            max_lookups=max(1, settings.database_read_pool_size // 4),
        )
        # Loaded once before the first request, then kept.
        await app.state.authenticator.mirror_active_keys(settings.api_key_mirror_size)
        key_mirror = asyncio.create_task(
            app.state.authenticator.keep_mirrored(settings.api_key_mirror_size),
            name="api-key-mirror",
        )
        outcomes = OutcomeListener(settings.database_url)
        await outcomes.start()
        backlog = BacklogGate(processing_counter(reads), settings.api_max_processing_payments)
        BACKLOG_WAITING.set_function(lambda: backlog.queued)
        READ_POOL_IN_USE.set_function(lambda: lookups.load()[0])
        READ_POOL_WAITING.set_function(lambda: lookups.load()[1])
        start_slots = StartSlots(settings.api_max_concurrent_starts)
        # Requests whose wait ran out leave through a line of their own, as many per
        # turn as new payments come in (PaymentService says why).
        expired_waits = AdmissionGate(settings.api_admissions_per_turn, remembered_keys=0)
        app.state.expired_waits = expired_waits
        app.state.start_slots = start_slots
        app.state.payments = PaymentService(
            sessions,
            temporal,
            settings.temporal_task_queue,
            outcomes=outcomes,
            backlog=backlog,
            reads=reads,
            lookups=lookups,
            ledger=PooledPaymentLedger(lookups.pool),
            start_slots=start_slots,
            expired_waits=expired_waits,
        )
        STARTS_IN_FLIGHT.set_function(lambda: app.state.payments.starts_in_flight)
        app.state.rate_limiter = RateLimiter(
            settings.api_rate_limit_per_second, settings.api_rate_limit_burst
        )
        app.state.refunds = RefundService(sessions, temporal, settings.temporal_task_queue)
        loop_watch = asyncio.create_task(watch_event_loop(), name="event-loop-watch")
        if tune_gc:
            # Full collections ten times rarer than CPython's default: each stopped the
            # loop, and every request on it, for 140-570 ms in the storm benchmark.
            tune_garbage_collector(full_collection_every=100)
        yield
        loop_watch.cancel()
        key_mirror.cancel()
        await backlog.close()
        log_shed_summary(shed_lines, force=True)
        await outcomes.stop()
        await lookups.close()
        await engine.dispose()
        if board is not None:
            board.close()

    app = FastAPI(
        title="Payments API",
        version="1.0.0",
        description=(
            "Every payment is a Temporal workflow: a retried, duplicated or concurrent "
            "request with the same Idempotency-Key never charges twice."
        ),
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry, off: nothing here configures a provider (the
        # metrics are Prometheus', on /metrics), and asking per request whether one is
        # reads the environment, 3.6 us a request against 0.1 us when off.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_problem_handlers(app)
    install_openapi(app)
    # Every route: /codec bounds its own (larger payload batches, a small sign-in form).
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.api_max_body_bytes,
        json_only_under="/v1/",
        exempt=("/codec",),
    )
    install_metrics(app)
    app.include_router(payments.router)
    app.mount("/codec", create_codec_app(settings))
    app.include_router(refunds.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    admission = AdmissionGate(settings.api_admissions_per_turn, settings.api_remembered_keys)
    app.state.admission = admission
    ADMISSION_WAITING.set_function(lambda: admission.waiting)
    request_lines = RequestLines(shed_lines)
    # Several API processes on this host: the keys each is admitting, shared.
    board = (
        AdmissionBoard.attach(settings.api_admission_board)
        if settings.api_admission_board is not None
        else None
    )
    # Added last, so outermost of the middleware: its line covers every other layer,
    # errors included.
    app.add_middleware(AccessLogMiddleware, lines=request_lines)
    # Around all of it, the metrics' layer included: api/admission.py says why.
    install_admission(app, admission, settings.api_wait_seconds, request_lines, board)

    return app
