"""The storm, then the baselines, on one stack; then the report."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import queue
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from temporalio.client import Client

from admin.clients import create_client_async
from bench import observe
from bench.baseline_load import baseline_main
from bench.baseline_workflows import BASELINE_TASK_QUEUE
from bench.loadgen import DONE, ERRORS, SENT, SLOTS, GeneratorResult, Record, generator_main
from bench.plan import Credentials, Kind, Plan, build_plan
from bench.rawhttp import Connection, build_request
from bench.report import (
    OK_STATUSES,
    errors,
    fmt,
    generator_loop_lag_ms,
    lag_line,
    latencies_by_kind,
    latency_ms,
    percentile,
    slow_repeats,
    write_records,
)
from bench.report import statuses as status_counts
from bench.report import table as render_table
from config.settings import DEV_PROVIDER_API_KEY, Settings
from config.temporal import data_converter
from devstack.processes import ManagedProcess
from devstack.stack import REPO_ROOT, Stack, StackConfig, StackPorts
from devstack.temporal_server import NAMESPACE
from domain.payments import payment_id_for, payment_workflow_id

BENCH_DIR = REPO_ROOT / ".data" / "bench"


class Target:
    """Where the load goes: a stack we started, or one already running (``--target``)."""

    def __init__(
        self,
        api_url: str,
        database_url: str,
        temporal_address: str,
        provider_url: str,
        provider_api_key: str,
        stack: Stack | None = None,
    ) -> None:
        self.api_url = api_url
        self.database_url = database_url
        self.temporal_address = temporal_address
        self.provider_url = provider_url
        self.provider_api_key = provider_api_key
        self.stack = stack
        parts = urlsplit(api_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80

    @property
    def dsn(self) -> str:
        return observe.libpq_dsn(self.database_url)

    async def add_client(self, name: str) -> Credentials:
        if self.stack is not None:
            created = await self.stack.add_client(name)
        else:
            created = await create_client_async(self.database_url, name=name, webhook_url=None)
        return Credentials(created.client_id, created.api_key)

    def process_groups(self) -> dict[str, list[int]]:
        stack = self.stack
        if stack is None:
            return {}
        groups = {
            "api": [stack.api.pid],
            "worker": [w.pid for w in [stack.worker, *stack.extra_workers]],
            "temporal": [stack.temporal.process.pid],
            "postgres": [stack.postgres.process.pid],
            "provider": [stack.provider.pid],
        }
        return {name: [p for p in pids if p is not None] for name, pids in groups.items()}

    def log_files(self) -> list[Path]:
        if self.stack is None:
            return []
        return sorted(self.stack.logs_dir.glob("*.log"))


# -- the storm -----------------------------------------------------------------------


class Progress:
    def __init__(self, label: str, total: int, generators: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.array: Any = ctx.Array("q", generators * SLOTS, lock=False)
        self.label = label
        self.total = total
        self.generators = generators
        self.started = time.monotonic()
        self._tty = sys.stdout.isatty()
        self._last_print = 0.0

    def _sum(self, slot: int) -> int:
        return sum(self.array[g * SLOTS + slot] for g in range(self.generators))

    def line(self, extra: str = "") -> str:
        sent, done, errs = self._sum(SENT), self._sum(DONE), self._sum(ERRORS)
        elapsed = time.monotonic() - self.started
        return (
            f"[{self.label} {elapsed:6.1f}s] sent {sent}/{self.total}  done {done}  "
            f"in flight {sent - done}  errors {errs}  {done / max(elapsed, 1e-9):.1f} answers/s"
            + (f"  {extra}" if extra else "")
        )

    def show(self, extra: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if self._tty:
            print("\r" + self.line(extra).ljust(150), end="", flush=True)
        elif force or now - self._last_print >= 5:
            print(self.line(extra), flush=True)
            self._last_print = now

    def end(self) -> None:
        if self._tty:
            print(flush=True)


async def _collect(processes: list[Any], results: Any, count: int) -> list[GeneratorResult]:
    collected: dict[int, GeneratorResult] = {}
    while len(collected) < count:
        try:
            slot, result = await asyncio.to_thread(results.get, True, 1.0)
        except queue.Empty:
            dead = [p.name for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load generator died: {', '.join(dead)}") from None
            continue
        collected[slot] = result
    for process in processes:
        await asyncio.to_thread(process.join, 30)
    return [collected[s] for s in sorted(collected)]


async def storm(
    target: Target,
    plan: Plan,
    credentials: list[Credentials],
    args: argparse.Namespace,
    records_path: Path,
) -> dict[str, Any]:
    client_ids = [c.client_id for c in credentials]
    ctx = multiprocessing.get_context("spawn")
    generators = max(1, min(args.generators, len(plan.keys)))
    progress = Progress("storm", plan.requests, generators)
    results = ctx.Queue()
    sampler = observe.ProcessSampler(target.process_groups())
    pg = observe.PgSampler(target.database_url)
    logs_before = observe.log_sizes(target.log_files())
    pg_log = target.stack.logs_dir / "postgres.log" if target.stack else None
    pg_log_offset = pg_log.stat().st_size if pg_log and pg_log.exists() else 0
    await pg.start()
    sampler.start()
    api_before = await observe.api_histograms(target.api_url)

    started_wall = time.time()
    started = time.monotonic()
    processes = [
        ctx.Process(
            target=generator_main,
            args=(
                shard,
                credentials,
                target.host,
                target.port,
                max(1, args.concurrency // generators),
                progress.array,
                slot,
                results,
                args.retries,
            ),
            name=f"bench-generator-{slot}",
        )
        for slot, shard in enumerate(plan.shard(generators))
    ]
    for process in processes:
        process.start()
    generator_pids = [p.pid for p in processes]
    collecting = asyncio.create_task(_collect(processes, results, generators))
    ledger = observe.LedgerState()
    last_ledger_poll = 0.0
    while not collecting.done():
        if time.monotonic() - last_ledger_poll > 2:
            ledger = await observe.ledger_state(target.dsn, client_ids)
            last_ledger_poll = time.monotonic()
        progress.show(f"ledger terminal {ledger.terminal}/{ledger.total}")
        await asyncio.wait({collecting}, timeout=1)
    generator_results = collecting.result()
    answers_done = time.monotonic() - started
    api_after = await observe.api_histograms(target.api_url)
    progress.show(f"all answered in {answers_done:.1f}s", force=True)
    progress.end()

    # Every payment terminal in the ledger.
    deadline = time.monotonic() + args.settle_timeout
    while True:
        ledger = await observe.ledger_state(target.dsn, client_ids)
        if ledger.total and ledger.terminal == ledger.total:
            break
        if time.monotonic() > deadline:
            print(f"  gave up waiting: {ledger.by_status}", flush=True)
            break
        print(f"  waiting for outcomes: {ledger.by_status}", flush=True)
        await asyncio.sleep(1)
    # Then every payment workflow closed (its webhook delivered): the baselines must not
    # share the server with our backlog, and the CPU figures include the webhooks.
    while True:
        running = await observe.running_payment_workflows(target.temporal_address, NAMESPACE)
        if running == 0 or time.monotonic() > deadline:
            break
        print(f"  waiting for {running} payment workflows to close (webhooks)", flush=True)
        await asyncio.sleep(2)
    workflows_closed = time.monotonic() - started
    groups = await sampler.stop()
    locks = await pg.stop()
    logs_after = observe.log_sizes(target.log_files())

    records = [r for g in generator_results for r in g.records]
    write_records(records_path, records)
    finished_at = ledger.last_terminal_at or time.time()
    duration = max(finished_at - started_wall, 1e-9)
    lock_wait_lines = 0
    if pg_log and pg_log.exists():
        with pg_log.open("rb") as handle:
            handle.seek(pg_log_offset)
            lock_wait_lines = handle.read().count(b"still waiting for")

    # Histories, sampled.
    rng = random.Random(args.seed)  # noqa: S311 - sampling, not secrets
    sample = rng.sample(plan.keys, min(args.history_sample, len(plan.keys)))
    history = await observe.sample_histories(
        target.temporal_address,
        NAMESPACE,
        [payment_workflow_id(credentials[k.client].client_id, k.key) for k in sample],
    )

    ledger_check = await observe.check_ledger(target.dsn, client_ids)
    payment_ids = {payment_id_for(credentials[k.client].client_id, k.key) for k in plan.keys}
    provider = await observe.provider_check(
        target.provider_url, target.provider_api_key, payment_ids,
        ledger_check.succeeded_payment_ids,
    )  # fmt: skip

    log_bytes = {name: logs_after.get(name, 0) - logs_before.get(name, 0) for name in logs_after}
    app_log_bytes = sum(v for k, v in log_bytes.items() if k.startswith(("api", "worker")))
    terminal = ledger.terminal
    succeeded = ledger.by_status.get("succeeded", 0)
    return {
        "requests": plan.requests,
        "unique_keys": len(plan.keys),
        "duplicates": plan.duplicates,
        "concurrency": args.concurrency,
        "generators": generators,
        "duration_seconds": round(duration, 2),
        "all_answered_seconds": round(answers_done, 2),
        "workflows_closed_seconds": round(workflows_closed, 2),
        "workflows_still_running": running,
        "payments_terminal": terminal,
        "payments_by_status": ledger.by_status,
        "payments_per_second": round(terminal / duration, 2),
        "http_statuses": status_counts(records),
        "errors_by_status": errors(records),
        "error_samples": [s for g in generator_results for s in g.error_samples][:10],
        "latency_ms": latencies_by_kind(records),
        "slow_repeats": slow_repeats(records),
        "retries_sent": sum(1 for r in records if r.attempt > 1),
        "keys_never_accepted": len(plan.keys)
        - len({r.key_index for r in records if r.status in OK_STATUSES}),
        "duplicates_replayed_header": sum(
            1 for r in records if r.kind != Kind.FIRST and r.replayed
        ),
        "answered_processing": sum(1 for r in records if r.payment_status == "processing"),
        "provider": asdict(provider),
        "charges_equal_unique_succeeded": provider.total_charges
        == ledger.by_status.get("succeeded", 0),
        "ledger": {
            **{k: v for k, v in asdict(ledger_check).items() if k != "succeeded_payment_ids"},
            "balanced": ledger_check.balanced,
        },
        "postgres": {
            **asdict(locks),
            "lock_waits_logged_over_200ms": lock_wait_lines,
        },
        "log_bytes": log_bytes,
        # The target's measure: API + worker bytes per *successful* payment (the lines
        # of failed payments and of every request turned away are in the numerator).
        "app_log_bytes_per_succeeded": round(app_log_bytes / max(succeeded, 1), 1),
        "app_log_bytes_per_payment": round(app_log_bytes / max(terminal, 1), 1),
        "all_log_bytes_per_payment": round(sum(log_bytes.values()) / max(terminal, 1), 1),
        # The split: the worker logs per payment, the API per request it answers
        # (duplicates and retries included), so the storm's mix can be read out.
        "worker_log_bytes_per_payment": round(
            sum(v for k, v in log_bytes.items() if k.startswith("worker")) / max(terminal, 1), 1
        ),
        "api_log_bytes_per_request": round(
            sum(v for k, v in log_bytes.items() if k.startswith("api")) / max(len(records), 1), 1
        ),
        "processes": {name: asdict(stats) for name, stats in groups.items()},
        "cpu_ms_per_payment": {
            name: round(stats.cpu_seconds * 1000 / max(terminal, 1), 1)
            for name, stats in groups.items()
        },
        "generator": {
            "processes": generators,
            "pids": generator_pids,
            "cpu_seconds": round(sum(g.cpu_seconds for g in generator_results), 2),
            "cpu_ms_per_request": round(
                sum(g.cpu_seconds for g in generator_results) * 1000 / max(plan.requests, 1), 3
            ),
            "loop_lag_ms": generator_loop_lag_ms(generator_results),
            # Before the first request: not in any request's latency.
            "connections": sum(g.connections for g in generator_results),
            "connect_ms": round(
                max((g.connect_seconds for g in generator_results), default=0) * 1000, 1
            ),
        },
        "history": asdict(history),
        "billable_actions_method": observe.ACTIONS_METHOD,
        # While the generators ran: the floor under every answer's latency.
        "api_event_loop_lag": _between(api_before, api_after, API_LOOP_LAG),
        "api_gc_pauses": _between(api_before, api_after, GC_PAUSES),
    }


# -- unloaded latency ----------------------------------------------------------------


async def unloaded(target: Target, credentials: Credentials, count: int) -> dict[str, Any]:
    """``count`` payments one after another on an idle stack, then a duplicate of each."""
    if count <= 0:
        return {}
    conn = Connection(target.host, target.port)
    hostport = f"{target.host}:{target.port}"
    first: list[float] = []
    dup: list[float] = []
    outcomes: list[str] = []
    try:
        for i in range(count):
            key = f"unloaded-{time.time_ns()}-{i}"
            headers = {
                "Authorization": f"Bearer {credentials.api_key}",
                "Content-Type": "application/json",
                "Idempotency-Key": key,
            }
            body = json.dumps(
                {"amount": 1000 + i, "currency": "EUR", "payment_method": "pm_card_visa"}
            ).encode()
            raw = build_request("POST", hostport, "/v1/payments", headers, body)
            for bucket in (first, dup):
                started = time.perf_counter()
                response = await conn.request(raw)
                bucket.append((time.perf_counter() - started) * 1000)
                if bucket is first:
                    outcomes.append(json.loads(response.body).get("status", str(response.status)))
    finally:
        await conn.close()
    return {
        "count": count,
        "first_ms": _pct(first),
        "duplicate_of_finished_ms": _pct(dup),
        "outcomes": {s: outcomes.count(s) for s in set(outcomes)},
    }


API_LOOP_LAG, GC_PAUSES = observe.API_HISTOGRAMS


def _between(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], name: str
) -> dict[str, float | int | None] | None:
    if name not in after:
        return None
    return observe.histogram_between(before.get(name, {}), after[name])


def _histogram_line(h: dict[str, Any] | None) -> str:
    if not h or not h.get("count"):
        return "-"
    return (
        f"n={h['count']}, {fmt(h['sum_ms'])} ms in all; p50 <= {fmt(h['p50_under_ms'])}, "
        f"p99 <= {fmt(h['p99_under_ms'])}, max <= {fmt(h['max_under_ms'])} ms"
    )


def _pct(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": _r(percentile(values, 50)),
        "p95": _r(percentile(values, 95)),
        "max": _r(max(values) if values else None),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- the baselines -------------------------------------------------------------------


async def baseline(
    target: Target, workflow: str, args: argparse.Namespace, count: int, run_id: str
) -> dict[str, Any]:
    client = await Client.connect(
        target.temporal_address, namespace=NAMESPACE, data_converter=data_converter(Settings())
    )
    unloaded_ms: list[float] = []
    for i in range(args.unloaded):
        started = time.perf_counter()
        await client.execute_workflow(
            workflow, args.baseline_activities, id=f"bench-{run_id}-{workflow}-unloaded-{i}",
            task_queue=BASELINE_TASK_QUEUE,
        )  # fmt: skip
        unloaded_ms.append((time.perf_counter() - started) * 1000)

    ctx = multiprocessing.get_context("spawn")
    generators = max(1, args.generators)
    progress = Progress(workflow, count, generators)
    results = ctx.Queue()
    groups = target.process_groups()
    sampler = observe.ProcessSampler({k: v for k, v in groups.items() if k == "temporal"})
    sampler.start()
    ids = [f"bench-{run_id}-{workflow}-{i}" for i in range(count)]
    started_wall = time.time()
    processes = [
        ctx.Process(
            target=baseline_main,
            args=(
                target.temporal_address,
                NAMESPACE,
                workflow,
                args.baseline_activities,
                ids[slot::generators],
                max(1, args.concurrency // generators),
                progress.array,
                slot,
                results,
            ),
            name=f"bench-baseline-{slot}",
        )
        for slot in range(generators)
    ]
    for process in processes:
        process.start()
    collecting = asyncio.create_task(_collect(processes, results, generators))
    while not collecting.done():
        progress.show()
        await asyncio.wait({collecting}, timeout=1)
    progress.show(force=True)
    progress.end()
    generator_results = collecting.result()
    temporal = (await sampler.stop()).get("temporal")
    records: list[Record] = [r for g in generator_results for r in g.records]
    ok = [r for r in records if r.status in OK_STATUSES]
    finished = max((r.sent_at + r.latency for r in ok), default=time.time())
    duration = max(finished - started_wall, 1e-9)
    history = await observe.sample_histories(
        target.temporal_address,
        NAMESPACE,
        random.Random(args.seed).sample(ids, min(10, count)),  # noqa: S311 - sampling
    )
    return {
        "workflow": workflow,
        "activities": args.baseline_activities,
        "workflows": count,
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_samples": [s for g in generator_results for s in g.error_samples][:5],
        "duration_seconds": round(duration, 2),
        "workflows_per_second": round(len(ok) / duration, 2),
        "latency_ms": latency_ms(records),
        "unloaded_ms": _pct(unloaded_ms),
        "temporal_cpu_ms_per_workflow": (
            round(temporal.cpu_seconds * 1000 / max(len(ok), 1), 1) if temporal else None
        ),
        "generator_cpu_seconds": round(sum(g.cpu_seconds for g in generator_results), 2),
        "history": asdict(history),
    }


def _baseline_workers(
    target: Target, count: int, logs_dir: Path, nice: int
) -> list[ManagedProcess]:
    env = (
        target.stack.settings_env()
        if target.stack
        else {**os.environ, "PAYMENTS_TEMPORAL_ADDRESS": target.temporal_address}
    )
    return [
        ManagedProcess(
            f"baseline-worker-{n}",
            [sys.executable, "-m", "bench.baseline_worker"],
            env=env,
            cwd=REPO_ROOT,
            log_path=logs_dir / f"baseline-worker-{n}.log",
            nice=nice,  # as the payments' worker runs
        )
        for n in range(1, count + 1)
    ]


# -- the whole run -------------------------------------------------------------------


async def _start_target(args: argparse.Namespace) -> Target:
    if args.target:
        return Target(
            api_url=args.target,
            database_url=args.database_url,
            temporal_address=args.temporal_address,
            provider_url=args.provider_url,
            provider_api_key=args.provider_api_key,
        )
    data_dir = BENCH_DIR / "stack"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = StackConfig(
        data_dir=data_dir,
        ports=StackPorts.free(),
        api_processes=args.api_processes,
        worker_processes=args.workers,
        background_nice=args.background_nice,
    )
    stack = Stack(config)
    print(f"Starting the stack in {data_dir} (api processes {args.api_processes}, "
          f"workers {args.workers}) ...", flush=True)  # fmt: skip
    await stack.start()
    # Payloads are encrypted: the bench's own clients (here and in the generator
    # processes, which inherit the environment) read them with the stack's key.
    stack_env = stack.settings_env()
    for name in ("PAYMENTS_PAYLOAD_KEYS", "PAYMENTS_PAYLOAD_KEY_ID"):
        if name in stack_env:
            os.environ[name] = stack_env[name]
    print(f"  ready in {stack.timings['total']:.1f} s: API {stack.api_url}, "
          f"Temporal {stack.temporal_address}", flush=True)  # fmt: skip
    return Target(
        api_url=stack.api_url,
        database_url=stack.database_url,
        temporal_address=stack.temporal_address,
        provider_url=stack.provider_url,
        provider_api_key=DEV_PROVIDER_API_KEY,
        stack=stack,
    )


def _faults(args: argparse.Namespace) -> dict[str, Any]:
    faults: dict[str, Any] = {}
    if args.provider_latency_ms:
        faults["latency_ms"] = args.provider_latency_ms
    if args.provider_5xx:
        faults["error_rate"] = args.provider_5xx
    if args.timeout_after_charge:
        faults["timeout_after_charge_rate"] = args.timeout_after_charge
    return faults


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = await _start_target(args)
    baseline_workers: list[ManagedProcess] = []
    try:
        report: dict[str, Any] = {
            "run_id": run_id,
            "settings": {k: v for k, v in vars(args).items() if k != "provider_api_key"},
            "machine": {
                "cpus": psutil.cpu_count(),
                "python": sys.version.split()[0],
                # Other work on the machine skews every figure: look here first.
                "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            },
        }
        credentials = [await target.add_client(f"bench-{run_id}-{i}") for i in range(args.clients)]
        idle_client = await target.add_client(f"bench-{run_id}-unloaded")
        # The storm's users are clients that existed before it: their keys are in the API
        # processes' key mirror, reloaded every third of the key cache's period.
        clients_known_at = time.monotonic() + Settings().api_key_cache_seconds / 3 + 0.25
        faults = _faults(args)
        report["unloaded"] = await unloaded(target, idle_client, args.unloaded)
        print(f"Unloaded: {json.dumps(report['unloaded'])}", flush=True)
        await observe.set_provider_faults(target.provider_url, target.provider_api_key, faults)
        report["faults"] = faults
        plan = build_plan(
            args.requests, duplicate_share=args.duplicates, clients=args.clients,
            decline_share=args.decline_share, seed=args.seed, run_id=run_id,
        )  # fmt: skip
        print(f"Storm: {plan.requests} requests ({len(plan.keys)} unique keys, "
              f"{plan.duplicates} duplicates), {args.concurrency} in flight, "
              f"{args.clients} clients", flush=True)  # fmt: skip
        await asyncio.sleep(max(0.0, clients_known_at - time.monotonic()))
        records_path = BENCH_DIR / f"records-{run_id}.csv"
        report["storm"] = await storm(target, plan, credentials, args, records_path)
        print(f"  every request of the storm: {records_path}", flush=True)
        print(f"  storm figures saved: {write_report(report)}", flush=True)
        await observe.set_provider_faults(target.provider_url, target.provider_api_key, {})

        if not args.no_baseline:
            logs_dir = target.stack.logs_dir if target.stack else BENCH_DIR / "logs"
            baseline_workers = _baseline_workers(
                target, args.workers, logs_dir, args.background_nice
            )
            for worker in baseline_workers:
                worker.start()
                await worker.wait_ready(
                    functools.partial(_logged, worker, "baseline worker polling"),
                    within=60,
                    what="polling",
                )
            count = len(plan.keys)
            report["baselines"] = {}
            for workflow in ("BenchBaseline", "BenchBaselineLocal"):
                print(f"Baseline {workflow}: {count} workflows of {args.baseline_activities} "
                      f"no-op activities, {args.concurrency} in flight", flush=True)  # fmt: skip
                report["baselines"][workflow] = await baseline(
                    target, workflow, args, count, run_id
                )
                write_report(report)
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return report
    finally:
        for worker in baseline_workers:
            await worker.terminate(grace=10)
        if target.stack is not None:
            await target.stack.stop()


async def _logged(process: ManagedProcess, text: str) -> bool:
    return text in process.tail(60)


def summarise(report: dict[str, Any]) -> tuple[str, str]:
    storm = report["storm"]
    lat = storm["latency_ms"]
    baselines = report.get("baselines", {})
    regular = baselines.get("BenchBaseline", {}).get("workflows_per_second")
    local = baselines.get("BenchBaselineLocal", {}).get("workflows_per_second")
    pps = storm["payments_per_second"]
    ratio = round(pps / regular, 3) if regular else None
    ratio_local = round(pps / local, 3) if local else None
    report["ratio"] = ratio
    report["ratio_local"] = ratio_local
    rows: list[tuple[str, str]] = [
        ("Storm", ""),
        ("requests / unique / duplicates",
         f"{storm['requests']} / {storm['unique_keys']} / {storm['duplicates']}"),
        ("in flight (max) / generators", f"{storm['concurrency']} / {storm['generators']}"),
        ("payments terminal", f"{storm['payments_terminal']} {storm['payments_by_status']}"),
        ("completed payments/s",
         f"{fmt(pps)}  (all in ledger after {storm['duration_seconds']} s, "
         f"workflows closed after {storm.get('workflows_closed_seconds')} s)"),
        ("HTTP statuses", json.dumps(storm["http_statuses"])),
        ("errors by status and type", json.dumps(storm["errors_by_status"]) or "none"),
        ("retries after 503/429/409 / keys never accepted",
         f"{storm['retries_sent']} / {storm['keys_never_accepted']}"),
    ]  # fmt: skip
    for kind in (
        "first",
        "duplicates",
        "dup_in_flight",
        "dup_after",
        "dup_after_finished",
        "originals",
        "replays",
        "replays_running",
        "replays_final",
        "in_progress_409",
        "repeats",
    ):
        v = lat.get(kind)
        if v is None:
            continue  # a report from before the line existed
        rows.append(
            (f"latency {kind} (ms)",
             f"p50 {fmt(v['p50'])}  p95 {fmt(v['p95'])}  p99 {fmt(v['p99'])}  n={v['count']}")
        )  # fmt: skip
    if (slow := storm.get("slow_repeats")) is not None:
        rows.append(
            (f"repeats over {slow['slow_ms']:.0f} ms: what came just before",
             f"{slow['count']} of {slow['of']}, in {slow['seconds_with_slow']} seconds of the "
             f"storm ({fmt(100 * (slow['share_in_busiest_5_seconds'] or 0))} % in the busiest 5); "
             f"requests sent in the 100 ms before: median "
             f"{fmt(slow['sent_in_100ms_before_median'])} "
             f"(before the others: {fmt(slow['others_sent_in_100ms_before_median'])})")
        )  # fmt: skip
    prov = storm["provider"]
    ledger = storm["ledger"]
    pg = storm["postgres"]
    unl = report.get("unloaded", {})
    rows += [
        ("provider charges / charged keys / succeeded payments",
         f"{prov['total_charges']} / {prov['charged_keys']} / "
         f"{storm['payments_by_status'].get('succeeded', 0)}  "
         f"(double-charged keys {prov['double_charged_keys']}, "
         f"charge calls {prov['charge_requests']})"),
        ("ledger balanced", "yes" if ledger["balanced"] else f"NO {ledger}"),
        ("PostgreSQL deadlocks", str(pg["deadlocks"])),
        ("lock waits (pg_locks sampled)",
         f"max {pg['max_waiting']} waiting, in {pg['samples_with_waits']}/{pg['samples']} "
         f"samples; waits > 200 ms logged: {pg['lock_waits_logged_over_200ms']}"),
        ("log bytes / succeeded payment (api+worker)",
         f"{storm.get('app_log_bytes_per_succeeded')}  (per terminal payment "
         f"{storm['app_log_bytes_per_payment']}, all processes "
         f"{storm['all_log_bytes_per_payment']}; "
         f"worker {storm.get('worker_log_bytes_per_payment')} per payment, "
         f"API {storm.get('api_log_bytes_per_request')} per request)"),
        ("history events / payment",
         f"mean {fmt(storm['history']['events_mean'])}, max {storm['history']['events_max']} "
         f"(n={storm['history']['sampled']})"),
        ("billable actions / payment (est.)", fmt(storm["history"]["actions_mean"])),
        ("generator CPU", f"{storm['generator']['cpu_seconds']} s "
         f"({storm['generator']['cpu_ms_per_request']} ms/request)"),
        ("generator's own loop lag (ms)", lag_line(storm["generator"].get("loop_lag_ms"))),
        ("connections opened and used once before the storm",
         f"{storm['generator'].get('connections')} in {storm['generator'].get('connect_ms')} ms"
         " (GET /healthz each)"),
        ("API event loop lag (0.25 s timer)", _histogram_line(storm.get("api_event_loop_lag"))),
        ("API garbage collections", _histogram_line(storm.get("api_gc_pauses"))),
        ("unloaded payment (ms)", json.dumps(unl.get("first_ms"))),
        ("unloaded duplicate of finished (ms)", json.dumps(unl.get("duplicate_of_finished_ms"))),
        ("Processes (peak RSS MB sum / largest, CPU s, CPU ms/payment)", ""),
    ]  # fmt: skip
    for name, stats in storm["processes"].items():
        rows.append(
            (f"{name} x{stats['processes']}",
             f"{fmt(stats['peak_rss_mb'])} / {fmt(stats['peak_process_rss_mb'])} MB, "
             f"{fmt(stats['cpu_seconds'])} s, {storm['cpu_ms_per_payment'][name]} ms/payment")
        )  # fmt: skip
    if baselines:
        rows.append(("Baselines (same server, same worker settings)", ""))
        for name, b in baselines.items():
            rows.append(
                (name,
                 f"{fmt(b['workflows_per_second'])} wf/s, p50 {fmt(b['latency_ms']['p50'])} ms, "
                 f"unloaded p50 {fmt(b['unloaded_ms']['p50'])} ms, "
                 f"events {fmt(b['history']['events_mean'])}, "
                 f"actions {fmt(b['history']['actions_mean'])}, "
                 f"Temporal CPU {b['temporal_cpu_ms_per_workflow']} ms/wf, errors {b['errors']}")
            )  # fmt: skip
    summary = (
        f"SUMMARY payments/s={fmt(pps)} ratio={ratio} ratio_local={ratio_local} "
        f"dup_p99_ms={lat['duplicates']['p99']} replay_p99_ms={lat['replays']['p99']} "
        f"repeats_p99_ms={lat.get('repeats', {}).get('p99')} "
        f"first_p50_ms={lat['first']['p50']} "
        f"double_charges={prov['double_charged_keys']} ledger_balanced={ledger['balanced']} "
        f"deadlocks={pg['deadlocks']} "
        f"log_bytes_per_succeeded={storm.get('app_log_bytes_per_succeeded')}"
    )
    return render_table(rows), summary


def write_report(report: dict[str, Any]) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"report-{report['run_id']}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
