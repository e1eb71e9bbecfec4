"""RFC 9457 problem details: every error the API returns has this shape.

Domain errors carry their HTTP status and render through one handler, so no
route builds an error body by hand.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from config.logging import bind_request_fields

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://payments.example.com/problems/"


@dataclass(frozen=True)
class ProblemType:
    """One documented error: its ``type`` URI never changes once published."""

    slug: str
    status: int
    title: str
    meaning: str

    @property
    def uri(self) -> str:
        return TYPE_BASE + self.slug


# Every type this API answers with, for the OpenAPI document and the README.
PROBLEM_TYPES: dict[str, ProblemType] = {
    t.slug: t
    for t in (
        ProblemType("validation-error", 400, "The request is not valid",
                    "A field, query parameter or header is invalid; `errors` names each one."),
        ProblemType("idempotency-key-missing", 400, "Idempotency-Key header required",
                    "A POST without an Idempotency-Key header."),
        ProblemType("idempotency-key-invalid", 400, "Idempotency-Key is not valid",
                    "The key is empty, longer than 255 characters or not printable ASCII."),
        ProblemType("malformed-json", 400, "The body is not valid JSON",
                    "The body could not be parsed as JSON."),
        ProblemType("unauthorized", 401, "Authentication required",
                    "Missing, unknown or revoked API key (one answer for all three)."),
        ProblemType("not-found", 404, "Not found", "No such route."),
        ProblemType("payment-not-found", 404, "Payment not found",
                    "No payment with this id for your client (another client's is the same)."),
        ProblemType("refund-not-found", 404, "Refund not found",
                    "No refund with this id on this payment for your client."),
        ProblemType("method-not-allowed", 405, "Method not allowed",
                    "The route exists but not with this method."),
        ProblemType("idempotency-key-unusable", 409, "Idempotency-Key cannot be used",
                    "A run with this key was started but never recorded; use a new key."),
        ProblemType("idempotency-request-in-progress", 409,
                    "A request with this Idempotency-Key is in progress",
                    "The first request with this key is still queued for room (nothing has "
                    "started yet); retry after `Retry-After` with the same key."),
        ProblemType("payment-not-refundable", 409, "Payment cannot be refunded",
                    "Only a succeeded payment can be refunded (`payment_status` says what it "
                    "is); nothing was changed."),
        ProblemType("refund-exceeds-refundable", 409,
                    "Refund amount exceeds what remains refundable",
                    "`amount_refundable` says what is left; nothing was changed."),
        ProblemType("payload-too-large", 413, "Request body too large",
                    "The body exceeds the limit (64 KiB by default)."),
        ProblemType("unsupported-media-type", 415, "Unsupported media type",
                    "A body that is not `application/json`."),
        ProblemType("idempotency-key-reused", 422,
                    "Idempotency-Key reused with a different request",
                    "The key was used before with another body; nothing was changed."),
        ProblemType("rate-limited", 429, "Too many requests",
                    "Your client exceeded its rate; retry after `Retry-After` seconds."),
        ProblemType("internal-error", 500, "Internal error", "A bug on our side."),
        ProblemType("service-unavailable", 503, "Service temporarily unavailable",
                    "Temporal or PostgreSQL cannot be reached; retry after `Retry-After` "
                    "seconds with the same Idempotency-Key."),
        ProblemType("payments-backlog-full", 503, "Too many payments in flight",
                    "The payments in flight are at their limit and none finished within the "
                    "request's wait; nothing was started. Retry after `Retry-After` seconds "
                    "(it grows with the queue) with the same Idempotency-Key."),
    )
}  # fmt: skip


class Problem(Exception):
    """An error the client can act on. ``slug`` names its stable ``type`` URI."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


# JSONResponse's settings, in one encoder made once rather than one per response.
_PROBLEM_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def send_problem(problem: Problem, instance: str | None, send: Send) -> None:
    """The answer ``problem_response`` gives, sent as ASGI messages by a layer outside
    the app: for the admission line's 409s, a third of the time of a response object."""
    body = _PROBLEM_ENCODER.encode(problem.body(instance)).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1"))
          for name, value in problem.headers.items()),
    ]  # fmt: skip
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(instance),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


_STATUS_PROBLEMS = {
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def _field_name(loc: Sequence[str | int]) -> str:
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(part) for part in parts)


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            return problem_response(malformed_json(), request.url.path)
        errors = [
            FieldError(_field_name(error["loc"]), str(error["msg"])) for error in exc.errors()
        ]
        return problem_response(validation_problem(errors), request.url.path)

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug, title = _STATUS_PROBLEMS.get(exc.status_code, ("http-error", "HTTP error"))
        problem = Problem(
            exc.status_code, slug, title, str(exc.detail), headers=exc.headers or None
        )
        return problem_response(problem, request.url.path)

    async def on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # No pooled connection within the pool timeout (a storm), or the database gone
        # mid-request: both pass, so a retry with the same key is the right answer.
        return problem_response(database_unavailable(exc), request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        problem = Problem(500, "internal-error", "Internal error", "An unexpected error occurred.")
        return problem_response(problem, request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(PoolTimeoutError, on_database_unavailable)
    app.add_exception_handler(DBAPIError, on_database_unavailable)
    app.add_exception_handler(Exception, on_unexpected)


# The problems routes raise, named once so their type URIs stay stable.


def unauthorized() -> Problem:
    return Problem(
        401,
        "unauthorized",
        "Authentication required",
        "Send a valid API key as 'Authorization: Bearer <key>'.",
        headers={"WWW-Authenticate": 'Bearer realm="payments"'},
    )


def payment_not_found() -> Problem:
    return Problem(404, "payment-not-found", "Payment not found", "No such payment.")


def idempotency_key_missing() -> Problem:
    return Problem(
        400,
        "idempotency-key-missing",
        "Idempotency-Key header required",
        "Send a unique Idempotency-Key (a UUID) with every POST so a retry never charges twice.",
    )


def idempotency_key_invalid(reason: str) -> Problem:
    return Problem(400, "idempotency-key-invalid", "Idempotency-Key is not valid", reason)


def idempotency_key_reused() -> Problem:
    return Problem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused with a different request",
        "This Idempotency-Key was already used with a different request body. "
        "Use a new key for a new payment.",
    )


def idempotency_request_in_progress(retry_after: int, *, starting: bool = False) -> Problem:
    """``starting``: the first request's start of the run is sent but not yet confirmed
    (otherwise it is queued and nothing has started)."""
    bind_request_fields(turned_away="request_in_progress")  # logged as load shed
    where = (
        "is still starting its payment"
        if starting
        else "is still queued for room and nothing has started for it yet"
    )
    return Problem(
        409,
        "idempotency-request-in-progress",
        "A request with this Idempotency-Key is in progress",
        f"The first request with this key {where}. "
        f"Retry in {retry_after} s with the same key; it never charges twice.",
        headers={"Retry-After": str(retry_after)},
    )


def _unavailable_because(cause: BaseException | str | None) -> None:
    """Name the cause of a 503 on the request's canonical log line (no traceback)."""
    if cause is None:
        return
    if isinstance(cause, str):
        reason = cause
    else:
        status_name = getattr(getattr(cause, "status", None), "name", None)
        reason = type(cause).__name__ + (f" {status_name}" if status_name else "")
    bind_request_fields(unavailable=reason)


def _spread_retry_after() -> str:
    """2 to 4 s, at random: the requests refused in one burst (an exhausted pool, a
    restarting server) would otherwise all come back in the same second and refuse
    each other again; in the storm benchmark they arrived in waves ~18 s apart."""
    return str(random.randint(2, 4))  # noqa: S311 — jitter, not a secret


def temporal_unavailable(cause: BaseException | str | None = None) -> Problem:
    _unavailable_because(cause)
    return Problem(
        503,
        "service-unavailable",
        "Service temporarily unavailable",
        "The payment engine cannot be reached. Retry with the same Idempotency-Key; "
        "it is safe and will never charge twice.",
        headers={"Retry-After": _spread_retry_after()},
    )


def database_unavailable(cause: BaseException | str | None = None) -> Problem:
    _unavailable_because(cause)
    return Problem(
        503,
        "service-unavailable",
        "Service temporarily unavailable",
        "The ledger cannot be reached. Retry shortly; with the same Idempotency-Key "
        "a retry is safe.",
        headers={"Retry-After": _spread_retry_after()},
    )


def backlog_full(retry_after: int, queued: int) -> Problem:
    bind_request_fields(unavailable="backlog_full")
    return Problem(
        503,
        "payments-backlog-full",
        "Too many payments in flight",
        f"The payments in flight are at their limit and none finished within this "
        f"request's wait ({queued} requests are queued for room). Nothing was started: "
        f"retry in {retry_after} s with the same Idempotency-Key.",
        headers={"Retry-After": str(retry_after)},
    )


def validation_problem(errors: Sequence[FieldError]) -> Problem:
    return Problem(
        400,
        "validation-error",
        "The request is not valid",
        "; ".join(f"{e.field or 'body'}: {e.message}" for e in errors),
        extra={"errors": [{"field": e.field, "message": e.message} for e in errors]},
    )


def malformed_json() -> Problem:
    return Problem(
        400, "malformed-json", "The body is not valid JSON", "The body could not be parsed."
    )


def payload_too_large(limit: int) -> Problem:
    return Problem(
        413,
        "payload-too-large",
        "Request body too large",
        f"Request bodies are limited to {limit} bytes.",
    )


def unsupported_media_type(content_type: str) -> Problem:
    return Problem(
        415,
        "unsupported-media-type",
        "Unsupported media type",
        f"Send the body as application/json, not {content_type or 'without a Content-Type'}.",
    )


def rate_limited(retry_after: int, headers: Mapping[str, str]) -> Problem:
    return Problem(
        429,
        "rate-limited",
        "Too many requests",
        f"This client exceeded its request rate. Retry in {retry_after} s.",
        headers={**headers, "Retry-After": str(retry_after)},
    )
