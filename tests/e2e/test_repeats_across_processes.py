"""Two API processes on one host's board, against the real Temporal server and ledger:
a repeat that reaches the other process is 409 while its first request starts the
payment, and the ledger's answer (202, replayed) once the payment's row is open,
while the first request still waits for the outcome."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from api.admission_board import create_board
from api.app import create_app
from config.settings import Settings
from tests.api.conftest import running_api
from tests.helpers.e2e import E2EStack

pytestmark = pytest.mark.e2e

VISA = {"amount": 4100, "currency": "EUR", "payment_method": "pm_card_visa"}


async def test_a_repeat_in_another_process_is_answered_by_the_ledger_once_the_row_is_open(
    stack: E2EStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in stack.stack.settings_env().items():
        if name.startswith("PAYMENTS_") or name == "DATABASE_URL":
            monkeypatch.setenv(name, value)
    board = tmp_path / "board"
    create_board(board, 2)
    # No worker polls this queue: the run starts and its row opens, and the first
    # request waits for an outcome that does not come within its wait.
    settings = Settings(
        api_admission_board=board,
        temporal_task_queue=f"no-worker-{uuid.uuid4().hex[:8]}",
        api_wait_seconds=4,
    )
    headers = {
        "Authorization": f"Bearer {stack.client.api_key}",
        "Idempotency-Key": str(uuid.uuid4()),
    }
    async with AsyncExitStack() as running:
        apps: list[FastAPI] = [create_app(settings), create_app(settings)]
        api_a, api_b = [await running.enter_async_context(running_api(app)) for app in apps]
        first = asyncio.create_task(api_a.post("/v1/payments", json=VISA, headers=headers))
        payments_a = apps[0].state.payments
        while not apps[0].state.admission.inside:  # the first request is in process A
            assert not first.done(), first.result().text
            await asyncio.sleep(0.001)

        async def repeat_in_b() -> httpx.Response:
            return await api_b.post("/v1/payments", json=VISA, headers=headers)

        # While the first request holds the key, its repeats in the other process are
        # 409; from the moment its row is open, they read it.
        answers: list[httpx.Response] = []
        while not first.done():
            answers.append(await repeat_in_b())
            if answers[-1].status_code == 202:
                break
            await asyncio.sleep(0.005)
        assert not first.done(), "the first request had its answer before any repeat read"
        assert not payments_a._admitting  # its row is open
        assert {a.status_code for a in answers[:-1]} <= {409}, [a.text for a in answers]
        for refused in answers[:-1]:
            problem = refused.json()["type"]
            assert problem.endswith("/idempotency-request-in-progress"), refused.text
        replay = answers[-1]
        assert replay.status_code == 202, replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json()["status"] == "processing"

        answer = await first
        assert answer.status_code == 202, answer.text
        assert "Idempotent-Replayed" not in answer.headers
        assert answer.json()["id"] == replay.json()["id"]
