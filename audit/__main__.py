"""``python -m audit``: reconcile provider, ledger and Temporal; exit 1 on any problem.

Defaults come from the settings (``DATABASE_URL``, ``PAYMENTS_PROVIDER_URL``, ...);
flags override them. Exit codes: 0 clean, 1 problems found, 2 a source unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import timedelta

from audit import DEFAULT_STUCK_AFTER, Sources, run_audit
from config.settings import Settings


def _parse(argv: list[str] | None) -> argparse.Namespace:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m audit", description=__doc__)
    parser.add_argument("--database-url", default=settings.database_url)
    parser.add_argument("--provider-url", default=settings.provider_url)
    parser.add_argument(
        "--provider-api-key",
        default=settings.provider_api_key.get_secret_value(),
        help="default: PAYMENTS_PROVIDER_API_KEY",
    )
    parser.add_argument("--temporal-address", default=settings.temporal_address)
    parser.add_argument("--temporal-namespace", default=settings.temporal_namespace)
    parser.add_argument("--no-temporal", action="store_true", help="skip the workflow checks")
    parser.add_argument(
        "--stuck-after",
        type=float,
        default=DEFAULT_STUCK_AFTER.total_seconds(),
        metavar="SECONDS",
        help="a payment non-terminal for longer is reported (default %(default).0f)",
    )
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    sources = Sources(
        database_url=args.database_url,
        provider_url=args.provider_url,
        provider_api_key=args.provider_api_key,
        temporal_address=None if args.no_temporal else args.temporal_address,
        temporal_namespace=args.temporal_namespace,
    )
    try:
        report = await run_audit(sources, stuck_after=timedelta(seconds=args.stuck_after))
    except Exception as exc:
        print(f"audit: cannot read a source: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    return 0 if report.clean else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(_parse(argv)))


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
