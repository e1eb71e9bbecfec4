"""Request bodies: JSON only, and never more than a bound, refused before they are read.

A pure ASGI middleware: a declared ``Content-Length`` over the bound is refused at
once; a body without one (chunked) is counted as it streams in and refused as soon
as it passes the bound, so a client can never make us buffer more than the bound.
It wraps the whole API; an app mounted under an ``exempt`` prefix (``/codec``) wraps
each of its own routes in it with that route's bound instead.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import Problem, payload_too_large, problem_response, unsupported_media_type

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


# After refusing a body, read and drop at most this much more of it, for at most this
# long, before closing the connection: a client still sending when the server closes
# gets a reset that can wipe the answer out of its buffer before it has read it (what
# nginx's lingering close is for). Then the connection closes, read or not.
DRAIN_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 2.0


async def _refuse(problem: Problem, path: str, receive: Receive, send: Send) -> None:
    """Answer, drop what the client sends meanwhile (bounded), then close the connection
    so the rest of the body is never read."""
    response = problem_response(problem, path)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": [*response.raw_headers, (b"connection", b"close")],
        }
    )
    # The whole answer is on its way now (it has a Content-Length); the response ends,
    # and with it the connection, once the drain is over.
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    left = DRAIN_BYTES
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            while left > 0:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body"):
                    break
                left -= len(message.get("body", b""))
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        json_only_under: str | None = "/",
        exempt: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.json_only_under = json_only_under
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] not in _BODY_METHODS
            or any(path == prefix or path.startswith(prefix + "/") for prefix in self.exempt)
        ):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        declared = headers.get(b"content-length")
        chunked = b"transfer-encoding" in headers
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            length = None
        if length is not None and length > self.max_bytes:
            await _refuse(payload_too_large(self.max_bytes), path, receive, send)
            return
        has_body = chunked or (length is not None and length > 0)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        json_only = self.json_only_under is not None and path.startswith(self.json_only_under)
        if has_body and json_only and not _is_json(content_type):
            await _refuse(unsupported_media_type(content_type), path, receive, send)
            return
        if not has_body:
            await self.app(scope, receive, send)
            return

        # Read at most max_bytes + 1 ourselves, then hand the app exactly what came.
        chunks: list[bytes] = []
        received = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _refuse(payload_too_large(self.max_bytes), path, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)

        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
