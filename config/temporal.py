"""One way to reach Temporal, from settings: the dev server locally, a cluster or
Temporal Cloud (TLS, API key) in production."""

from __future__ import annotations

from temporalio.client import Client

from config.settings import Settings
from config.temporal_tls import temporal_tls


async def connect_temporal(settings: Settings, *, lazy: bool = False) -> Client:
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=temporal_tls(settings, api_key=api_key is not None),
        api_key=api_key,
        lazy=lazy,
    )
