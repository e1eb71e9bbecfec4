"""The fault proxy itself: a plain pipe until told otherwise, then each fault as promised."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.helpers.faultproxy import FaultProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("127.0.0.1", port) as running:
        yield running
    server.close()
    await server.wait_closed()


async def _round_trip(proxy: FaultProxy, payload: bytes, within: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.readexactly(len(payload))
    finally:
        writer.close()


async def test_a_healthy_proxy_is_a_plain_pipe(proxy: FaultProxy) -> None:
    assert await _round_trip(proxy, b"hello" * 1000) == b"hello" * 1000


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    proxy.latency = 0.2
    started = time.monotonic()
    assert await _round_trip(proxy, b"ping") == b"ping"
    # There and back again: at least twice the latency.
    assert time.monotonic() - started >= 0.4
    proxy.heal()
    started = time.monotonic()
    await _round_trip(proxy, b"ping")
    assert time.monotonic() - started < 0.2


async def test_black_hole_swallows_traffic_until_healed(proxy: FaultProxy) -> None:
    proxy.black_hole()
    with pytest.raises(TimeoutError):
        await _round_trip(proxy, b"lost", within=0.5)
    proxy.heal()
    assert await _round_trip(proxy, b"found") == b"found"


async def test_reset_breaks_open_connections(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    proxy.reset_connections()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(2):
            await reader.readexactly(1)
    writer.close()


async def test_refuse_resets_new_connections_like_a_server_that_is_down(
    proxy: FaultProxy,
) -> None:
    proxy.refuse = True
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(proxy, b"nobody home")
    proxy.heal()
    assert await _round_trip(proxy, b"back") == b"back"
