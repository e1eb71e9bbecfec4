"""``python -m api --host H --port P [--workers N]``: the API under uvicorn, logging
through our own structlog pipeline."""

from __future__ import annotations

import argparse
import os

import uvicorn

from api.admission_board import create_board, default_board_path, remove_board
from config.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m api")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None, help="PAYMENTS_API_PROCESSES")
    args = parser.parse_args()
    settings = Settings()
    processes = args.workers or settings.api_processes
    board = default_board_path(os.getpid()) if processes > 1 else None
    if board is not None:
        # Before the processes start: each attaches to it as it creates its app.
        create_board(board, processes)
        os.environ["PAYMENTS_API_ADMISSION_BOARD"] = str(board)
    try:
        uvicorn.run(
            "api.app:create_served_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=processes,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
            timeout_keep_alive=settings.api_keep_alive_seconds,
        )
    finally:
        if board is not None:
            remove_board(board)


if __name__ == "__main__":
    main()
