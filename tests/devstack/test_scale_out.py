"""``make run`` with several API and worker processes: every one serves, payments go
through, the workers and the Temporal server run below the API's priority, stopping
the stack stops them all."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from api.admission_board import REGION_BYTES, AdmissionBoard, default_board_path
from devstack.stack import Stack, StackConfig
from devstack.temporal_server import NAMESPACE
from domain.payments import TASK_QUEUE

pytestmark = pytest.mark.e2e


async def test_two_api_and_two_worker_processes_serve_payments(tmp_path: Path) -> None:
    config = StackConfig.for_tests(tmp_path)
    config = StackConfig(
        data_dir=config.data_dir,
        ports=config.ports,
        api_processes=2,
        worker_processes=2,
        background_nice=5,
    )
    stack = Stack(config)
    await stack.start()
    try:
        assert stack.demo_client is not None
        workers = [stack.worker, *stack.extra_workers]
        assert len(workers) == 2
        client = await Client.connect(stack.temporal_address, namespace=NAMESPACE)
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=NAMESPACE,
                task_queue=TaskQueue(name=TASK_QUEUE),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
        polling_pids = {p.identity.split("@")[0] for p in described.pollers}
        assert {str(w.pid) for w in workers} <= polling_pids

        assert stack.api.pid is not None
        api_children = psutil.Process(stack.api.pid).children(recursive=True)
        assert len([c for c in api_children if "python" in c.name()]) >= 2

        ours = psutil.Process().nice()
        assert stack.temporal.process.pid is not None
        background = [w.pid for w in workers] + [stack.temporal.process.pid]
        assert [psutil.Process(pid).nice() for pid in background] == [5, 5, 5]
        front = [stack.api.pid, *(c.pid for c in api_children)]
        assert {psutil.Process(pid).nice() for pid in front} == {ours}

        # The API processes share one board of the keys they are admitting, each
        # writing a region of its own (api/admission_board.py).
        board = default_board_path(stack.api.pid)
        assert board.stat().st_size == 2 * REGION_BYTES
        for _ in range(300):  # the stack is up once one process answers
            reader = AdmissionBoard.attach(board)
            claimed_by_both = reader.region is None
            reader.close()
            if claimed_by_both:
                break
            await asyncio.sleep(0.1)
        assert claimed_by_both

        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            for _ in range(4):
                response = await http.post(
                    "/v1/payments",
                    headers={
                        "Authorization": f"Bearer {stack.demo_client.api_key}",
                        "Idempotency-Key": str(uuid.uuid4()),
                    },
                    json={"amount": 700, "currency": "EUR", "payment_method": "pm_card_visa"},
                )
                assert response.status_code == 201, response.text
                assert response.json()["status"] == "succeeded"
    finally:
        await stack.stop()
    assert not any(process.running for process in [*workers, stack.api])

    def alive(child: psutil.Process) -> bool:
        # An exited child is a zombie until init reaps it: psutil still calls it running.
        try:
            return child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert not [child.pid for child in api_children if alive(child)]
    assert not board.exists()
    assert not list(board.parent.glob(board.name + ".*"))  # nor its lock files
