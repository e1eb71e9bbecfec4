"""A webhook receiver for the demo and the tests: verifies Standard Webhooks
signatures, keeps what it got, and can be told to fail."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
import uvicorn
from fastapi import FastAPI, Request, Response
from standardwebhooks import Webhook, WebhookVerificationError

log = structlog.get_logger("webhooks")


@dataclass(frozen=True)
class ReceivedWebhook:
    path: str
    headers: dict[str, str]
    body: str
    verified: bool


class WebhookReceiver:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.secrets: list[str] = []
        self.received: list[ReceivedWebhook] = []
        self.respond_with = 204  # tests set 503 to play a receiver that is down
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/webhooks"

    def _verified(self, body: str, headers: dict[str, str]) -> bool:
        for secret in self.secrets:
            with contextlib.suppress(WebhookVerificationError):
                Webhook(secret).verify(body, headers)
                return True
        return False

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None)

        @app.post("/{path:path}")
        async def receive(path: str, request: Request) -> Response:
            body = (await request.body()).decode()
            headers = dict(request.headers)
            verified = self._verified(body, headers)
            self.received.append(ReceivedWebhook("/" + path, headers, body, verified))
            log.info(
                "webhook.received",
                webhook_id=headers.get("webhook-id"),
                signature_valid=verified,
                answered=self.respond_with,
            )
            return Response(status_code=self.respond_with)

        return app

    async def start(self) -> None:
        config = uvicorn.Config(
            self._app(), host=self.host, port=self.port, log_config=None, access_log=False
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
