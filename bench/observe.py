"""What the benchmark watches while the storm runs: processes (psutil), PostgreSQL
(deadlocks, lock waits), the ledger, the sandbox provider and Temporal histories."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from config.settings import Settings
from config.temporal import data_converter

# -- processes -----------------------------------------------------------------------


@dataclass
class GroupStats:
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0  # the group's summed RSS at its highest sample
    peak_process_rss_mb: float = 0.0  # the largest single process
    processes: int = 0


class ProcessSampler:
    """Samples named process trees (a root pid and its children) every ``interval`` s.

    CPU seconds are the growth of user+system time over the sampled window, per
    process, summed per group; a process first seen mid-run counts from its start.
    PostgreSQL's RSS counts shared buffers once per backend, so its sum overstates.
    """

    def __init__(self, groups: dict[str, list[int]], interval: float = 0.5) -> None:
        self.groups = groups
        self.interval = interval
        self._first_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self._peak: dict[str, GroupStats] = {name: GroupStats() for name in groups}
        self._pid_group: dict[int, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._primed = False

    def _tree(self, pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        for name, roots in self.groups.items():
            rss_total, seen = 0, 0
            for root in roots:
                for proc in self._tree(root):
                    try:
                        with proc.oneshot():
                            cpu = proc.cpu_times()
                            rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    total = cpu.user + cpu.system
                    if proc.pid not in self._first_cpu:
                        self._first_cpu[proc.pid] = total if not self._primed else 0.0
                    self._last_cpu[proc.pid] = total
                    self._pid_group[proc.pid] = name
                    rss_total += rss
                    seen += 1
                    stats = self._peak[name]
                    stats.peak_process_rss_mb = max(stats.peak_process_rss_mb, rss / 2**20)
            stats = self._peak[name]
            stats.peak_rss_mb = max(stats.peak_rss_mb, rss_total / 2**20)
            stats.processes = max(stats.processes, seen)
        self._primed = True

    async def _loop(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict[str, GroupStats]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        for pid, last in self._last_cpu.items():
            self._peak[self._pid_group[pid]].cpu_seconds += last - self._first_cpu[pid]
        return self._peak


# -- PostgreSQL ----------------------------------------------------------------------


def libpq_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class LockStats:
    deadlocks: int = 0
    samples: int = 0
    samples_with_waits: int = 0
    max_waiting: int = 0
    waiting_total: int = 0  # sum over samples: mean = waiting_total / samples


class PgSampler:
    """``pg_stat_database.deadlocks`` before and after; ``pg_locks`` not granted, sampled."""

    def __init__(self, database_url: str, interval: float = 0.5) -> None:
        self.dsn = libpq_dsn(database_url)
        self.interval = interval
        self.stats = LockStats()
        self._deadlocks_before = 0
        self._task: asyncio.Task[None] | None = None

    async def _deadlocks(self, conn: psycopg.AsyncConnection[Any]) -> int:
        row = await (
            await conn.execute(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )
        ).fetchone()
        return int(row[0]) if row else 0

    async def _loop(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while True:
                row = await (
                    await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
                ).fetchone()
                waiting = int(row[0]) if row else 0
                self.stats.samples += 1
                self.stats.waiting_total += waiting
                self.stats.max_waiting = max(self.stats.max_waiting, waiting)
                if waiting:
                    self.stats.samples_with_waits += 1
                await asyncio.sleep(self.interval)

    async def start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            self._deadlocks_before = await self._deadlocks(conn)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> LockStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            self.stats.deadlocks = await self._deadlocks(conn) - self._deadlocks_before
        return self.stats


# -- the ledger ----------------------------------------------------------------------


@dataclass
class LedgerState:
    by_status: dict[str, int] = field(default_factory=dict)
    last_terminal_at: float | None = None  # epoch seconds of the latest outcome

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def terminal(self) -> int:
        return self.by_status.get("succeeded", 0) + self.by_status.get("failed", 0)


async def ledger_state(dsn: str, client_ids: list[str]) -> LedgerState:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT status, count(*), max(extract(epoch FROM updated_at)) "
                "FROM payments WHERE client_id = ANY(%s) GROUP BY status",
                (client_ids,),
            )
        ).fetchall()
    state = LedgerState({str(s): int(n) for s, n, _ in rows})
    ends = [float(t) for s, _, t in rows if s in ("succeeded", "failed") and t is not None]
    state.last_terminal_at = max(ends) if ends else None
    return state


@dataclass
class LedgerCheck:
    unbalanced_payments: int
    succeeded_without_entries: int
    failed_with_entries: int
    succeeded_payment_ids: list[str]

    @property
    def balanced(self) -> bool:
        return (
            self.unbalanced_payments == 0
            and self.succeeded_without_entries == 0
            and self.failed_with_entries == 0
        )


async def check_ledger(dsn: str, client_ids: list[str]) -> LedgerCheck:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

        async def scalar(sql: str) -> int:
            row = await (await conn.execute(sql, (client_ids,))).fetchone()
            return int(row[0]) if row else 0

        unbalanced = await scalar(
            "SELECT count(*) FROM (SELECT e.payment_id FROM ledger_entries e "
            "JOIN payments p ON p.id = e.payment_id WHERE p.client_id = ANY(%s) "
            "GROUP BY e.payment_id, e.currency HAVING sum(e.amount) <> 0) AS u"
        )
        without = await scalar(
            "SELECT count(*) FROM payments p WHERE p.client_id = ANY(%s) "
            "AND p.status = 'succeeded' "
            "AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.payment_id = p.id)"
        )
        with_entries = await scalar(
            "SELECT count(*) FROM payments p WHERE p.client_id = ANY(%s) "
            "AND p.status = 'failed' "
            "AND EXISTS (SELECT 1 FROM ledger_entries e WHERE e.payment_id = p.id)"
        )
        rows = await (
            await conn.execute(
                "SELECT id FROM payments WHERE client_id = ANY(%s) AND status = 'succeeded'",
                (client_ids,),
            )
        ).fetchall()
    return LedgerCheck(unbalanced, without, with_entries, [str(r[0]) for r in rows])


# -- the sandbox provider ------------------------------------------------------------


@dataclass
class ProviderCheck:
    charged_keys: int  # our payment ids with at least one charge
    total_charges: int  # charges made for our payment ids
    double_charged_keys: int
    charge_requests: int  # charge calls received (retries included)
    succeeded_in_ledger_not_charged: int


async def provider_check(
    provider_url: str, api_key: str, payment_ids: set[str], succeeded_ids: list[str]
) -> ProviderCheck:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.get(
            f"{provider_url}/sandbox/stats", headers={"Authorization": f"Bearer {api_key}"}
        )
        response.raise_for_status()
        stats = response.json()
    charges: dict[str, int] = {
        k: int(v) for k, v in stats["charges_by_key"].items() if k in payment_ids
    }
    requests = sum(int(v) for k, v in stats["charge_requests_by_key"].items() if k in payment_ids)
    return ProviderCheck(
        charged_keys=len(charges),
        total_charges=sum(charges.values()),
        double_charged_keys=sum(1 for v in charges.values() if v > 1),
        charge_requests=requests,
        succeeded_in_ledger_not_charged=sum(1 for p in succeeded_ids if p not in charges),
    )


async def set_provider_faults(provider_url: str, api_key: str, faults: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        headers = {"Authorization": f"Bearer {api_key}"}
        if faults:
            response = await http.put(
                f"{provider_url}/sandbox/faults", json=faults, headers=headers
            )
        else:
            response = await http.delete(f"{provider_url}/sandbox/faults", headers=headers)
        response.raise_for_status()


# -- Temporal histories --------------------------------------------------------------

_ONE_ACTION = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
    EventType.EVENT_TYPE_TIMER_STARTED,
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
    EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
}

ACTIONS_METHOD = (
    "Temporal Cloud's published action list applied to each sampled history: 1 per "
    "workflow start, timer, search-attribute upsert, signal, accepted update and child "
    "start; 1 per activity attempt (ActivityTaskStarted.attempt); 1 per workflow task "
    "that recorded local-activity markers (all local activities of one workflow task "
    "are one action). Not visible in a history and so not counted: queries, rejected "
    "updates, heartbeats."
)


@dataclass
class HistoryStats:
    sampled: int = 0
    not_found: int = 0  # keys whose every request was refused: no run exists
    events_mean: float = 0.0
    events_max: int = 0
    actions_mean: float = 0.0
    workflow_tasks_mean: float = 0.0
    event_types: dict[str, float] = field(default_factory=dict)  # mean per history


def billable_actions(events: list[Any]) -> int:
    actions = 0
    local_activity_tasks: set[int] = set()
    for event in events:
        if event.event_type in _ONE_ACTION:
            actions += 1
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            actions += max(1, event.activity_task_started_event_attributes.attempt)
        elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            attributes = event.marker_recorded_event_attributes
            if attributes.marker_name == "core_local_activity":
                local_activity_tasks.add(attributes.workflow_task_completed_event_id)
    return actions + len(local_activity_tasks)


async def running_payment_workflows(address: str, namespace: str) -> int:
    """Payment workflows still open (visibility: may lag by a moment, fine for waiting)."""
    client = await Client.connect(address, namespace=namespace)
    count = await client.count_workflows('WorkflowType="Payment" AND ExecutionStatus="Running"')
    return count.count


async def sample_histories(
    address: str, namespace: str, workflow_ids: list[str], concurrency: int = 8
) -> HistoryStats:
    client = await Client.connect(
        address, namespace=namespace, data_converter=data_converter(Settings())
    )
    gate = asyncio.Semaphore(concurrency)
    lengths: list[int] = []
    actions: list[int] = []
    tasks: list[int] = []
    types: Counter[str] = Counter()
    missing = 0

    async def one(workflow_id: str) -> None:
        nonlocal missing
        async with gate:
            try:
                history = await client.get_workflow_handle(workflow_id).fetch_history()
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                missing += 1
                return
        events = list(history.events)
        lengths.append(len(events))
        actions.append(billable_actions(events))
        tasks.append(
            sum(1 for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
        )
        types.update(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events)

    await asyncio.gather(*(one(w) for w in workflow_ids))
    n = len(lengths)
    if n == 0:
        return HistoryStats(not_found=missing)
    return HistoryStats(
        sampled=n,
        not_found=missing,
        events_mean=sum(lengths) / n,
        events_max=max(lengths),
        actions_mean=sum(actions) / n,
        workflow_tasks_mean=sum(tasks) / n,
        event_types={k: round(v / n, 2) for k, v in sorted(types.items())},
    )


def log_sizes(logs: list[Any]) -> dict[str, int]:
    return {path.stem: path.stat().st_size for path in logs if path.exists()}


def now() -> float:
    return time.time()


# -- the API's own histograms -----------------------------------------------------------

# How late the API's event loop ran its timer, and how long its garbage collections
# took: a floor under every answer the storm measures (nothing is answered while the
# loop is late or collecting).
API_HISTOGRAMS = ("payments_api_event_loop_lag_seconds", "payments_gc_pause_seconds")


async def api_histograms(api_url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts (upper bound in seconds -> count) of API_HISTOGRAMS,
    all label sets added up; empty if ``/metrics`` cannot be read. With several API
    processes this is whichever one answered."""
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{api_url}/metrics")
            response.raise_for_status()
    except httpx.HTTPError:
        return {}
    buckets: dict[str, dict[float, float]] = {name: {} for name in API_HISTOGRAMS}
    for family in text_string_to_metric_families(response.text):
        if family.name not in API_HISTOGRAMS:
            continue
        for sample in family.samples:
            if sample.name == f"{family.name}_bucket":
                bound = float(sample.labels["le"])
                counts = buckets[family.name]
                counts[bound] = counts.get(bound, 0.0) + sample.value
            elif sample.name == f"{family.name}_sum":
                counts = buckets[family.name]
                counts[-1.0] = counts.get(-1.0, 0.0) + sample.value  # -1: the sum
    return buckets


def histogram_between(
    before: dict[float, float], after: dict[float, float]
) -> dict[str, float | int | None]:
    """What was observed between two scrapes: count, sum, and the bucket bounds (ms)
    that p50, p99 and the largest observation fall under (inf: above every bucket)."""
    bounds = sorted(b for b in after if b >= 0)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    count = int(cumulative[-1]) if cumulative else 0

    def bound_for(share: float) -> float | None:
        if count == 0:
            return None
        for bound, seen in zip(bounds, cumulative, strict=True):
            if seen >= share * count:
                return bound * 1000
        return math.inf

    return {
        "count": count,
        "sum_ms": round((after.get(-1.0, 0.0) - before.get(-1.0, 0.0)) * 1000, 1),
        "p50_under_ms": bound_for(0.50),
        "p99_under_ms": bound_for(0.99),
        "max_under_ms": bound_for(1.0),
    }
