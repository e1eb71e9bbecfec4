"""Create an API client with its first key. The key is shown once and stored hashed."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from activities.url_safety import Resolver, check_webhook_url, system_resolver
from admin.credentials import (
    display_prefix,
    hash_api_key,
    new_api_key,
    new_client_id,
    new_key_id,
    new_webhook_secret,
)
from config.settings import sqlalchemy_url
from ledger.db import session_factory
from ledger.repositories import ClientRepository

T = TypeVar("T")


@dataclass(frozen=True)
class CreatedClient:
    client_id: str
    name: str
    api_key: str
    webhook_secret: str
    webhook_url: str | None


async def add_client(session: AsyncSession, *, name: str, webhook_url: str | None) -> CreatedClient:
    """Add a client and its first key inside the caller's transaction.

    The webhook URL is stored as given: entry points check it first
    (``create_client_async``), and every delivery checks it again.
    """
    clients = ClientRepository(session)
    created = CreatedClient(
        client_id=new_client_id(),
        name=name,
        api_key=new_api_key(),
        webhook_secret=new_webhook_secret(),
        webhook_url=webhook_url,
    )
    await clients.add(
        client_id=created.client_id,
        name=name,
        webhook_url=webhook_url,
        webhook_secret=created.webhook_secret,
    )
    await clients.add_key(
        key_id=new_key_id(),
        client_id=created.client_id,
        key_hash=hash_api_key(created.api_key),
        display_prefix=display_prefix(created.api_key),
    )
    return created


async def create_client_async(
    database_url: str,
    *,
    name: str,
    webhook_url: str | None,
    allow_loopback: bool = False,
    resolver: Resolver = system_resolver,
) -> CreatedClient:
    """Create a client; a webhook URL is checked first (``UnsafeWebhookUrl`` if refused)."""
    if webhook_url is not None:
        await check_webhook_url(webhook_url, allow_loopback=allow_loopback, resolver=resolver)
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    try:
        async with session_factory(engine)() as session, session.begin():
            return await add_client(session, name=name, webhook_url=webhook_url)
    finally:
        await engine.dispose()


async def client_exists_async(database_url: str, client_id: str) -> bool:
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    try:
        async with session_factory(engine)() as session:
            return await ClientRepository(session).exists(client_id)
    finally:
        await engine.dispose()


def _run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    # Callable from plain code and from inside a running event loop alike.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def create_client(
    database_url: str, *, name: str, webhook_url: str | None, allow_loopback: bool = False
) -> CreatedClient:
    return _run_blocking(
        create_client_async(
            database_url, name=name, webhook_url=webhook_url, allow_loopback=allow_loopback
        )
    )


def client_exists(database_url: str, client_id: str) -> bool:
    return _run_blocking(client_exists_async(database_url, client_id))
