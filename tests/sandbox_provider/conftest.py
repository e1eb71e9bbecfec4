"""The real sandbox provider, started as ``python -m sandbox_provider`` on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from activities.provider_client import ProviderClient
from config.settings import DEV_PROVIDER_API_KEY

REPO_ROOT = Path(__file__).resolve().parents[2]
# Seeded so that any random fault a test asks for falls the same way on every run.
SEED = 7


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class SandboxProcess:
    base_url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def crash(self) -> None:
        """SIGKILL: no shutdown hook runs, so only what was committed survives."""
        self.process.kill()
        self.process.wait(timeout=10)


class ProviderStartFailed(RuntimeError):
    pass


@contextmanager
def running_sandbox(
    log_dir: Path, *args: str, api_key: str = DEV_PROVIDER_API_KEY
) -> Iterator[SandboxProcess]:
    """A sandbox process answering /healthz; stopped (or already crashed) on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # A free port can be taken by someone else before the child binds it; a fresh one
    # on the next attempt is the cure.
    for attempt in range(3):
        sandbox = _start(log_dir / f"provider-{attempt}.log", api_key, args)
        if sandbox is not None:
            break
    else:
        raise ProviderStartFailed("the sandbox provider did not start: see the logs above")
    try:
        yield sandbox
    finally:
        _stop(sandbox.process)


def _start(log_path: Path, api_key: str, args: tuple[str, ...]) -> SandboxProcess | None:
    port = free_port()
    argv = [sys.executable, "-m", "sandbox_provider", "--host", "127.0.0.1", "--port", str(port)]
    if api_key != DEV_PROVIDER_API_KEY:
        argv += ["--api-key", api_key]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*argv, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=base_url, timeout=1) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                sys.stderr.write(log_path.read_text(errors="replace"))
                return None
            try:
                if http.get("/healthz").status_code == 200:
                    return SandboxProcess(base_url, api_key, process, log_path)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    _stop(process)
    raise ProviderStartFailed(f"no /healthz within 20 s:\n{log_path.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


class Sandbox:
    """The running sandbox seen from a test: raw HTTP with the key, and its test endpoints."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/sandbox/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    async def set_faults(self, **faults: float) -> None:
        (await self.http.put("/sandbox/faults", json=faults)).raise_for_status()

    async def clear_faults(self) -> None:
        (await self.http.delete("/sandbox/faults")).raise_for_status()

    async def charge(self, key: str, **overrides: Any) -> httpx.Response:
        body = {"amount": 500, "currency": "EUR", "payment_method": "pm_card_visa", **overrides}
        return await self.http.post("/v1/charges", json=body, headers={"Idempotency-Key": key})

    async def refund(self, key: str, charge_id: str, amount: int | None = None) -> httpx.Response:
        body: dict[str, Any] = {"charge": charge_id}
        if amount is not None:
            body["amount"] = amount
        return await self.http.post("/v1/refunds", json=body, headers={"Idempotency-Key": key})


@pytest.fixture(scope="session")
def sandbox_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    log_dir = tmp_path_factory.mktemp("sandbox_provider")
    with running_sandbox(log_dir, "--seed", str(SEED)) as process:
        yield process


@pytest.fixture
async def sandbox(sandbox_process: SandboxProcess) -> AsyncIterator[Sandbox]:
    async with Sandbox(sandbox_process.base_url, sandbox_process.api_key) as sandbox:
        yield sandbox
        # A test's faults never leak into the next test.
        await sandbox.clear_faults()


@pytest.fixture
async def provider_client(sandbox: Sandbox) -> AsyncIterator[ProviderClient]:
    async with ProviderClient(sandbox.base_url, sandbox.api_key, timeout_seconds=5.0) as client:
        yield client
