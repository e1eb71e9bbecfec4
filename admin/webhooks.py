"""Webhook settings of a client: its URL (checked before it is stored) and its
signing secret (rotated with an overlap, so receivers can switch without a gap).

``python -m admin set-webhook-url --client ID (--url URL | --clear)``
``python -m admin rotate-webhook-secret --client ID [--overlap-hours 24]``
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import create_async_engine

from activities.url_safety import Resolver, UnsafeWebhookUrl, check_webhook_url, system_resolver
from admin.clients import _run_blocking
from admin.credentials import new_webhook_secret
from config.settings import Settings, sqlalchemy_url
from ledger.db import session_factory
from ledger.repositories import ClientRepository

DEFAULT_OVERLAP_HOURS = 24.0
# A longer overlap keeps a possibly leaked secret alive for longer.
MAX_OVERLAP_HOURS = 24.0 * 30

WEBHOOK_COMMANDS = ("set-webhook-url", "rotate-webhook-secret")


class UnknownClient(LookupError):
    pass


@dataclass(frozen=True)
class RotatedSecret:
    client_id: str
    webhook_secret: str
    previous_valid_until: datetime


async def set_webhook_url_async(
    database_url: str,
    client_id: str,
    webhook_url: str | None,
    *,
    allow_loopback: bool = False,
    resolver: Resolver = system_resolver,
) -> None:
    """Store a checked URL (or none). ``UnsafeWebhookUrl`` if refused, ``UnknownClient``."""
    if webhook_url is not None:
        await check_webhook_url(webhook_url, allow_loopback=allow_loopback, resolver=resolver)
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    try:
        async with session_factory(engine)() as session, session.begin():
            if not await ClientRepository(session).set_webhook_url(client_id, webhook_url):
                raise UnknownClient(client_id)
    finally:
        await engine.dispose()


async def rotate_webhook_secret_async(
    database_url: str, client_id: str, *, overlap: timedelta
) -> RotatedSecret:
    if not timedelta(0) <= overlap <= timedelta(hours=MAX_OVERLAP_HOURS):
        raise ValueError(f"the overlap must be between 0 and {MAX_OVERLAP_HOURS:g} hours")
    secret = new_webhook_secret()
    engine = create_async_engine(sqlalchemy_url(database_url), pool_size=1)
    try:
        async with session_factory(engine)() as session, session.begin():
            try:
                valid_until = await ClientRepository(session).rotate_webhook_secret(
                    client_id, secret, overlap=overlap
                )
            except LookupError as exc:
                raise UnknownClient(client_id) from exc
    finally:
        await engine.dispose()
    return RotatedSecret(client_id, secret, valid_until)


# -- the command line ---------------------------------------------------------------


def add_webhook_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    set_url = commands.add_parser(
        "set-webhook-url", help="change (or clear) a client's webhook URL, after checking it"
    )
    set_url.add_argument("--client", required=True, help="client id (cli_...)")
    target = set_url.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="https URL on a public address")
    target.add_argument("--clear", action="store_true", help="send no webhooks to this client")

    rotate = commands.add_parser(
        "rotate-webhook-secret",
        help="new signing secret; the old one keeps signing until the overlap ends",
    )
    rotate.add_argument("--client", required=True, help="client id (cli_...)")
    rotate.add_argument(
        "--overlap-hours",
        type=float,
        default=DEFAULT_OVERLAP_HOURS,
        help=f"how long deliveries stay signed with the old secret too (default "
        f"{DEFAULT_OVERLAP_HOURS:g}; 0 drops it at once)",
    )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def run_webhook_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.command == "set-webhook-url":
            url = None if args.clear else str(args.url)
            _run_blocking(
                set_webhook_url_async(
                    settings.database_url,
                    args.client,
                    url,
                    allow_loopback=settings.webhook_allow_loopback,
                )
            )
            print(f"client_id:   {args.client}")
            print(f"webhook_url: {url if url is not None else '(none: no webhooks are sent)'}")
            return 0
        rotated = _run_blocking(
            rotate_webhook_secret_async(
                settings.database_url, args.client, overlap=timedelta(hours=args.overlap_hours)
            )
        )
    except UnsafeWebhookUrl as exc:
        print(f"error: webhook URL refused: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnknownClient as exc:
        print(f"error: no client {exc}", file=sys.stderr)
        return 1
    print(f"client_id:           {rotated.client_id}")
    print(f"webhook_secret:      {rotated.webhook_secret}   (new; give it to the receiver now)")
    if args.overlap_hours > 0:
        print(
            f"previous valid until {_iso(rotated.previous_valid_until)}"
            "   (until then every webhook is signed with both secrets)"
        )
    else:
        print("previous secret:     no longer valid (no overlap)")
    return 0
