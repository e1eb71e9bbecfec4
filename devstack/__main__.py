"""``python -m devstack run``: the whole stack in one terminal (what ``make run`` does)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from config.settings import Settings
from devstack import histories
from devstack.ports import port_in_use
from devstack.processes import ServiceFailed, nice_value
from devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start every service and wait for Ctrl-C")
    defaults = StackPorts()
    run.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".data")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--api-port", type=int, default=defaults.api)
    run.add_argument("--ui-port", type=int, default=defaults.temporal_ui)
    run.add_argument("--temporal-port", type=int, default=defaults.temporal)
    run.add_argument("--provider-port", type=int, default=defaults.provider)
    run.add_argument("--webhooks-port", type=int, default=defaults.webhooks)
    run.add_argument("--postgres-port", type=int, default=defaults.postgres)
    capture = commands.add_parser(
        "capture-histories",
        help="drive every payment path and save its histories for the replay test",
    )
    histories.add_arguments(capture)
    settings = Settings()
    run.add_argument("--api-processes", type=int, default=settings.api_processes)
    run.add_argument("--worker-processes", type=int, default=settings.worker_processes)
    run.add_argument(
        "--background-nice",
        type=nice_value,
        default=settings.background_nice,
        help="nice value of the worker and the Temporal server, below the API's",
    )
    return parser.parse_args(argv)


DEMO_BODY = json.dumps(
    {
        "amount": 1250,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "description": "Order 1234",
    }
)


def _banner(stack: Stack) -> str:
    client = stack.demo_client
    assert client is not None
    ui = stack.temporal.ui_url
    metrics = stack.worker_metrics_urls
    return f"""
Payments stack ready in {stack.timings["total"]:.1f} s

  API           {stack.api_url}        docs: {stack.api_url}/docs
  Temporal UI   {ui}
                payloads are encrypted; to read them in the UI sign in at
                {stack.codec_url}/login with the codec token
                {stack.dev_secrets["codec_token"]}
                then tick "Include cross-origin credentials" in the UI's codec settings
  Provider      {stack.provider_url}   (sandbox)
  PostgreSQL    {stack.database_url.replace("+psycopg", "")}
  Webhooks      {stack.webhooks.url}   (demo receiver; events are logged below)
  Metrics       {stack.api_url}/metrics   worker: {metrics["sdk"]} (SDK), {metrics["business"]}

Demo API key (client "demo", {client.client_id}):
  export API_KEY={client.api_key}

Charge 12.50 EUR (paste as is; resend with the same Idempotency-Key to see a replay):
  curl -sS -X POST {stack.api_url}/v1/payments \\
    -H "Authorization: Bearer {client.api_key}" \\
    -H "Idempotency-Key: $(python3 -c 'import uuid; print(uuid.uuid4())')" \\
    -H "Content-Type: application/json" \\
    -d '{DEMO_BODY}'

Ctrl-C stops everything; the data stays in {stack.config.data_dir} for the next run.
"""


async def _run(args: argparse.Namespace) -> int:
    ports = StackPorts(
        postgres=args.postgres_port,
        temporal=args.temporal_port,
        temporal_ui=args.ui_port,
        provider=args.provider_port,
        api=args.api_port,
        webhooks=args.webhooks_port,
    )
    taken = [f"{name} port {port}" for name, port in ports.named().items()
             if port_in_use(args.host, port)]  # fmt: skip
    if taken:
        print(
            "Cannot start: " + ", ".join(taken) + " already in use. Stop whatever holds it "
            "(another `make run`?) or choose another port (python -m devstack run --help).",
            file=sys.stderr,
        )
        return 2

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    config = StackConfig(
        data_dir=args.data_dir,
        host=args.host,
        ports=ports,
        echo=True,
        log_format="console",
        api_processes=args.api_processes,
        worker_processes=args.worker_processes,
        background_nice=args.background_nice,
    )
    stack = Stack(config)
    print(f"Starting the stack (data in {config.data_dir}) ...", flush=True)
    start = asyncio.create_task(stack.start())
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait({start, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        print("\nInterrupted while starting; stopping what started ...", flush=True)
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
        return 130
    waiting.cancel()
    try:
        start.result()
    except ServiceFailed as failure:
        print(f"\nThe stack did not start: {failure}", file=sys.stderr)
        return 1
    print(_banner(stack), flush=True)

    exited = await _watch(stack, stop)
    if exited:
        print(f"\n{', '.join(exited)} stopped unexpectedly (its output is above); "
              "stopping the rest ...", file=sys.stderr, flush=True)  # fmt: skip
    else:
        print("\nStopping: API, worker (drains running activities), provider, Temporal, "
              "PostgreSQL ...", flush=True)  # fmt: skip
    await stack.stop()
    print("Stopped.", flush=True)
    return 1 if exited else 0


async def _watch(stack: Stack, stop: asyncio.Event) -> list[str]:
    """Wait for Ctrl-C; a service dying on its own ends the run too, loudly."""
    while not stop.is_set():
        if exited := stack.exited_services():
            return exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    return []


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "capture-histories":
        with tempfile.TemporaryDirectory(prefix="capture-histories-") as data_dir:
            return asyncio.run(histories.run_command(args, Path(data_dir)))
    return asyncio.run(_run(args))


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
