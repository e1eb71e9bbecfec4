"""The benchmark's pieces that decide its figures: the request plan, the raw HTTP
client, percentiles and the billable-actions count. Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import (
    ActivityTaskStartedEventAttributes,
    HistoryEvent,
    MarkerRecordedEventAttributes,
)

from bench.__main__ import parse
from bench.loadgen import RETRY_JITTER_SECONDS, SLOTS, Record, _drive, retry_delay
from bench.observe import billable_actions
from bench.plan import Credentials, Kind, build_plan
from bench.rawhttp import Connection, build_request
from bench.report import latencies_by_kind, percentile, slow_repeats
from bench.run import _faults
from sandbox_provider.faults import Faults


def test_plan_has_the_requested_duplicate_share_spread_over_keys_and_clients() -> None:
    plan = build_plan(1000, duplicate_share=0.5, clients=4, seed=7)
    assert plan.requests == 1000
    assert plan.duplicates == 500
    assert len(plan.keys) == 500
    assert sum(k.in_flight_dups for k in plan.keys) == 250
    assert sum(k.after_dups for k in plan.keys) == 250
    assert {k.client for k in plan.keys} == {0, 1, 2, 3}
    assert len({k.key for k in plan.keys}) == 500
    bodies = [json.loads(k.body) for k in plan.keys]
    assert all(b["amount"] > 0 and b["currency"] == "EUR" for b in bodies)


def test_plan_shards_keep_every_key_with_its_duplicates() -> None:
    plan = build_plan(301, duplicate_share=0.3, clients=2)
    shards = plan.shard(3)
    assert sum(s.requests for s in shards) == plan.requests
    assert sorted(k.key for s in shards for k in s.keys) == sorted(k.key for k in plan.keys)


def test_plan_refuses_a_share_that_leaves_no_first_request() -> None:
    with pytest.raises(ValueError, match="duplicate share"):
        build_plan(10, duplicate_share=1.0, clients=1)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 50) is None


class _FakeApi:
    """A tiny HTTP/1.1 server: answers 201 to a first key, 201 + replay header after,
    closes the connection every third answer to exercise reconnects."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.answers = 0
        self.refuse_first: set[str] = set()  # keys answered 503 once
        self.retry_after = b"0"  # the 503's Retry-After
        self.conflict_first: dict[str, str] = {}  # keys answered 409 of this type once
        self.connected_at: list[float] = []
        self.requests_at: list[float] = []
        self.warmed_at: list[float] = []  # GET /healthz

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected_at.append(time.perf_counter())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /healthz "):
                    self.warmed_at.append(time.perf_counter())
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                self.requests_at.append(time.perf_counter())
                headers = dict(
                    line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
                )
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                key = headers["Idempotency-Key"]
                if key in self.refuse_first:
                    self.refuse_first.discard(key)
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: "
                        + self.retry_after
                        + b"\r\nContent-Length: 2\r\n\r\n{}"
                    )
                    await writer.drain()
                    continue
                if key in self.conflict_first:
                    problem = json.dumps(
                        {
                            "type": f"https://payments.example.com/problems/{self.conflict_first.pop(key)}"
                        }
                    ).encode()
                    writer.write(
                        b"HTTP/1.1 409 Conflict\r\nRetry-After: 0\r\n"
                        b"Content-Type: application/problem+json\r\n"
                        + f"Content-Length: {len(problem)}\r\n\r\n".encode()
                        + problem
                    )
                    await writer.drain()
                    continue
                replayed = key in self.seen
                self.seen[key] = self.seen.get(key, 0) + 1
                payload = json.dumps(
                    {"id": f"pay_{key}", "status": "succeeded", "echo": len(body)}
                ).encode()
                self.answers += 1
                close = self.answers % 3 == 0
                extra = "Idempotent-Replayed: true\r\n" if replayed else ""
                extra += "Connection: close\r\n" if close else ""
                writer.write(
                    f"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n{extra}"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
                if close:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[_FakeApi, int]]:
    api = _FakeApi()
    server = await asyncio.start_server(api.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield api, port


async def test_raw_client_reads_answers_and_reconnects(fake_api: tuple[_FakeApi, int]) -> None:
    _, port = fake_api
    conn = Connection("127.0.0.1", port)
    try:
        for i in range(5):
            raw = build_request(
                "POST", "x", "/v1/payments", {"Idempotency-Key": f"k{i}"}, b'{"a":1}'
            )
            response = await conn.request(raw)
            assert response.status == 201
            assert json.loads(response.body)["id"] == f"pay_k{i}"
    finally:
        await conn.close()


async def test_every_connection_is_open_and_used_once_before_the_first_request_is_sent(
    fake_api: tuple[_FakeApi, int],
) -> None:
    api, port = fake_api
    plan = build_plan(40, duplicate_share=0.5, clients=1)
    result = await _drive(plan, [Credentials("c1", "k1")], "127.0.0.1", port, 16, [0] * SLOTS, 0)
    assert result.connections == 16
    # The 16 connections (the server closes one every third answer: later ones are
    # reconnections) were all open, and each had been answered, before the first
    # payment request arrived.
    assert len(api.connected_at) > 16
    assert max(api.connected_at[:16]) < min(api.requests_at)
    assert len(api.warmed_at) == 16
    assert max(api.warmed_at) < min(api.requests_at)
    assert len(result.records) == 40
    assert {r.status for r in result.records} == {201}


async def test_generator_sends_every_request_and_labels_duplicates(
    fake_api: tuple[_FakeApi, int],
) -> None:
    api, port = fake_api
    plan = build_plan(60, duplicate_share=0.5, clients=2)
    progress = [0] * SLOTS
    result = await _drive(
        plan, [Credentials("c1", "k1"), Credentials("c2", "k2")], "127.0.0.1", port, 8, progress, 0
    )
    assert len(result.records) == 60
    assert progress == [60, 60, 0]
    assert all(count == 2 for count in api.seen.values())
    assert len(api.seen) == 30
    after = [r for r in result.records if r.kind in (Kind.DUP_AFTER, Kind.DUP_AFTER_FINISHED)]
    assert after
    # The fake API answers every first request 201: its after-duplicates are of a
    # finished payment.
    assert all(r.kind == Kind.DUP_AFTER_FINISHED for r in after)
    assert all(r.replayed for r in after)
    firsts = {r.key_index: r for r in result.records if r.kind == Kind.FIRST}
    # An after-duplicate is sent only once its first request has its answer.
    assert all(r.sent_at >= firsts[r.key_index].sent_at for r in after)
    lat = latencies_by_kind(result.records)
    assert lat["first"]["count"] == 30
    assert lat["duplicates"]["count"] == 30
    assert lat["dup_after_finished"]["count"] == len(after)
    # The fake API marks every second send of a key as the replay, whatever the plan
    # called it: originals and replays follow its header.
    assert lat["originals"]["count"] == 30
    assert lat["replays"]["count"] == 30
    assert lat["replays_final"]["count"] == 30
    assert lat["replays_running"]["count"] == 0


def test_replays_are_split_by_the_state_they_answered() -> None:
    def record(latency: float, status: int, replayed: bool, state: str | None) -> Record:
        return Record(1, "dup_in_flight", status, latency, 0.0, replayed, state, "pay_1")

    records = [
        record(0.010, 202, True, "processing"),
        record(0.900, 202, True, "processing"),
        record(0.004, 200, True, "succeeded"),
        record(0.006, 200, True, "failed"),
        record(5.000, 202, False, "processing"),  # the original, not a replay
        record(0.001, 409, False, None),  # not answered with the payment
    ]
    lat = latencies_by_kind(records)
    assert lat["replays"]["count"] == 4
    assert lat["replays_running"] == {
        "count": 2,
        "p50": 10.0,
        "p95": 900.0,
        "p99": 900.0,
        "max": 900.0,
    }
    assert lat["replays_final"]["count"] == 2
    assert lat["replays_final"]["max"] == 6.0


def test_repeats_count_the_409s_that_said_the_first_request_is_in_progress() -> None:
    def record(latency: float, status: int, replayed: bool, problem: str | None) -> Record:
        return Record(1, "dup_in_flight", status, latency, 0.0, replayed, None, None, 1, problem)

    records = [
        record(0.020, 202, True, None),
        record(0.003, 409, False, "idempotency-request-in-progress"),
        record(0.150, 409, False, "idempotency-request-in-progress"),
        record(0.002, 409, False, "idempotency-key-reused"),  # a different body: no repeat
        record(5.000, 503, False, "payments-backlog-full"),
    ]
    lat = latencies_by_kind(records)
    assert lat["replays"]["count"] == 1
    assert lat["in_progress_409"]["count"] == 2
    assert lat["in_progress_409"]["max"] == 150.0
    assert lat["repeats"]["count"] == 3
    assert lat["repeats"]["p50"] == 20.0
    assert lat["repeats"]["max"] == 150.0


async def test_generator_retries_a_refused_request_with_the_same_key_after_retry_after(
    fake_api: tuple[_FakeApi, int],
) -> None:
    api, port = fake_api
    plan = build_plan(4, duplicate_share=0.0, clients=1)
    api.refuse_first = {plan.keys[0].key}
    api.retry_after = b"1"
    result = await _drive(plan, [Credentials("c1", "k1")], "127.0.0.1", port, 2, [0] * SLOTS, 0)
    statuses = sorted((r.key_index, r.attempt, r.status) for r in result.records)
    assert statuses == [(0, 1, 503), (0, 2, 201), (1, 1, 201), (2, 1, 201), (3, 1, 201)]
    refused, resent = sorted(
        (r for r in result.records if r.key_index == 0), key=lambda r: r.attempt
    )
    assert resent.sent_at - (refused.sent_at + refused.latency) >= 1.0  # no sooner


def test_a_retry_waits_its_retry_after_and_up_to_a_second_more_at_random() -> None:
    rng = random.Random(7)
    delays = [retry_delay(3.0, rng) for _ in range(1000)]
    assert all(3.0 <= d < 3.0 + RETRY_JITTER_SECONDS for d in delays)
    # Spread over the whole second, not bunched: every tenth of it is used.
    assert {int((d - 3.0) * 10) for d in delays} == set(range(10))


def test_billable_actions_count_attempts_and_one_per_local_activity_task() -> None:
    events = [
        HistoryEvent(event_type=EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED),
        HistoryEvent(event_type=EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED),
        HistoryEvent(
            event_type=EventType.EVENT_TYPE_MARKER_RECORDED,
            marker_recorded_event_attributes=MarkerRecordedEventAttributes(
                marker_name="core_local_activity", workflow_task_completed_event_id=4
            ),
        ),
        HistoryEvent(
            event_type=EventType.EVENT_TYPE_MARKER_RECORDED,
            marker_recorded_event_attributes=MarkerRecordedEventAttributes(
                marker_name="core_local_activity", workflow_task_completed_event_id=4
            ),
        ),
        HistoryEvent(
            event_type=EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
            activity_task_started_event_attributes=ActivityTaskStartedEventAttributes(attempt=3),
        ),
        HistoryEvent(event_type=EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES),
        HistoryEvent(event_type=EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED),
    ]
    # start 1 + update 1 + one workflow task of local activities 1 + 3 attempts + upsert 1
    assert billable_actions(events) == 7


def test_fault_flags_become_a_fault_set_the_sandbox_accepts() -> None:
    args = parse(
        ["--provider-latency-ms", "200", "--provider-5xx", "0.1", "--timeout-after-charge", "0.01"]
    )
    faults = Faults(**_faults(args))  # the sandbox refuses unknown fields
    assert (faults.latency_ms, faults.error_rate, faults.timeout_after_charge_rate) == (
        200,
        0.1,
        0.01,
    )
    assert _faults(parse([])) == {}


async def test_generator_retries_a_409_only_while_the_first_request_is_in_progress(
    fake_api: tuple[_FakeApi, int],
) -> None:
    api, port = fake_api
    plan = build_plan(2, duplicate_share=0.0, clients=1)
    api.conflict_first = {
        plan.keys[0].key: "idempotency-request-in-progress",
        plan.keys[1].key: "idempotency-key-unusable",
    }
    result = await _drive(plan, [Credentials("c1", "k1")], "127.0.0.1", port, 2, [0] * SLOTS, 0)
    statuses = sorted((r.key_index, r.attempt, r.status, r.problem) for r in result.records)
    assert statuses == [
        (0, 1, 409, "idempotency-request-in-progress"),
        (0, 2, 201, None),
        (1, 1, 409, "idempotency-key-unusable"),  # a new key is needed: not resent
    ]


def test_slow_repeats_are_told_apart_by_the_requests_sent_just_before_them() -> None:
    def record(sent_at: float, latency: float, replayed: bool = True) -> Record:
        status = 202 if replayed else 503
        return Record(1, "dup_after", status, latency, sent_at, replayed, "processing", None)

    burst = [record(10.0 + i / 1000, 5.0, replayed=False) for i in range(50)]  # 10.000-10.049
    records = [
        *burst,
        record(10.05, 0.300),  # sent right behind the burst: slow
        record(10.06, 0.250),
        record(20.0, 0.005),  # alone: fast
        record(30.0, 0.008),
        record(40.0, 0.006),
    ]
    slow = slow_repeats(records)
    assert slow["count"] == 2
    assert slow["of"] == 5
    assert slow["sent_in_100ms_before_median"] == 50.5  # the burst, and each other
    assert slow["others_sent_in_100ms_before_median"] == 0
    assert slow["seconds_with_slow"] == 1
    assert slow["share_in_busiest_5_seconds"] == 1.0
    assert slow_repeats([])["count"] == 0
