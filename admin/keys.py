"""API key commands: list a client's keys, add one, revoke one.

``python -m admin list-keys --client-id cli_…``
``python -m admin create-key --client-id cli_…``   (rotation: create, deploy, revoke the old)
``python -m admin revoke-key key_…``               (or ``--api-key -`` to read the key on stdin)

A revoked key is refused by every API process within PAYMENTS_API_KEY_CACHE_SECONDS
(default 5 s). Keys are never printed again after creation: lists show only the
readable prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import create_async_engine

from admin.credentials import display_prefix, hash_api_key, new_api_key, new_key_id
from config.settings import Settings, sqlalchemy_url
from ledger.db import session_factory
from ledger.repositories import ApiKeyRecord, ClientRepository

COMMANDS = ("list-keys", "create-key", "revoke-key")
T = TypeVar("T")


class KeyCommandError(Exception):
    pass


async def list_keys_async(database_url: str, client_id: str) -> list[ApiKeyRecord]:
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    try:
        async with session_factory(engine)() as session:
            if not await ClientRepository(session).exists(client_id):
                raise KeyCommandError(f"no client {client_id}")
            return await ClientRepository(session).list_keys(client_id)
    finally:
        await engine.dispose()


async def create_key_async(database_url: str, client_id: str) -> tuple[str, str]:
    """A new key for the client: (key id, the key, shown once)."""
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    api_key, key_id = new_api_key(), new_key_id()
    try:
        async with session_factory(engine)() as session, session.begin():
            clients = ClientRepository(session)
            if not await clients.exists(client_id):
                raise KeyCommandError(f"no client {client_id}")
            await clients.add_key(
                key_id=key_id,
                client_id=client_id,
                key_hash=hash_api_key(api_key),
                display_prefix=display_prefix(api_key),
            )
    finally:
        await engine.dispose()
    return key_id, api_key


async def revoke_key_async(
    database_url: str, *, key_id: str | None = None, api_key: str | None = None
) -> ApiKeyRecord:
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    try:
        async with session_factory(engine)() as session, session.begin():
            clients = ClientRepository(session)
            if api_key is not None:
                found = await clients.key_for_hash(hash_api_key(api_key))
                if found is None:
                    raise KeyCommandError("no such API key")
                key_id = found.key_id
            if key_id is None:
                raise KeyCommandError("name the key by its id or give the key itself")
            revoked = await clients.revoke_key(key_id)
            if revoked is None:
                raise KeyCommandError(f"no key {key_id}")
            return revoked
    finally:
        await engine.dispose()


def _run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def add_commands(commands: Any) -> None:
    """Register the key subcommands on ``python -m admin``'s subparsers."""
    listing = commands.add_parser("list-keys", help="list a client's API keys (prefixes only)")
    listing.add_argument("--client-id", required=True)
    create = commands.add_parser("create-key", help="add an API key to a client (rotation)")
    create.add_argument("--client-id", required=True)
    revoke = commands.add_parser("revoke-key", help="revoke an API key at once")
    revoke.add_argument("key_id", nargs="?", help="the key's id (key_…), from list-keys")
    revoke.add_argument(
        "--api-key", help="the key itself instead of its id; '-' reads it from stdin"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.command == "list-keys":
            keys = _run_blocking(list_keys_async(settings.database_url, args.client_id))
            for key in keys:
                state = f"revoked {key.revoked_at}" if key.revoked_at else "active"
                print(f"{key.key_id}  {key.display_prefix}…  created {key.created_at}  {state}")
            return 0
        if args.command == "create-key":
            key_id, api_key = _run_blocking(create_key_async(settings.database_url, args.client_id))
            print(f"key_id:  {key_id}")
            print(f"api_key: {api_key}   (shown once; store it now)")
            return 0
        api_key = args.api_key
        if api_key == "-":
            api_key = sys.stdin.readline().strip()
        if (args.key_id is None) == (api_key is None):
            raise KeyCommandError("give either a key id or --api-key, not both")
        revoked = _run_blocking(
            revoke_key_async(settings.database_url, key_id=args.key_id, api_key=api_key)
        )
        print(f"revoked {revoked.key_id} ({revoked.display_prefix}…) of client "
              f"{revoked.client_id} at {revoked.revoked_at}")  # fmt: skip
        return 0
    except KeyCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
