"""The whole stack, in order, each part after a readiness check.

``make run`` uses it with fixed ports and output in the terminal; end-to-end and
fault tests use it with free ports and log files, and stop, kill or restart its
parts on purpose.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TypedDict

import httpx
from pydantic import SecretStr
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.converter import DataConverter

from admin.clients import CreatedClient, client_exists_async, create_client_async
from config.codec import new_payload_key
from config.settings import DEV_PROVIDER_API_KEY, Settings
from config.temporal import data_converter
from devstack.ports import free_port
from devstack.postgres import PostgresServer
from devstack.processes import ManagedProcess
from devstack.temporal_server import NAMESPACE, TemporalDevServer
from devstack.webhook_receiver import WebhookReceiver
from domain.payments import TASK_QUEUE
from ledger.migrate import upgrade_to_head

REPO_ROOT = Path(__file__).resolve().parent.parent


DEV_PAYLOAD_KEY_ID = "dev1"


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    """The dev payload key and codec token, made once per data dir and kept there (the
    data dir is git-ignored): histories written by the last run stay readable."""
    path = data_dir / "dev-secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    made = {"payload_key": new_payload_key(), "codec_token": secrets.token_urlsafe(32)}
    data_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(made, indent=2))
    return made


class _Output(TypedDict):
    log_path: Path | None
    echo: bool


@dataclass(frozen=True)
class StackPorts:
    postgres: int = 55432
    temporal: int = 7233
    temporal_ui: int | None = 8233  # None: headless
    provider: int = 8100
    api: int = 8000
    webhooks: int = 8200
    # The worker's Prometheus endpoints (SDK metrics, business metrics); None: a free port.
    worker_sdk_metrics: int | None = None
    worker_metrics: int | None = None

    @classmethod
    def free(cls, *, ui: bool = False) -> StackPorts:
        return cls(
            postgres=free_port(),
            temporal=free_port(),
            temporal_ui=free_port() if ui else None,
            provider=free_port(),
            api=free_port(),
            webhooks=free_port(),
        )

    def named(self) -> dict[str, int]:
        ports = {
            "postgres": self.postgres,
            "temporal": self.temporal,
            "provider": self.provider,
            "api": self.api,
            "webhooks": self.webhooks,
        }
        if self.temporal_ui is not None:
            ports["temporal-ui"] = self.temporal_ui
        return ports


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    ports: StackPorts = field(default_factory=StackPorts)
    echo: bool = False  # service output prefixed in the terminal, else data_dir/logs/*.log
    log_format: str = "json"
    extra_env: dict[str, str] = field(default_factory=dict)
    # Scale-out on one host: uvicorn worker processes for the API, worker.py processes.
    api_processes: int = 1
    worker_processes: int = 1
    # The worker's and the Temporal server's nice value (Settings.background_nice).
    background_nice: int = 0
    # The worker's alone, over the rest: fault tests route it through a proxy this way.
    worker_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_tests(cls, data_dir: Path, *, ui: bool = False) -> StackConfig:
        return cls(data_dir=data_dir, ports=StackPorts.free(ui=ui))

    def with_env(self, **env: str) -> StackConfig:
        return replace(self, extra_env={**self.extra_env, **env})


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        data, host, ports = config.data_dir, config.host, config.ports
        self.logs_dir = data / "logs"
        self.temporal_metrics_port = free_port()
        self.timings: dict[str, float] = {}
        self.demo_client: CreatedClient | None = None
        self.dev_secrets = _dev_secrets(data)
        self.worker_env = dict(config.worker_env)  # read at each (re)start of the worker

        self.postgres = PostgresServer(
            data / "postgres", ports.postgres, host=host, **self._output("postgres")
        )
        self.temporal = TemporalDevServer(
            data / "temporal.db",
            host=host,
            port=ports.temporal,
            ui_port=ports.temporal_ui,
            http_port=free_port(),
            metrics_port=self.temporal_metrics_port,
            ui_codec_endpoint=self.codec_url if ports.temporal_ui is not None else None,
            nice=config.background_nice,
            **self._output("temporal"),
        )
        self.provider = ManagedProcess(
            "provider",
            [
                sys.executable, "-m", "sandbox_provider",
                "--host", host, "--port", str(ports.provider),
                "--db", str(data / "provider.sqlite3"),
            ],
            env=self.settings_env(),
            cwd=REPO_ROOT,
            **self._output("provider"),
        )  # fmt: skip
        self.worker = self._worker_process()
        # Beyond the first worker (the one tests stop and restart), for scale-out.
        self.extra_workers = [
            self._worker_process(f"worker-{n}") for n in range(2, config.worker_processes + 1)
        ]
        self.api = ManagedProcess(
            "api",
            [
                sys.executable, "-m", "api", "--host", host, "--port", str(ports.api),
                "--workers", str(config.api_processes),
            ],
            env=self.settings_env(),
            cwd=REPO_ROOT,
            **self._output("api"),
        )  # fmt: skip
        self.webhooks = WebhookReceiver(host, ports.webhooks)

    # -- addresses -------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://{self.config.host}:{self.config.ports.api}"

    @property
    def provider_url(self) -> str:
        return f"http://{self.config.host}:{self.config.ports.provider}"

    @property
    def worker_metrics_urls(self) -> dict[str, str]:
        """The worker's Prometheus endpoints: the SDK's and ours."""
        host = self.config.host
        return {
            "sdk": f"http://{host}:{self.worker_sdk_metrics_port}/metrics",
            "business": f"http://{host}:{self.worker_metrics_port}/metrics",
        }

    @property
    def temporal_metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.temporal_metrics_port}/metrics"

    @property
    def codec_url(self) -> str:
        """The payload codec endpoint the Temporal UI decodes through (on the API)."""
        return f"{self.api_url}/codec"

    @property
    def temporal_address(self) -> str:
        return self.temporal.address

    @property
    def database_url(self) -> str:
        return self.postgres.url

    def settings_env(self) -> dict[str, str]:
        """The environment the worker and the API run with (PAYMENTS_* settings)."""
        host, ports = self.config.host, self.config.ports
        return {
            **os.environ,
            "PAYMENTS_ENVIRONMENT": "development",
            "DATABASE_URL": f"postgresql+psycopg://postgres@{host}:{ports.postgres}/payments",
            "PAYMENTS_TEMPORAL_ADDRESS": f"{host}:{ports.temporal}",
            "PAYMENTS_TEMPORAL_NAMESPACE": NAMESPACE,
            "PAYMENTS_PROVIDER_URL": f"http://{host}:{ports.provider}",
            "PAYMENTS_PROVIDER_API_KEY": DEV_PROVIDER_API_KEY,
            "PAYMENTS_WEBHOOK_ALLOW_LOOPBACK": "true",
            "PAYMENTS_LOG_FORMAT": self.config.log_format,
            "PAYMENTS_METRICS_HOST": host,
            "PAYMENTS_PAYLOAD_KEYS": f"{DEV_PAYLOAD_KEY_ID}:{self.dev_secrets['payload_key']}",
            "PAYMENTS_PAYLOAD_KEY_ID": DEV_PAYLOAD_KEY_ID,
            "PAYMENTS_CODEC_AUTH_TOKEN": self.dev_secrets["codec_token"],
            **(
                {"PAYMENTS_CODEC_CORS_ORIGIN": f"http://{host}:{ports.temporal_ui}"}
                if ports.temporal_ui is not None
                else {}
            ),
            **self.config.extra_env,
        }

    def data_converter(self) -> DataConverter:
        """The converter the worker and the API use (payloads encrypted with the dev key)."""
        env = self.settings_env()
        keys = env.get("PAYMENTS_PAYLOAD_KEYS")
        return data_converter(
            Settings(
                payload_keys=SecretStr(keys) if keys else None,
                payload_key_id=env.get("PAYMENTS_PAYLOAD_KEY_ID"),
            )
        )

    async def temporal_client(self) -> Client:
        """A client of this stack's Temporal that reads payloads as the worker wrote them."""
        return await Client.connect(
            self.temporal.address, namespace=NAMESPACE, data_converter=self.data_converter()
        )

    def _output(self, name: str) -> _Output:
        if self.config.echo:
            return {"log_path": None, "echo": True}
        return {"log_path": self.logs_dir / f"{name}.log", "echo": False}

    def _worker_process(self, name: str = "worker") -> ManagedProcess:
        ports = self.config.ports
        first = name == "worker"
        # Free ports chosen just before each start: on a busy machine one stays free briefly.
        # Extra workers always take free ones (one host, one port each).
        sdk_metrics_port = (ports.worker_sdk_metrics if first else None) or free_port()
        metrics_port = (ports.worker_metrics if first else None) or free_port()
        if first:
            self.worker_sdk_metrics_port = sdk_metrics_port
            self.worker_metrics_port = metrics_port
        return ManagedProcess(
            name,
            [sys.executable, "worker.py"],
            env={
                **self.settings_env(),
                "PAYMENTS_WORKER_SDK_METRICS_PORT": str(sdk_metrics_port),
                "PAYMENTS_WORKER_METRICS_PORT": str(metrics_port),
                **self.worker_env,
            },
            cwd=REPO_ROOT,
            nice=self.config.background_nice,
            **self._output(name),
        )

    # -- readiness checks ------------------------------------------------------------

    async def _http_ok(self, url: str) -> bool:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).status_code == 200

    async def _worker_polling(self, worker: ManagedProcess | None = None) -> bool:
        """Both the workflow and the activity task queue are polled by *this* worker."""
        client = await self.temporal_client()
        identity_prefix = f"{(worker or self.worker).pid}@"
        for queue_type in (
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        ):
            described = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=NAMESPACE,
                    task_queue=TaskQueue(name=TASK_QUEUE),
                    task_queue_type=queue_type,
                )
            )
            if not any(p.identity.startswith(identity_prefix) for p in described.pollers):
                return False
        return True

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        started = time.monotonic()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.timings["postgres"] = await self.postgres.start()
            migrate_started = time.monotonic()
            await asyncio.to_thread(upgrade_to_head, self.database_url)
            self.timings["migrations"] = time.monotonic() - migrate_started
            self.timings["temporal"] = await self.temporal.start()
            self.provider.start()
            self.timings["provider"] = await self.provider.wait_ready(
                lambda: self._http_ok(f"{self.provider_url}/healthz"),
                within=30,
                what="answering /healthz",
            )
            await self.start_worker()
            for extra in self.extra_workers:
                extra.start()
                await extra.wait_ready(
                    functools.partial(self._worker_polling, extra),
                    within=60,
                    what="polling the payments task queue",
                )
            self.api.start()
            self.timings["api"] = await self.api.wait_ready(
                lambda: self._http_ok(f"{self.api_url}/healthz"),
                within=30,
                what="answering /healthz",
            )
            await self.webhooks.start()
            self.demo_client = await self._demo_client()
            self.webhooks.secrets.append(self.demo_client.webhook_secret)
        except BaseException:
            await self.stop()
            raise
        self.timings["total"] = time.monotonic() - started

    def exited_services(self) -> list[str]:
        """Services that should be running but are not, with their exit codes."""
        processes = [
            self.postgres.process,
            self.temporal.process,
            self.provider,
            self.worker,
            *self.extra_workers,
            self.api,
        ]
        return [f"{p.name} (exit code {p.returncode})" for p in processes if not p.running]

    async def start_worker(self) -> None:
        if self.worker.running:
            raise RuntimeError("worker already running")
        self.worker = self._worker_process()
        self.worker.start()
        self.timings["worker"] = await self.worker.wait_ready(
            self._worker_polling, within=60, what="polling the payments task queue"
        )

    async def restart_worker(self, *, kill: bool = False) -> None:
        """Stop the worker (SIGKILL if ``kill``, else SIGTERM and drain), start a new one."""
        await (self.worker.kill() if kill else self.worker.terminate(grace=30))
        await self.start_worker()

    async def add_client(self, name: str) -> CreatedClient:
        """A fresh API client whose webhooks go to this stack's receiver."""
        created = await create_client_async(
            self.database_url,
            name=name,
            webhook_url=self.webhooks.url,
            allow_loopback=True,  # the receiver is local, as PAYMENTS_WEBHOOK_ALLOW_LOOPBACK says
        )
        self.webhooks.secrets.append(created.webhook_secret)
        return created

    async def _demo_client(self) -> CreatedClient:
        """The demo client survives restarts: its key is kept in the (git-ignored) data dir."""
        saved = self.config.data_dir / "demo-client.json"
        if saved.exists():
            known = CreatedClient(**json.loads(saved.read_text()))
            if await client_exists_async(self.database_url, known.client_id):
                return known
        created = await self.add_client("demo")
        saved.write_text(json.dumps(created.__dict__, indent=2))
        saved.chmod(0o600)
        return created

    async def stop(self) -> None:
        await self.webhooks.stop()
        await self.api.terminate(grace=15)
        await asyncio.gather(*(w.terminate(grace=30) for w in [self.worker, *self.extra_workers]))
        await self.provider.terminate(grace=5)
        await self.temporal.stop()
        await self.postgres.stop()

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
