"""An https webhook goes to the checked address, yet TLS is still verified against
the URL's name: SNI and the certificate check use the name, not the address."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
import uvicorn

from activities.url_safety import IPAddress
from activities.webhooks import WebhookDeliveryError, WebhookSender
from admin.credentials import new_webhook_secret
from devstack.ports import free_port
from devstack.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a certificate"
)

NAME = "hooks.acme.test"


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class TlsReceiver(WebhookReceiver):
    def __init__(self, port: int, cert: Path, key: Path) -> None:
        super().__init__("127.0.0.1", port)
        self.cert, self._key = cert, key

    async def start(self) -> None:
        # WebhookReceiver.start, plus the certificate.
        config = uvicorn.Config(
            self._app(),
            host=self.host,
            port=self.port,
            log_config=None,
            access_log=False,
            ssl_certfile=str(self.cert),
            ssl_keyfile=str(self._key),
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
async def tls_receiver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsReceiver]:
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"), NAME)
    receiver = TlsReceiver(free_port(), cert, key)
    await receiver.start()
    yield receiver
    await receiver.stop()


async def _to_localhost(host: str, port: int) -> Sequence[IPAddress]:
    return [ip_address("127.0.0.1")]


async def test_https_delivery_to_the_checked_address_verifies_the_certificate_by_name(
    tls_receiver: TlsReceiver,
) -> None:
    trusting = ssl.create_default_context(cafile=str(tls_receiver.cert))
    async with httpx.AsyncClient(verify=trusting, timeout=5) as http:
        sender = WebhookSender(http, allow_loopback=True, resolver=_to_localhost)
        secret = new_webhook_secret()
        url = f"https://{NAME}:{tls_receiver.port}/webhooks"

        status = await sender.send(
            url=url, secrets=[secret], event_id="evt_tls", event={"id": "evt_tls"}
        )

    assert status == 204
    [arrived] = [e for e in tls_receiver.received if e.headers["webhook-id"] == "evt_tls"]
    assert arrived.headers["host"] == f"{NAME}:{tls_receiver.port}"


async def test_a_certificate_for_another_name_fails_the_delivery(
    tls_receiver: TlsReceiver, tmp_path: Path
) -> None:
    other_cert, _ = _self_signed(tmp_path, "other.acme.test")
    trusting_both = ssl.create_default_context(cafile=str(tls_receiver.cert))
    trusting_both.load_verify_locations(cafile=str(other_cert))
    async with httpx.AsyncClient(verify=trusting_both, timeout=5) as http:
        # The URL names other.acme.test, its DNS points at the server of hooks.acme.test.
        sender = WebhookSender(http, allow_loopback=True, resolver=_to_localhost)
        with pytest.raises(WebhookDeliveryError):
            await sender.send(
                url=f"https://other.acme.test:{tls_receiver.port}/webhooks",
                secrets=[new_webhook_secret()],
                event_id="evt_wrong_name",
                event={"id": "evt_wrong_name"},
            )

    assert [e for e in tls_receiver.received if e.headers["webhook-id"] == "evt_wrong_name"] == []
