"""Request bodies: JSON only, and never more than a bound, refused before they are read.

A pure ASGI middleware: a declared ``Content-Length`` over the bound is refused at
once; a body without one (chunked) is counted as it streams in and refused as soon
as it passes the bound, so a client can never make us buffer more than the bound.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import payload_too_large, problem_response, unsupported_media_type

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only the public API: /codec (mounted beside it) has its own bound and a login form.
        if (
            scope["type"] != "http"
            or scope["method"] not in _BODY_METHODS
            or not scope.get("path", "").startswith("/v1/")
        ):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        declared = headers.get(b"content-length")
        chunked = b"transfer-encoding" in headers
        path = scope.get("path")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            length = None
        if length is not None and length > self.max_bytes:
            await problem_response(payload_too_large(self.max_bytes), path)(scope, receive, send)
            return
        has_body = chunked or (length is not None and length > 0)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if has_body and not _is_json(content_type):
            await problem_response(unsupported_media_type(content_type), path)(scope, receive, send)
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
                await problem_response(payload_too_large(self.max_bytes), path)(
                    scope, receive, send
                )
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
