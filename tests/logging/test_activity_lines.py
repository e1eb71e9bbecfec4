"""One canonical line per activity attempt, carrying the workflow's correlation fields,
and workflow logs that stay silent when a history is replayed."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

with workflow.unsafe.imports_passed_through():
    # The sandbox re-imports this module; cryptography cannot be imported twice, and
    # structlog imports rich where it is installed, which seeds random at import.
    import structlog

    from config.logging import (
        ActivityLoggingInterceptor,
        add_to_attempt_line,
        fold_into_attempt_line,
    )
    from config.settings import venv_bin
    from tests.helpers.temporal import encrypting_data_converter

attempts: dict[str, int] = {}


@activity.defn(name="flaky_step")
async def flaky_step(order: str) -> str:
    attempts[order] = attempts.get(order, 0) + 1
    structlog.get_logger("test").info("step.inside", order=order)
    if attempts[order] == 1:
        raise ApplicationError("provider answered 503", type="ProviderUnavailable")
    add_to_attempt_line(provider_ref=f"ref-{order}")
    return f"done {order}"


@workflow.defn(name="LoggingProbe")
class LoggingProbe:
    @workflow.run
    async def run(self, order: str) -> str:
        workflow.logger.info("probe.started")
        return await workflow.execute_activity(
            flaky_step,
            order,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=10)),
        )


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_bin("temporal-test-server"),
        data_converter=encrypting_data_converter(),
    )
    yield environment
    await environment.shutdown()


async def test_each_attempt_writes_one_line_with_its_outcome_and_context(
    env: WorkflowEnvironment,
) -> None:
    order = uuid.uuid4().hex
    workflow_id = f"probe-{order}"
    task_queue = f"tq-{order}"
    # The head of the configured chain: context first, then the folding.
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars, fold_into_attempt_line]
    ) as captured:
        async with Worker(
            env.client,
            task_queue=task_queue,
            workflows=[LoggingProbe],
            activities=[flaky_step],
            interceptors=[ActivityLoggingInterceptor()],
        ):
            handle = await env.client.start_workflow(
                LoggingProbe.run, order, id=workflow_id, task_queue=task_queue
            )
            assert await handle.result() == f"done {order}"

    lines = [line for line in captured if line.get("workflow_id") == workflow_id]
    canonical = [line for line in lines if line["event"] == "activity.attempt"]
    assert [(c["attempt"], c["outcome"]) for c in canonical] == [(1, "failed"), (2, "completed")]
    assert canonical[0]["error_type"] == "ProviderUnavailable"
    assert canonical[0]["retryable"] is True
    assert canonical[0]["log_level"] == "warning"
    assert canonical[1]["log_level"] == "info"
    for line in canonical:
        assert line["run_id"] == handle.result_run_id
        assert line["activity"] == "flaky_step"
        assert line["duration_ms"] >= 0
    # What the activity logs at INFO rides on its attempt's line instead of a line of its own.
    assert [c["events"] for c in canonical] == [["step.inside"], ["step.inside"]]
    # What an attempt produced rides on its line as fields, without an event name.
    assert [c.get("provider_ref") for c in canonical] == [None, f"ref-{order}"]
    assert {c["order"] for c in canonical} == {order}
    assert [line["event"] for line in lines] == ["activity.attempt", "activity.attempt"]


async def test_workflow_logs_are_silent_during_replay(
    env: WorkflowEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    order = uuid.uuid4().hex
    task_queue = f"tq-{order}"
    with caplog.at_level(logging.INFO, logger="temporalio.workflow"):
        async with Worker(
            env.client, task_queue=task_queue, workflows=[LoggingProbe], activities=[flaky_step]
        ):
            handle = await env.client.start_workflow(
                LoggingProbe.run, order, id=f"probe-{order}", task_queue=task_queue
            )
            await handle.result()
        live = [r for r in caplog.records if r.getMessage().startswith("probe.started")]
        assert len(live) == 1

        caplog.clear()
        history = await handle.fetch_history()
        await Replayer(
            workflows=[LoggingProbe], data_converter=env.client.data_converter
        ).replay_workflow(history)
        assert [r for r in caplog.records if r.getMessage().startswith("probe.started")] == []
