"""RFC 9457 problem details: every error the API returns has this shape.

Domain errors carry their HTTP status and render through one handler, so no
route builds an error body by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://payments.example.com/problems/"


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


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "field": ".".join(str(part) for part in error["loc"] if part != "body"),
                "message": error["msg"],
            }
            for error in exc.errors()
        ]
        problem = Problem(
            400,
            "validation-error",
            "The request is not valid",
            "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors),
            extra={"errors": errors},
        )
        return problem_response(problem, request.url.path)

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug, title = _STATUS_PROBLEMS.get(exc.status_code, ("http-error", "HTTP error"))
        problem = Problem(
            exc.status_code, slug, title, str(exc.detail), headers=exc.headers or None
        )
        return problem_response(problem, request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        problem = Problem(500, "internal-error", "Internal error", "An unexpected error occurred.")
        return problem_response(problem, request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
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


def temporal_unavailable() -> Problem:
    return Problem(
        503,
        "service-unavailable",
        "Service temporarily unavailable",
        "The payment engine cannot be reached. Retry with the same Idempotency-Key; "
        "it is safe and will never charge twice.",
        headers={"Retry-After": "2"},
    )


def database_unavailable() -> Problem:
    return Problem(
        503,
        "service-unavailable",
        "Service temporarily unavailable",
        "The ledger cannot be reached. Retry shortly; with the same Idempotency-Key "
        "a retry is safe.",
        headers={"Retry-After": "2"},
    )
