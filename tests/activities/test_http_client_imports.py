"""The provider and webhook calls' HTTP client looks up no module per request.

httpcore imports sniffio in every lock, event and semaphore it sets up for a request,
and Python does not cache an import that failed: without sniffio installed (anyio
4.11 stopped requiring it), each request searched sys.path several times, 2.5 % of
the worker's CPU in the storm benchmark (encode/httpcore#1103).
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from types import ModuleType

import httpx

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class LookupCounter(MetaPathFinder):
    """Sees every import the module cache could not answer, and finds nothing."""

    def __init__(self) -> None:
        self.looked_up: list[str] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        self.looked_up.append(fullname)
        return None


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            await reader.readexactly(2)  # the request's body, b"{}"
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass
    finally:
        writer.close()


async def test_http_requests_after_the_first_import_nothing() -> None:
    server = await asyncio.start_server(_answer_ok, "127.0.0.1", 0)  # a free port
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    counter = LookupCounter()
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.post(url, content=b"{}")).status_code == 200  # first use
            sys.meta_path.insert(0, counter)
            try:
                for _ in range(20):
                    assert (await http.post(url, content=b"{}")).status_code == 200
            finally:
                sys.meta_path.remove(counter)
    finally:
        server.close()
        await server.wait_closed()
    assert counter.looked_up == [], f"imports looked up per request: {counter.looked_up[:5]}"
