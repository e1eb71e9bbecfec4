"""A small TCP proxy for fault tests (toxiproxy is not installable here).

It sits between a process and a server it talks to (the worker and the provider,
PostgreSQL or Temporal) and, on command, adds latency, resets connections or
black-holes traffic::

    async with FaultProxy("127.0.0.1", upstream_port) as proxy:
        env = {"PAYMENTS_PROVIDER_URL": f"http://{proxy.address}"}
        proxy.latency = 0.5          # every chunk, both ways, arrives 0.5 s late
        proxy.black_hole()           # accept, read, never forward nor answer
        proxy.reset_connections()    # RST every open connection now
        proxy.refuse = True          # new connections are reset at once (a server that is down)
        proxy.heal()                 # back to a plain pipe
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from types import TracebackType

_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, as a crashed peer or a firewall would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1"
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.port = 0
        self.latency = 0.0  # seconds added to every chunk, each direction
        self.refuse = False  # reset new connections as soon as they are accepted
        self.connections_accepted = 0
        self._black_hole = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- faults ----------------------------------------------------------------------

    def black_hole(self) -> None:
        """Keep connections open and keep reading, but forward nothing either way."""
        self._black_hole.set()

    def reset_connections(self) -> None:
        for client, upstream in list(self._pairs):
            _reset(client)
            _reset(upstream)
        self._pairs.clear()

    def heal(self) -> None:
        self.latency = 0.0
        self.refuse = False
        self._black_hole.clear()

    # -- plumbing --------------------------------------------------------------------

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self.refuse:
            _reset(client_w)
            return
        try:
            up_r, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            _reset(client_w)
            return
        pair = (client_w, up_w)
        self._pairs.add(pair)
        pipes = [
            asyncio.create_task(self._pipe(client_r, up_w)),
            asyncio.create_task(self._pipe(up_r, client_w)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._tasks.difference_update(pipes)
            if pair in self._pairs:
                self._pairs.discard(pair)
                for writer in pair:
                    writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reading and writing run apart so that latency delays each chunk without
        # throttling the stream: a chunk read at t is written at t + latency.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                while self._black_hole.is_set():
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                if self._black_hole.is_set() and data:
                    continue  # swallowed: a black hole never delivers
                queue.put_nowait((time.monotonic() + self.latency, data))
                if not data:
                    break
            await delivering
        except (ConnectionError, OSError):
            pass
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await delivering
