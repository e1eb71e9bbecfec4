"""``python -m bench.floor``: how fast this machine's HTTP server answers a herd when the
app does nothing, the floor under the storm's first burst.

uvicorn (uvloop, httptools, as the API runs) serves an app that answers ``200 ok``;
``--connections`` connections are opened and each used once, then one request is sent
on every one of them at once, and each answer's latency is printed as percentiles.
The storm's first 1,000 requests reach the API the same way; what the API takes
beyond this floor is its own path (docs/scaling.md, "The expiry round").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator

from starlette.types import Receive, Scope, Send

from bench.rawhttp import Connection, build_request
from bench.report import percentile
from devstack.ports import free_port
from devstack.processes import ManagedProcess

STARTUP_SECONDS = 30.0


async def answer_ok(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app that does nothing but answer."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[int]:
    """uvicorn serving ``answer_ok`` on a free port, stopped on the way out."""
    port = free_port()
    server = ManagedProcess(
        "floor",
        [sys.executable, "-m", "uvicorn", "bench.floor:answer_ok", "--port", str(port),
         "--loop", "uvloop", "--http", "httptools", "--no-access-log",
         "--log-level", "warning"],
    )  # fmt: skip
    request = build_request("GET", f"127.0.0.1:{port}", "/", {})

    async def answers() -> bool:
        probe = Connection("127.0.0.1", port)
        try:
            return (await probe.request(request)).status == 200
        finally:
            await probe.close()

    server.start()
    try:
        await server.wait_ready(answers, within=STARTUP_SECONDS, what="answering GET /")
        yield port
    finally:
        await server.terminate(grace=10)


async def herd_latencies(port: int, connections: int) -> list[float]:
    """Each connection's one request, sent together, in seconds."""
    request = build_request("GET", f"127.0.0.1:{port}", "/", {})
    pool = [Connection("127.0.0.1", port) for _ in range(connections)]
    try:
        for conn in pool:  # opened and answered once: accepted by the server
            await conn.request(request)

        async def timed(conn: Connection) -> float:
            started = time.perf_counter()
            await conn.request(request)
            return time.perf_counter() - started

        return await asyncio.gather(*(timed(conn) for conn in pool))
    finally:
        await asyncio.gather(*(conn.close() for conn in pool))


async def measure(connections: int) -> list[float]:
    async with serving() as port:
        return await herd_latencies(port, connections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--connections", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for round_number in range(1, args.rounds + 1):
        latencies = [s * 1000 for s in asyncio.run(measure(args.connections))]
        figures = "  ".join(f"p{q} {percentile(latencies, q):.1f}" for q in (50, 95, 99))
        print(f"round {round_number}: {args.connections} requests at once, answered "
              f"(ms) {figures}  max {max(latencies):.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
