"""The bare-engine baselines: a workflow of N no-op activities, regular or local.

Imported by the workflow sandbox, so nothing here but temporalio.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

BASELINE_TASK_QUEUE = "bench-baseline"
NOOP_TIMEOUT = timedelta(seconds=30)


@activity.defn(name="BenchNoop")
async def noop(step: int) -> int:
    return step


@workflow.defn(name="BenchBaseline")
class BaselineWorkflow:
    """``steps`` regular activities in sequence, each a round trip through the server."""

    @workflow.run
    async def run(self, steps: int) -> int:
        done = 0
        for step in range(steps):
            await workflow.execute_activity(noop, step, start_to_close_timeout=NOOP_TIMEOUT)
            done += 1
        return done


@workflow.defn(name="BenchBaselineLocal")
class BaselineLocalWorkflow:
    """The same with local activities: run in the worker, recorded as markers."""

    @workflow.run
    async def run(self, steps: int) -> int:
        done = 0
        for step in range(steps):
            await workflow.execute_local_activity(noop, step, start_to_close_timeout=NOOP_TIMEOUT)
            done += 1
        return done
