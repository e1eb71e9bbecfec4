"""Annotated dependency aliases for routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import State

from api.auth import ApiKeyAuthenticator
from api.metrics import record_rate_limited
from api.payments import PaymentService
from api.problems import rate_limited
from api.ratelimit import RateLimiter
from config.logging import bind_request_fields
from config.settings import Settings
from ledger.repositories import ClientIdentity

# Documents the scheme in OpenAPI (and the Authorize button of /docs); the
# authenticator reads the header itself so every failure is the same 401.
bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="sk_…",
    description="Your API key: `Authorization: Bearer sk_…`.",
)


# The dependencies are ``async def`` even where they do not await: FastAPI runs a plain
# ``def`` dependency in its thread pool, two thread hand-offs per request for reading
# app.state (3.6 % of the API's samples in the storm, and the pool's 40 threads queue).
async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _payment_service(request: Request) -> PaymentService:
    service: PaymentService = request.app.state.payments
    return service


async def client_within_limit(
    state: State, authorization: str | None
) -> tuple[ClientIdentity, dict[str, str]]:
    """The request's client, counted against its rate limit, and the rate-limit headers
    for its answer. Raises the 401, the 429 or the 503 (no database) to answer instead."""
    authenticator: ApiKeyAuthenticator = state.authenticator
    client = await authenticator.authenticate(authorization)
    bind_request_fields(client_id=client.client_id)
    limiter: RateLimiter = state.rate_limiter
    decision = limiter.take(client.client_id)
    headers = limiter.headers(decision)
    if not decision.allowed:
        record_rate_limited()
        raise rate_limited(decision.retry_after, headers)
    return client, headers


async def _current_client(
    request: Request,
    response: Response,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> ClientIdentity:
    client, headers = await client_within_limit(
        request.app.state, request.headers.get("authorization")
    )
    response.headers.update(headers)
    return client


SettingsDep = Annotated[Settings, Depends(_settings)]
PaymentServiceDep = Annotated[PaymentService, Depends(_payment_service)]
CurrentClient = Annotated[ClientIdentity, Depends(_current_client)]
