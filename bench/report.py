"""Figures from records: percentiles, error counts, the table and the summary line."""

from __future__ import annotations

import bisect
import csv
import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.loadgen import GeneratorResult, Record
from bench.plan import Kind

OK_STATUSES = (200, 201, 202)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def write_records(path: Path, records: Iterable[Record]) -> None:
    """Every request of the storm, one CSV row each (send time, latency, status, kind,
    replayed, attempt): for questions the report's percentiles do not answer, such as
    what arrived just before a slow answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [field.name for field in dataclasses.fields(Record)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for record in sorted(records, key=lambda r: r.sent_at):
            writer.writerow([getattr(record, name) for name in names])


def latency_ms(records: Iterable[Record], *, answered_only: bool = True) -> dict[str, Any]:
    """Percentiles of the answers' latencies; ``answered_only``: of 200, 201 and 202."""
    values = [r.latency * 1000 for r in records if r.status in OK_STATUSES or not answered_only]
    return {
        "count": len(values),
        "p50": _round(percentile(values, 50)),
        "p95": _round(percentile(values, 95)),
        "p99": _round(percentile(values, 99)),
        "max": _round(max(values) if values else None),
    }


def generator_loop_lag_ms(results: Iterable[GeneratorResult]) -> dict[str, Any]:
    """How late the generators' own loops ran their timers: the part of a measured
    latency that is the generator's (busy, collecting garbage, or without a CPU)."""
    values = [lag * 1000 for result in results for lag in result.loop_lags]
    return {
        "ticks": len(values),
        "p50": _round(percentile(values, 50)),
        "p99": _round(percentile(values, 99)),
        "max": _round(max(values) if values else None),
    }


def lag_line(lag: dict[str, Any] | None) -> str:
    if not lag or not lag.get("ticks"):
        return "-"
    return f"p50 {fmt(lag['p50'])}  p99 {fmt(lag['p99'])}  max {fmt(lag['max'])}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def latencies_by_kind(records: list[Record]) -> dict[str, Any]:
    dups = [r for r in records if r.kind != Kind.FIRST]
    return {
        "first": latency_ms(r for r in records if r.kind == Kind.FIRST),
        "duplicates": latency_ms(dups),
        "dup_in_flight": latency_ms(r for r in dups if r.kind == Kind.DUP_IN_FLIGHT),
        "dup_after": latency_ms(
            r for r in dups if r.kind in (Kind.DUP_AFTER, Kind.DUP_AFTER_FINISHED)
        ),
        "dup_after_finished": latency_ms(r for r in dups if r.kind == Kind.DUP_AFTER_FINISHED),
        # As the API saw them: a planned duplicate whose earlier sends were all refused
        # (nothing started) is the request that creates the payment, and waits for its
        # outcome as a first request does; a planned first can be a replay of its own
        # duplicate that got in before it. Idempotent-Replayed says which was which.
        "originals": latency_ms(r for r in records if not r.replayed),
        "replays": latency_ms(r for r in records if r.replayed),
        # A replay answered "processing" read a running payment's row (or waited for
        # its first request to open it); one answered a final status read a finished one.
        "replays_running": latency_ms(
            r for r in records if r.replayed and r.payment_status == "processing"
        ),
        "replays_final": latency_ms(
            r for r in records if r.replayed and r.payment_status not in (None, "processing")
        ),
        # A repeat whose first request is still queued or starting its run is told so
        # (409, come back later) rather than answered with the payment.
        "in_progress_409": latency_ms((r for r in records if _in_progress(r)), answered_only=False),
        # Every request the API recognised as a repeat, whichever of the two answers.
        "repeats": latency_ms(
            (r for r in records if r.replayed or _in_progress(r)), answered_only=False
        ),
    }


def _in_progress(record: Record) -> bool:
    return record.status == 409 and record.problem == "idempotency-request-in-progress"


def statuses(records: Iterable[Record]) -> dict[str, int]:
    counts = Counter("connection_error" if r.status == 0 else str(r.status) for r in records)
    return dict(sorted(counts.items()))


def errors(records: Iterable[Record]) -> dict[str, int]:
    """Error answers by status and problem type ("503 payments-backlog-full"): one 503
    is a full backlog, another an unreachable ledger, and they call for different fixes."""
    counts = Counter(
        "connection_error" if r.status == 0 else f"{r.status} {r.problem or '?'}"
        for r in records
        if r.status not in (200, 201, 202)
    )
    return dict(sorted(counts.items()))


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if abs(value) < 100 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        f"  {name.ljust(width)}  {value}" if value else f"{name}" for name, value in rows
    )


def slow_repeats(records: list[Record], slow_ms: float = 100.0) -> dict[str, Any]:
    """Where the repeats' tail comes from: how many requests were sent in the 100 ms
    before each slow repeat (over ``slow_ms``) and before each of the others, and how
    many seconds of the storm the slow ones fall in."""
    sent = sorted(r.sent_at for r in records)

    def sent_just_before(record: Record) -> int:
        return bisect.bisect_left(sent, record.sent_at) - bisect.bisect_left(
            sent, record.sent_at - 0.1
        )

    repeats = [r for r in records if r.replayed or _in_progress(r)]
    slow = [r for r in repeats if r.latency * 1000 > slow_ms]
    others = [r for r in repeats if r.latency * 1000 <= slow_ms]
    start = sent[0] if sent else 0.0
    by_second = Counter(int(r.sent_at - start) for r in slow)
    busiest = sum(count for _, count in by_second.most_common(5))
    return {
        "slow_ms": slow_ms,
        "count": len(slow),
        "of": len(repeats),
        "sent_in_100ms_before_median": _median([sent_just_before(r) for r in slow]),
        "others_sent_in_100ms_before_median": _median([sent_just_before(r) for r in others]),
        "seconds_with_slow": len(by_second),
        "share_in_busiest_5_seconds": round(busiest / len(slow), 3) if slow else None,
    }


def _median(values: list[int]) -> float | None:
    return statistics.median(values) if values else None
