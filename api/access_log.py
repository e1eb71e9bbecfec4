"""One canonical log line per HTTP request, with the request id echoed back.

Except for requests turned away under load (429, 503, and a 409 for a repeat of a
request still queued: nothing was done, the client retries): beyond a few such lines
a second (PAYMENTS_API_SHED_LOG_LINES_PER_SECOND) they are counted instead, and one
``http.requests_shed`` line a second gives the counts. In the storm benchmark 23,000
of 30,000 requests were turned away, and their lines were most of the API's log,
1.4 KB per payment on their own; the metrics (``payments_api_backlog_refused_total``,
the 429 counter) still count every one.

Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs
every request in a task group of its own with a streamed body, about 15 % of the API's
CPU in the storm benchmark's profile. Here the app runs in the request's own task, so
the fields a handler binds (the client) are on this line without any copying.
"""

from __future__ import annotations

import secrets
import time

import structlog
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.arrival import arrived_at
from config.logging import (
    LineSampler,
    start_request_context,
    usable_request_id,
)

log = structlog.get_logger("api")

# Load balancer probes: answered, never logged.
UNLOGGED_PATHS = frozenset({"/healthz"})


# Statuses of requests turned away before anything was done; a problem of another
# status that is turned away too binds the request field ``turned_away`` to its cause.
SHED_STATUSES = frozenset({429, 503})


def log_shed_summary(sampler: LineSampler, *, force: bool = False) -> None:
    summary = sampler.take_summary(force=force)
    if summary is not None:
        # Its own line, not any one request's: none of the request's fields.
        structlog.contextvars.clear_contextvars()
        log.info("http.requests_shed", suppressed=summary, total=sum(summary.values()))


def new_request_id() -> str:
    """64 random bits, hex: unique enough to find one request's lines among a day's
    (and 16 bytes shorter on every line than a UUID)."""
    return secrets.token_hex(8)


class RequestLines:
    """Each request's canonical line: begun before the app sees the request, written
    once it is answered. The access-log middleware uses it, and so does the admission
    line for the repeats it answers before the middleware's turn (api/admission.py)."""

    def __init__(self, shed_lines: LineSampler | None = None) -> None:
        self.shed_lines = shed_lines

    def begin(self, scope: Scope) -> tuple[str, dict[str, object]]:
        """The request's id (the caller's X-Request-Id if usable) and the line's fields,
        bound for every line logged while the request is handled."""
        offered_id = key = None
        # One pass over the raw headers, the first of each as Starlette's Headers reads
        # them: 3.5 of a repeat's 6 us here went to building Headers and two lookups.
        for name, value in scope["headers"]:
            if name == b"x-request-id" and offered_id is None:
                offered_id = value.decode("latin-1")
            elif name == b"idempotency-key" and key is None:
                key = value.decode("latin-1")
        request_id = usable_request_id(offered_id) or new_request_id()
        if key:
            return request_id, start_request_context(
                request_id=request_id, idempotency_key=key[:255]
            )
        return request_id, start_request_context(request_id=request_id)

    def write(self, scope: Scope, status: int, fields: dict[str, object], started: float) -> None:
        """``started``: the request's arrival (``time.perf_counter``)."""
        if scope["path"] not in UNLOGGED_PATHS and self._wanted(status, fields):
            structlog.contextvars.bind_contextvars(**fields)
            log.info(
                "http.request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
        if self.shed_lines is not None:
            log_shed_summary(self.shed_lines)

    def _wanted(self, status: int, fields: dict[str, object]) -> bool:
        # A 409 in progress (a repeat of a request still queued for room) is turned away
        # too: the client retries after Retry-After and nothing was done for it.
        turned_away = fields.get("turned_away")
        if self.shed_lines is None or (status not in SHED_STATUSES and turned_away is None):
            return True
        if status == 429:
            cause = "rate_limited"
        else:
            cause = str(turned_away or fields.get("unavailable", "unavailable"))
        return self.shed_lines.admit(f"{status} {cause}")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, lines: RequestLines) -> None:
        self.app = app
        self.lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = arrived_at(scope)
        request_id, fields = self.lines.begin(scope)
        status = 500  # what the client gets if the app dies before answering

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            self.lines.write(scope, status, fields, started)
