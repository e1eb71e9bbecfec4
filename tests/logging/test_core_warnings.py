"""The SDK core's coded warnings come once per slow workflow task: under load, a few a
second are written and the rest counted, so the worker's log stays bounded."""

from __future__ import annotations

import logging

import pytest
import structlog

from activities.metrics import _SampleRepeatedCoreWarnings
from config.logging import LineSampler

SLOW_TASK = "[TMPRL1104] {run}:4:1 Workflow task duration exceeded 5 seconds."


def test_repeated_core_warnings_are_counted_beyond_one_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [50.0]
    sampler = _SampleRepeatedCoreWarnings(LineSampler(1, clock=lambda: now[0]))
    core = logging.getLogger("test.temporalio.core")
    core.addFilter(sampler)
    caplog.set_level(logging.INFO)
    with structlog.testing.capture_logs() as counts:
        for run in range(5):
            core.warning(SLOW_TASK.format(run=f"run-{run}"))
        core.warning("Worker heartbeat failed")  # no code: always written
        now[0] += 1.0
        core.warning(SLOW_TASK.format(run="run-5"))
        core.warning(SLOW_TASK.format(run="run-6"))
        sampler.report(force=True)  # at shutdown
    core.removeFilter(sampler)

    written = [r.getMessage() for r in caplog.records if r.name == core.name]
    assert written == [
        SLOW_TASK.format(run="run-0"),
        "Worker heartbeat failed",
        SLOW_TASK.format(run="run-5"),
    ]
    assert [(c["event"], c["suppressed"], c["total"]) for c in counts] == [
        ("sdk.warnings_suppressed", {"TMPRL1104": 4}, 4),  # with the next second's first
        ("sdk.warnings_suppressed", {"TMPRL1104": 1}, 1),  # at shutdown
    ]
