"""The baseline's load generator: starts bare workflows with the Temporal client and
waits for each result, ``concurrency`` at a time, in its own process."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from temporalio.client import Client

from bench.baseline_workflows import BASELINE_TASK_QUEUE
from bench.loadgen import (
    DONE,
    ERRORS,
    SENT,
    SLOTS,
    GeneratorResult,
    Record,
    _cpu_seconds,
    bind_to_bench,
)
from config.settings import Settings
from config.temporal import data_converter


async def _drive(
    address: str,
    namespace: str,
    workflow: str,
    steps: int,
    ids: list[str],
    concurrency: int,
    progress: Any,
    slot: int,
) -> GeneratorResult:
    client = await Client.connect(
        address, namespace=namespace, data_converter=data_converter(Settings())
    )
    result = GeneratorResult()
    gate = asyncio.Semaphore(concurrency)
    base = slot * SLOTS

    async def one(index: int, workflow_id: str) -> None:
        async with gate:
            progress[base + SENT] += 1
            sent_at = time.time()
            started = time.perf_counter()
            status = 200
            try:
                await client.execute_workflow(
                    workflow, steps, id=workflow_id, task_queue=BASELINE_TASK_QUEUE
                )
            except Exception as err:
                status = 0
                progress[base + ERRORS] += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(repr(err))
            result.records.append(
                Record(index, "first", status, time.perf_counter() - started, sent_at,
                       False, None, workflow_id)
            )  # fmt: skip
            progress[base + DONE] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(i, wid) for i, wid in enumerate(ids)))
    result.wall_seconds = time.perf_counter() - started
    return result


def baseline_main(
    address: str,
    namespace: str,
    workflow: str,
    steps: int,
    ids: list[str],
    concurrency: int,
    progress: Any,
    slot: int,
    results: Any,
) -> None:
    """Process entry point (spawned)."""
    bind_to_bench()
    result = asyncio.run(
        _drive(address, namespace, workflow, steps, ids, concurrency, progress, slot)
    )
    result.cpu_seconds = _cpu_seconds()
    results.put((slot, result))
    results.close()
    results.join_thread()
    sys.stdout.flush()
    os._exit(0)
