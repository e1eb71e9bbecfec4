"""``python -m bench.baseline_worker``: a worker for the baselines, built like
``worker.py`` builds ours (same SDK defaults, same connection settings), on its own
task queue."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from temporalio.worker import Worker

from bench.baseline_workflows import (
    BASELINE_TASK_QUEUE,
    BaselineLocalWorkflow,
    BaselineWorkflow,
    noop,
)
from config.settings import Settings
from config.temporal import connect_temporal
from worker import GRACEFUL_SHUTDOWN


async def run() -> None:
    client = await connect_temporal(Settings())
    worker = Worker(
        client,
        task_queue=BASELINE_TASK_QUEUE,
        workflows=[BaselineWorkflow, BaselineLocalWorkflow],
        activities=[noop],
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with worker:
        print("baseline worker polling", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(run())
    sys.stdout.flush()
    os._exit(0)
