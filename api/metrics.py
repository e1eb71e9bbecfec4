"""Prometheus metrics of the API, served at ``/metrics``.

Requests are counted by route *template* (``/v1/payments/{payment_id}``), never by
raw path, so a scan of random URLs cannot blow up the number of series: a request
that matches no route is counted under ``route="unmatched"``.

Each API process keeps its own counters and serves them on its own ``/metrics``:
with several uvicorn workers or replicas, scrape every process (Prometheus adds
them up with ``sum by (...)``). No multiprocess mode: one process per port keeps it
simple and is what ``make run``, the compose file and Kubernetes run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.arrival import arrived_at
from api.problems import TYPE_BASE

log = structlog.get_logger("api")

UNMATCHED_ROUTE = "unmatched"
IDEMPOTENCY_CONFLICT_TYPE = TYPE_BASE + "idempotency-key-reused"

REQUESTS = Counter(
    "payments_api_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "payments_api_request_duration_seconds",
    "Time from receiving a request to its response, by method, route template and status.",
    ["method", "route", "status"],
    # The API waits up to api_wait_seconds (5 s by default) for an outcome.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0),
)
IDEMPOTENT_REPLAYS = Counter(
    "payments_api_idempotent_replays",
    "Responses that replayed an earlier request with the same Idempotency-Key "
    "(header Idempotent-Replayed: true).",
    ["route"],
)
IDEMPOTENCY_CONFLICTS = Counter(
    "payments_api_idempotency_conflicts",
    "422 answers: an Idempotency-Key reused with a different request body.",
    ["route"],
)
RATE_LIMITED = Counter(
    "payments_api_rate_limited",
    "Requests refused with 429 by the per-client rate limiter.",
)


BACKLOG_REFUSED = Counter(
    "payments_api_backlog_refused",
    "New payments answered 503 payments-backlog-full: the payments awaiting their "
    "outcome were at PAYMENTS_API_MAX_PROCESSING_PAYMENTS for the request's whole wait.",
)
STARTS_IN_FLIGHT = Gauge(
    "payments_api_starts_in_flight",
    "Starts of payment runs this API process has sent to Temporal and not yet had answered.",
)
ADMISSION_WAITING = Gauge(
    "payments_api_admission_waiting",
    "New payment requests waiting in this API process for their turn to be let in "
    "(api/admission.py).",
)
BACKLOG_WAITING = Gauge(
    "payments_api_backlog_waiting",
    "New payments waiting in this API process for room in the backlog.",
)


API_KEY_READS = Counter(
    "payments_api_key_reads",
    "Reads of API keys from the database by this API process, by kind: mirror (every "
    "active key, reloaded periodically), newest (the newest keys, for a key not in memory "
    "while memory holds every active key; one read shared by all such requests), "
    "by_hash (one key, only while memory does not hold every active key).",
    ["kind"],
)
READ_POOL_IN_USE = Gauge(
    "payments_api_read_pool_in_use",
    "Connections of this API process's read pool (PAYMENTS_DATABASE_READ_POOL_SIZE) "
    "lent out to requests' idempotency reads.",
)
READ_POOL_WAITING = Gauge(
    "payments_api_read_pool_waiting",
    "Requests of this API process waiting for a connection of its read pool; past "
    "PAYMENTS_DATABASE_POOL_TIMEOUT_SECONDS a waiting request is answered 503.",
)

LOOP_WATCH_INTERVAL_SECONDS = 0.25
EVENT_LOOP_LAG = Histogram(
    "payments_api_event_loop_lag_seconds",
    f"How late this API process's event loop ran a timer due every "
    f"{LOOP_WATCH_INTERVAL_SECONDS} s: time it was busy or without a CPU. Every request "
    "waiting on the loop (its database round trips included) waits this long too.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
# A stall this long gets a log line of its own: a request's pooled connection is held
# across it, so stalls of seconds show up as slow answers and pool timeouts (503).
LOOP_STALL_LOG_SECONDS = 1.0


async def watch_event_loop(
    interval: float = LOOP_WATCH_INTERVAL_SECONDS, stall: float = LOOP_STALL_LOG_SECONDS
) -> None:
    """Runs for the app's lifetime: measures the loop's lag, logs the stalls."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - due)
        EVENT_LOOP_LAG.observe(lag)
        if lag >= stall:
            log.warning("api.event_loop_stalled", lag_ms=round(lag * 1000))


def record_backlog_refused() -> None:
    """Tells a full backlog (by design) apart from the other 503s (a dependency down)."""
    BACKLOG_REFUSED.inc()


def record_rate_limited() -> None:
    """The rate limiter calls this once per request it refuses with 429.

    Every 429 is also counted in ``payments_api_requests_total{status="429"}``
    whoever produced it; this counter says the limiter did.
    """
    RATE_LIMITED.inc()


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


def _is_idempotency_conflict(body: bytes) -> bool:
    try:
        problem: Any = json.loads(body)
    except ValueError:
        return False
    return isinstance(problem, dict) and problem.get("type") == IDEMPOTENCY_CONFLICT_TYPE


# The counter's and the histogram's series by (method, route, status), looked up once:
# ``labels()`` checks and locks on every call, 3 of the 5 us a request's counting cost.
# Bounded as the series are: by the routes' templates, the methods and the statuses.
_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def count_request(method: str, route: str, status: int, started: float) -> None:
    """One answered request; ``started``: its arrival (``time.perf_counter``)."""
    series = _series.get((method, route, status))
    if series is None:
        labels = (method, route, str(status))
        series = _series[(method, route, status)] = (
            REQUESTS.labels(*labels),
            REQUEST_DURATION.labels(*labels),
        )
    series[0].inc()
    series[1].observe(time.perf_counter() - started)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it sees the status and headers as they are
    sent, and the body only of a 422, to tell an idempotency conflict apart."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = arrived_at(scope)
        status = 500  # what the client gets if the app raises before answering
        replayed = False
        conflict_body = bytearray()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, replayed
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"idempotent-replayed" and value.lower() == b"true":
                        replayed = True
            elif message["type"] == "http.response.body" and status == 422:
                conflict_body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template(scope)
            count_request(scope["method"], route, status, started)
            if replayed:
                IDEMPOTENT_REPLAYS.labels(route).inc()
            if status == 422 and _is_idempotency_conflict(bytes(conflict_body)):
                IDEMPOTENCY_CONFLICTS.labels(route).inc()


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> None:
    """``/metrics`` plus the middleware that counts every request.

    The middleware wraps the whole stack, outside every middleware added before or
    after this call (a rate limiter's 429, the error handler's 500), so it counts
    what the client really got.
    """
    build_stack = app.build_middleware_stack

    def build_stack_with_metrics() -> ASGIApp:
        return MetricsMiddleware(build_stack())

    app.build_middleware_stack = build_stack_with_metrics  # type: ignore[method-assign]
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
