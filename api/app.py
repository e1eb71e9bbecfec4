"""The API application factory: ``uvicorn api.app:create_app --factory``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request, Response

from api.auth import ApiKeyAuthenticator
from api.payments import PaymentService
from api.problems import install_problem_handlers
from api.refunds import RefundService
from api.routes import payments, refunds
from config.logging import configure_logging
from config.settings import Settings
from config.temporal import connect_temporal
from ledger.db import create_engine, session_factory

log = structlog.get_logger("api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        sessions = session_factory(engine)
        # Lazy: the API starts (and answers 503) even while Temporal is down.
        temporal = await connect_temporal(settings, lazy=True)
        app.state.settings = settings
        app.state.authenticator = ApiKeyAuthenticator(sessions, settings.api_key_cache_seconds)
        app.state.payments = PaymentService(sessions, temporal, settings.temporal_task_queue)
        app.state.refunds = RefundService(sessions, temporal, settings.temporal_task_queue)
        yield
        await engine.dispose()

    app = FastAPI(
        title="Payments API",
        version="1.0.0",
        description=(
            "Every payment is a Temporal workflow: a retried, duplicated or concurrent "
            "request with the same Idempotency-Key never charges twice."
        ),
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.include_router(payments.router)
    app.include_router(refunds.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.middleware("http")
    async def access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        structlog.contextvars.clear_contextvars()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-Id"] = request_id
        if request.url.path != "/healthz":
            log.info(
                "http.request",
                method=request.method,
                path=request.url.path,
                status=response.status_code,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return response

    return app
