"""Errors in Stripe's shape: ``{"error": {"type", "code", "decline_code", "message"}}``.

Handlers raise :class:`SandboxError`; one exception handler in the app renders it.
"""

from __future__ import annotations

from typing import Any, Literal

ErrorType = Literal["card_error", "invalid_request_error", "idempotency_error", "api_error"]


def error_body(
    type_: ErrorType,
    code: str,
    message: str,
    *,
    decline_code: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "error": {
            "type": type_,
            "code": code,
            "decline_code": decline_code,
            "message": message,
            **extra,
        }
    }


class SandboxError(Exception):
    def __init__(
        self,
        status_code: int,
        type_: ErrorType,
        code: str,
        message: str,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = error_body(type_, code, message, **extra)


def invalid_request(code: str, message: str, **extra: Any) -> SandboxError:
    return SandboxError(400, "invalid_request_error", code, message, **extra)
