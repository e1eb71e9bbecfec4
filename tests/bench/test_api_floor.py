"""The bench's reading of the API's own histograms (event loop lag, GC pauses)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.observe import api_histograms, histogram_between
from devstack.ports import free_port


def test_between_two_scrapes_counts_only_what_happened_in_between() -> None:
    before = {0.01: 5.0, 0.1: 5.0, 1.0: 5.0, math.inf: 5.0, -1.0: 0.02}
    # 100 more: 90 under 10 ms, 9 more under 100 ms, 1 under 1 s.
    after = {0.01: 95.0, 0.1: 104.0, 1.0: 105.0, math.inf: 105.0, -1.0: 1.52}
    h = histogram_between(before, after)
    assert h["count"] == 100
    assert h["sum_ms"] == 1500.0
    assert h["p50_under_ms"] == 10.0
    assert h["p99_under_ms"] == 100.0
    assert h["max_under_ms"] == 1000.0


def test_an_observation_above_every_bucket_is_reported_as_infinite() -> None:
    h = histogram_between({}, {0.01: 0.0, math.inf: 1.0, -1.0: 7.0})
    assert h["count"] == 1
    assert h["max_under_ms"] == math.inf


def test_nothing_observed_has_no_percentiles() -> None:
    h = histogram_between({0.01: 3.0, math.inf: 3.0}, {0.01: 3.0, math.inf: 3.0})
    assert h == {
        "count": 0,
        "sum_ms": 0.0,
        "p50_under_ms": None,
        "p99_under_ms": None,
        "max_under_ms": None,
    }


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    registry = CollectorRegistry()
    lag = Histogram(
        "payments_api_event_loop_lag_seconds", "lag", buckets=(0.01, 0.1), registry=registry
    )
    gc_pause = Histogram(
        "payments_gc_pause_seconds", "gc", ["generation"], buckets=(0.01, 0.1), registry=registry
    )
    other = Histogram("unrelated_seconds", "other", buckets=(0.01,), registry=registry)
    lag.observe(0.005)
    lag.observe(0.05)
    gc_pause.labels("0").observe(0.001)
    gc_pause.labels("2").observe(0.2)
    other.observe(5)

    body = generate_latest(registry)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_the_api_histograms_are_read_with_every_label_set_added_up(metrics_url: str) -> None:
    scraped = await api_histograms(metrics_url)
    assert scraped["payments_api_event_loop_lag_seconds"] == {
        0.01: 1.0,
        0.1: 2.0,
        math.inf: 2.0,
        -1.0: pytest.approx(0.055),
    }
    gc_pauses = scraped["payments_gc_pause_seconds"]
    assert gc_pauses[0.01] == 1.0  # generation 0's
    assert gc_pauses[math.inf] == 2.0  # both generations'
    assert "unrelated_seconds" not in scraped


async def test_an_api_without_metrics_gives_nothing_rather_than_failing_the_run() -> None:
    nothing_listens = free_port()
    assert await api_histograms(f"http://127.0.0.1:{nothing_listens}") == {}
