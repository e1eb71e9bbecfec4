"""``python -m bench.floor``: a trivial app under uvicorn, one request per connection at
once; the server is gone afterwards."""

from __future__ import annotations

import socket

from bench import floor


async def test_every_connection_is_answered_and_the_server_stops() -> None:
    async with floor.serving() as port:
        latencies = await floor.herd_latencies(port, 50)
    assert len(latencies) == 50
    assert all(0 < latency < 10 for latency in latencies)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "uvicorn still listening"
