"""A minimal HTTP/1.1 keep-alive client on asyncio streams.

The generator must not be the bottleneck: httpx costs about 16 ms CPU per request on
this machine at 100 in flight, several times what the API spends. This client does
the least that is still HTTP: one request at a time per connection, Content-Length
or chunked bodies, reconnect when the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


class HttpError(Exception):
    """The connection failed or the answer was not HTTP."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes


def build_request(
    method: str, host: str, path: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> Response:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
        raise HttpError(f"no response head: {err!r}") from err
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HttpError(f"not an HTTP/1.x status line: {status_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = b""
    except asyncio.IncompleteReadError as err:
        raise HttpError("connection closed mid-body") from err
    return Response(int(parts[1]), headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from our servers
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


class Connection:
    """One keep-alive connection; ``request`` reconnects once if the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def open(self) -> None:
        """Connect now unless connected: the generator opens its connections before the
        storm and before each request, so a request's latency is the request's alone."""
        if self._writer is None:
            try:
                await self._connect()
            except OSError as err:
                raise HttpError(f"connect failed: {err!r}") from err

    async def request(self, raw: bytes) -> Response:
        for attempt in (1, 2):
            fresh = self._writer is None
            if fresh:
                try:
                    await self._connect()
                except OSError as err:
                    raise HttpError(f"connect failed: {err!r}") from err
            assert self._reader is not None
            assert self._writer is not None
            try:
                self._writer.write(raw)
                await self._writer.drain()
                response = await read_response(self._reader)
            except (HttpError, OSError) as err:
                await self.close()
                # A kept-alive connection the server closed meanwhile: retry once on a
                # fresh one. A fresh connection failing is the answer.
                if fresh or attempt == 2:
                    raise HttpError(str(err)) from err
                continue
            if response.headers.get("connection", "").lower() == "close":
                await self.close()
            return response
        raise AssertionError("unreachable")

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
