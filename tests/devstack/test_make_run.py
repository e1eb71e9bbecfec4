"""``python -m devstack run`` (what ``make run`` calls) as a user meets it: the banner's
key and curl charge a payment, Ctrl-C stops everything, a crashed service is reported."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from devstack.ports import free_port

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]


class MakeRun:
    def __init__(self, data_dir: Path) -> None:
        self.api_port = free_port()
        self.argv = [
            sys.executable, "-m", "devstack", "run", "--data-dir", str(data_dir),
            "--api-port", str(self.api_port), "--ui-port", str(free_port()),
            "--temporal-port", str(free_port()), "--provider-port", str(free_port()),
            "--webhooks-port", str(free_port()), "--postgres-port", str(free_port()),
        ]  # fmt: skip
        self.output: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        """Start and return the banner's API key once the stack is ready."""
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(90):
            while line := (await self.process.stdout.readline()).decode():
                self.output.append(line)
                if match := re.search(r"export API_KEY=(\S+)", line):
                    asyncio.get_running_loop().create_task(self._drain())
                    return match.group(1)
        raise AssertionError("no banner:\n" + "".join(self.output[-30:]))

    async def _drain(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        while line := (await self.process.stdout.readline()).decode():
            self.output.append(line)

    def children(self) -> list[psutil.Process]:
        assert self.process is not None
        return psutil.Process(self.process.pid).children(recursive=True)

    async def wait(self) -> int:
        assert self.process is not None
        async with asyncio.timeout(60):
            return await self.process.wait()


def names_of_living(processes: list[psutil.Process]) -> set[str]:
    """Their names; a short-lived child (a PostgreSQL backend closing) may be gone."""
    names = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.add(process.name())
    return names


async def test_the_banner_curl_charges_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    run = MakeRun(tmp_path)
    api_key = await run.start()
    children = run.children()
    assert {"postgres", "temporal"} <= names_of_living(children)

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"http://127.0.0.1:{run.api_port}/v1/payments",
            headers={"Authorization": f"Bearer {api_key}", "Idempotency-Key": str(uuid.uuid4())},
            json={"amount": 1250, "currency": "EUR", "payment_method": "pm_card_visa"},
        )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "succeeded"

    assert run.process is not None
    run.process.send_signal(signal.SIGINT)
    assert await run.wait() == 0
    assert "Stopped." in "".join(run.output)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {alive}"


async def test_a_service_that_dies_is_reported_and_the_rest_stopped(tmp_path: Path) -> None:
    run = MakeRun(tmp_path)
    await run.start()
    children = run.children()
    worker = next(c for c in children if "worker.py" in " ".join(c.cmdline()))
    worker.kill()

    assert await run.wait() == 1
    assert re.search(r"worker \(exit code -9\) stopped unexpectedly", "".join(run.output))
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], f"left running: {alive}"
