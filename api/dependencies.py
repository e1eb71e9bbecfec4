"""Annotated dependency aliases for routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from api.auth import ApiKeyAuthenticator
from api.payments import PaymentService
from config.logging import bind_request_fields
from config.settings import Settings
from ledger.repositories import ClientIdentity


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _payment_service(request: Request) -> PaymentService:
    service: PaymentService = request.app.state.payments
    return service


async def _current_client(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> ClientIdentity:
    authenticator: ApiKeyAuthenticator = request.app.state.authenticator
    client = await authenticator.authenticate(authorization)
    bind_request_fields(client_id=client.client_id)
    return client


SettingsDep = Annotated[Settings, Depends(_settings)]
PaymentServiceDep = Annotated[PaymentService, Depends(_payment_service)]
CurrentClient = Annotated[ClientIdentity, Depends(_current_client)]
