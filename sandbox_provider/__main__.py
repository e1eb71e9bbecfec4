"""``python -m sandbox_provider --port 8100 [--host H] [--db FILE] [--api-key KEY] [--seed N]``"""

from __future__ import annotations

import argparse

import uvicorn

from config.logging import configure_logging
from config.settings import DEV_PROVIDER_API_KEY, Settings
from sandbox_provider.app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox_provider", description="The sandbox card processor."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--db", default=None, help="SQLite file that keeps charges (default: memory)"
    )
    parser.add_argument("--api-key", default=DEV_PROVIDER_API_KEY, help="the accepted Bearer key")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random faults")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(args.db, args.api_key, args.seed),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        # A request held by a hang fault must not hold up a stop for its whole hang.
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
