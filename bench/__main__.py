"""``python -m bench`` (``make bench``): the storm benchmark. ``--help`` lists the knobs."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import sys
from pathlib import Path

from config.settings import DEV_PROVIDER_API_KEY, Settings
from devstack.processes import nice_value


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Storm the payments API, then run the bare-engine baselines on the same "
        "Temporal server; print a table, write JSON under .data/bench/.",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, default=10_000, help="total requests (10,000)")
    load.add_argument("--quick", action="store_true", help="1,000 requests")
    load.add_argument("--concurrency", type=int, default=1_000, help="requests in flight")
    load.add_argument("--duplicates", type=float, default=0.5, help="duplicate share (0.5)")
    load.add_argument("--clients", type=int, default=4, help="API clients the keys spread over")
    load.add_argument("--decline-share", type=float, default=0.05, help="declined cards")
    load.add_argument("--generators", type=int, default=1, help="load-generator processes")
    load.add_argument("--unloaded", type=int, default=20, help="sequential payments first")
    load.add_argument(
        "--retries", type=int, default=3,
        help="resend after a 503/429/409 in progress (Retry-After), as a well-behaved client does",
    )  # fmt: skip
    load.add_argument("--seed", type=int, default=1)
    faults = parser.add_argument_group("provider faults (sandbox PUT /sandbox/faults)")
    faults.add_argument("--provider-latency-ms", type=int, default=0)
    faults.add_argument("--provider-5xx", type=float, default=0.0, help="share of 500s")
    faults.add_argument(
        "--timeout-after-charge", type=float, default=0.0,
        help="share of charges made but never answered",
    )  # fmt: skip
    stack = parser.add_argument_group("the stack")
    stack.add_argument("--workers", type=int, default=1, help="worker processes")
    stack.add_argument("--api-processes", type=int, default=1, help="uvicorn workers")
    stack.add_argument(
        "--background-nice",
        type=nice_value,
        default=Settings().background_nice,
        help="nice value of the workers (the baseline's too) and the Temporal server",
    )
    stack.add_argument("--target", help="API URL of a running stack instead of starting one")
    stack.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    stack.add_argument("--temporal-address", default="127.0.0.1:7233")
    stack.add_argument("--provider-url", default="http://127.0.0.1:8100")
    stack.add_argument("--provider-api-key", default=DEV_PROVIDER_API_KEY)
    report = parser.add_argument_group("report")
    report.add_argument("--baseline-activities", type=int, default=3)
    report.add_argument("--no-baseline", action="store_true")
    report.add_argument("--history-sample", type=int, default=40)
    report.add_argument("--settle-timeout", type=float, default=600, help="seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 1_000
    if args.target and not args.database_url:
        parser.error("--target needs --database-url (or DATABASE_URL)")
    return args


def hold_bench_lock(bench_dir: Path) -> int | None:
    """The checkout's one benchmark: a second would wipe the first one's stack (its
    data directory is the same) and both would measure each other. The open file's
    lock is the kernel's, gone with this process however it ends. None if held."""
    bench_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(bench_dir / "bench.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from bench.run import BENCH_DIR, run, summarise, write_report

    if not args.target and hold_bench_lock(BENCH_DIR) is None:
        print(
            f"Another benchmark is running in this checkout ({BENCH_DIR}); wait for it to "
            "finish or stop it. Two at once would share one stack and measure each other.",
            file=sys.stderr,
        )
        return 2
    from config.logging import configure_logging

    # The in-process webhook receiver would print a line per delivery.
    configure_logging("WARNING", "console")

    report = asyncio.run(run(args))
    table, summary = summarise(report)
    path = write_report(report)
    print()
    print(table)
    print(f"\nFull report: {path}")
    print(summary)
    storm = report["storm"]
    healthy = (
        storm["provider"]["double_charged_keys"] == 0
        and storm["ledger"]["balanced"]
        and storm["postgres"]["deadlocks"] == 0
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
