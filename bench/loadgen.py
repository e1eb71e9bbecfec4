"""The HTTP load generator: a separate process (several, if asked) per shard of the plan.

Each process keeps ``concurrency`` keep-alive connections, one request in flight on
each: that is the bound on requests in flight. A first request is followed in the
queue by its in-flight duplicates (picked up by other connections at once, while the
first is still being processed); its after-duplicates are queued when its answer
arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.plan import Credentials, KeyPlan, Kind, Plan
from bench.rawhttp import Connection, HttpError, build_request
from devstack.processes import die_with_parent

# Slots per generator in the shared progress array.
SENT, DONE, ERRORS = 0, 1, 2
SLOTS = 3


def bind_to_bench() -> None:
    """First thing in a spawned generator: it dies with the benchmark, whatever ends
    it (Ctrl-C, SIGTERM, a crash); a generator left behind would go on loading the
    machine and skew the next run's figures."""
    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the benchmark ended before the binding took effect


@dataclass(frozen=True)
class Record:
    key_index: int
    kind: str
    status: int  # 0: no HTTP answer (connection error)
    latency: float  # seconds, request written to answer read
    sent_at: float  # wall clock
    replayed: bool
    payment_status: str | None
    payment_id: str | None
    attempt: int = 1  # >1: a retry after a 503, 429 or 409 in progress, as clients send
    problem: str | None = None  # an error's problem type, the last part of its URI


@dataclass
class GeneratorResult:
    records: list[Record] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    # How late the generator's own loop ran a timer due every LAG_TICK_SECONDS: a
    # latency it measures includes up to this much of its own delay.
    loop_lags: list[float] = field(default_factory=list)
    # Opening every connection, before the first request was sent.
    connect_seconds: float = 0.0
    connections: int = 0


LAG_TICK_SECONDS = 0.05
# Each connection's one request before the storm: answered by any API process, unlogged.
WARM_UP_PATH = "/healthz"
# Retry-After is in whole seconds, so clients refused in the same instant and told the
# same number would come back in the same instant; as the README asks of clients, a
# retry waits a random fraction of a second more.
RETRY_JITTER_SECONDS = 1.0


def retry_delay(retry_after: float, rng: random.Random) -> float:
    """How long a refused request waits before it is resent: at least ``Retry-After``."""
    return retry_after + rng.uniform(0.0, RETRY_JITTER_SECONDS)


async def _watch_own_loop(lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_TICK_SECONDS
        await asyncio.sleep(LAG_TICK_SECONDS)
        lags.append(max(0.0, loop.time() - due))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(
    plan: Plan,
    credentials: list[Credentials],
    host: str,
    port: int,
    concurrency: int,
    progress: Any,
    slot: int,
    retries: int = 3,
) -> GeneratorResult:
    result = GeneratorResult()
    queue: asyncio.Queue[tuple[KeyPlan, Kind, int] | None] = asyncio.Queue()
    for key in plan.keys:
        queue.put_nowait((key, Kind.FIRST, 1))
        for _ in range(key.in_flight_dups):
            queue.put_nowait((key, Kind.DUP_IN_FLIGHT, 1))
    total = plan.requests
    finished = 0
    base = slot * SLOTS
    workers = max(1, min(concurrency, total))
    headers_by_client = [
        {"Authorization": f"Bearer {c.api_key}", "Content-Type": "application/json"}
        for c in credentials
    ]
    hostport = f"{host}:{port}"
    jitter = random.Random(slot)  # noqa: S311 — spreads retries, not a secret

    async def retry_later(key: KeyPlan, kind: Kind, attempt: int, after: float) -> None:
        await asyncio.sleep(retry_delay(after, jitter))
        queue.put_nowait((key, kind, attempt))

    pending: set[asyncio.Task[None]] = set()
    sampled: dict[str, int] = {}

    def sample(kind: str, text: str) -> None:
        """Two examples of each kind of error are enough to read what went wrong."""
        if sampled.get(kind, 0) < 2:
            sampled[kind] = sampled.get(kind, 0) + 1
            result.error_samples.append(text)

    async def one(key: KeyPlan, kind: Kind, attempt: int, conn: Connection) -> None:
        nonlocal finished
        headers = {**headers_by_client[key.client], "Idempotency-Key": key.key}
        raw = build_request("POST", hostport, "/v1/payments", headers, key.body)
        if attempt == 1:
            progress[base + SENT] += 1
        # Setting up a connection is not the request's latency (Record.latency), as in
        # k6's http_req_duration; a connection that cannot be opened fails the request.
        with contextlib.suppress(HttpError):
            await conn.open()
        sent_at = time.time()
        started = time.perf_counter()
        status, replayed, payment_status, payment_id = 0, False, None, None
        problem: str | None = None
        retry_after = 1.0
        try:
            response = await conn.request(raw)
            status = response.status
            replayed = response.headers.get("idempotent-replayed") == "true"
            if status in (200, 201, 202):
                body = json.loads(response.body)
                payment_status, payment_id = body.get("status"), body.get("id")
            else:
                retry_after = float(response.headers.get("retry-after", "1") or 1)
                problem = _problem_type(response.body)
                sample(str(status), f"{status} {response.body[:300]!r}")
        except HttpError as err:
            sample("connection", f"connection: {err}")
        latency = time.perf_counter() - started
        if status not in (200, 201, 202):
            progress[base + ERRORS] += 1
        result.records.append(
            Record(key.index, str(kind), status, latency, sent_at, replayed,
                   payment_status, payment_id, attempt, problem)
        )  # fmt: skip
        if _retryable(status, problem) and attempt <= retries:
            # The same key again, later: the API says that is safe. Not yet finished.
            task = asyncio.create_task(retry_later(key, kind, attempt + 1, retry_after))
            pending.add(task)
            task.add_done_callback(pending.discard)
            return
        if kind is Kind.FIRST:
            after = Kind.DUP_AFTER_FINISHED if status == 201 else Kind.DUP_AFTER
            for _ in range(key.after_dups):
                queue.put_nowait((key, after, 1))
        progress[base + DONE] += 1
        finished += 1
        if finished == total:
            for _ in range(workers):
                queue.put_nowait(None)

    opened = 0
    all_open = asyncio.Event()
    warm_up = build_request("GET", hostport, WARM_UP_PATH, {})

    async def worker() -> None:
        nonlocal opened
        conn = Connection(host, port)
        try:
            # Every connection open before the first request, as a client pool or a load
            # balancer keeps them: the storm's first burst is 1,000 requests, not 1,000
            # connection setups in the generator's loop, each timed as a request's. And
            # each one used once: a connection the client sees open may not be accepted
            # by the server yet (the kernel completes the handshake), and the API took up
            # to 0.8 s to accept the last of 1,000 opened just before the storm, time
            # that the requests sent on them counted as their own.
            with contextlib.suppress(HttpError):
                await conn.open()
                await conn.request(warm_up)
                result.connections += 1
            opened += 1
            if opened == workers:
                result.connect_seconds = time.perf_counter() - connecting
                all_open.set()
            await all_open.wait()
            while (item := await queue.get()) is not None:
                await one(*item, conn)
        finally:
            await conn.close()

    connecting = time.perf_counter()
    watch = asyncio.create_task(_watch_own_loop(result.loop_lags))
    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        watch.cancel()
    result.wall_seconds = time.perf_counter() - connecting - result.connect_seconds
    return result


def _retryable(status: int, problem: str | None) -> bool:
    """What a well-behaved client resends with the same key after ``Retry-After``: no
    answer, rate limited, unavailable, or its first request still queued for room."""
    if status == 409:
        return problem == "idempotency-request-in-progress"
    return status in (0, 429, 503)


def _problem_type(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    kind = answer.get("type") if isinstance(answer, dict) else None
    return kind.rsplit("/", 1)[-1] if isinstance(kind, str) else None


def generator_main(
    plan: Plan,
    credentials: list[Credentials],
    host: str,
    port: int,
    concurrency: int,
    progress: Any,
    slot: int,
    results: Any,
    retries: int,
) -> None:
    """Process entry point (spawned): drive the shard, hand back records and own CPU."""
    bind_to_bench()
    # uvloop, as the API runs on: the generator's own loop must not be what a latency
    # measures (its lag is reported beside the latencies).
    result = uvloop.run(_drive(plan, credentials, host, port, concurrency, progress, slot, retries))
    result.cpu_seconds = _cpu_seconds()
    results.put((slot, result))
    results.close()
    results.join_thread()
    sys.stdout.flush()
    os._exit(0)
