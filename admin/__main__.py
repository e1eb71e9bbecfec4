"""``python -m admin create-client --name NAME [--webhook-url URL]``

Prints the client's id, its API key and its webhook secret. The key is shown this
once: only its hash is stored. A webhook URL must be https on a public address
(``PAYMENTS_WEBHOOK_ALLOW_LOOPBACK`` also allows http and loopback, in development).

Webhook commands (``set-webhook-url``, ``rotate-webhook-secret``): see admin/webhooks.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from activities.url_safety import UnsafeWebhookUrl
from admin import keys
from admin.clients import create_client
from admin.webhooks import WEBHOOK_COMMANDS, add_webhook_commands, run_webhook_command
from config.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m admin")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-client", help="create an API client and its first key")
    create.add_argument("--name", required=True)
    create.add_argument("--webhook-url", default=None)
    keys.add_commands(commands)
    add_webhook_commands(commands)
    args = parser.parse_args(argv)

    settings = Settings()
    if args.command in keys.COMMANDS:
        return keys.run(args, settings)
    if args.command in WEBHOOK_COMMANDS:
        return run_webhook_command(args, settings)
    try:
        created = create_client(
            settings.database_url,
            name=args.name,
            webhook_url=args.webhook_url,
            allow_loopback=settings.webhook_allow_loopback,
        )
    except UnsafeWebhookUrl as exc:
        print(f"error: webhook URL refused: {exc}", file=sys.stderr)
        return 2
    print(f"client_id:      {created.client_id}")
    print(f"api_key:        {created.api_key}   (shown once; store it now)")
    print(f"webhook_secret: {created.webhook_secret}")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
