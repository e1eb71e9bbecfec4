"""How a payment's activities ended, read from its workflow history.

A history records an activity in one of two forms, and payments have both:

- a regular activity: ``ACTIVITY_TASK_SCHEDULED``, ``..._STARTED`` and one ending event
  (``..._COMPLETED``, ``..._FAILED`` or ``..._TIMED_OUT``);
- a local activity: one ``MARKER_RECORDED`` event named ``core_local_activity`` when it
  ends, whose ``data`` detail (JSON, never encrypted: the SDK writes it) names the
  activity, and whose ``failure`` is set when it failed (a ``TimeoutFailureInfo`` when
  it timed out).

The charge is a local activity per attempt in runs started since the
``charge-as-local-activity`` patch (workflows/payment.py), a regular activity per
attempt in runs started before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent

LOCAL_ACTIVITY_MARKER = "core_local_activity"
PATCH_MARKER = "core_patch"
CHARGE = "charge_payment"


@dataclass(frozen=True)
class ActivityEnding:
    """One activity execution as the history closes it (for a regular activity retried
    by the server: its last attempt; the charge is never retried by the server)."""

    activity_type: str
    outcome: str  # "completed", "failed" or "timed_out"
    local: bool
    attempt: int
    failure: Failure | None = None

    @property
    def failure_types(self) -> list[str]:
        """ApplicationError types along the failure and its causes."""
        found, failure = [], self.failure
        while failure is not None and failure.ByteSize():
            if failure.HasField("application_failure_info"):
                found.append(failure.application_failure_info.type)
            failure = failure.cause if failure.HasField("cause") else None
        return found

    @property
    def error_type(self) -> str:
        """The type of the ApplicationError the attempt failed with ("" if none): the
        outermost one (its causes are the exceptions it was raised from)."""
        types = self.failure_types
        return types[0] if types else ""

    @property
    def failure_message(self) -> str:
        return self.failure.message if self.failure is not None else ""


def local_activity_marker_data(event: HistoryEvent) -> dict[str, Any] | None:
    """The SDK's data about the local activity a marker records; None for other events."""
    if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
        return None
    marker = event.marker_recorded_event_attributes
    if marker.marker_name != LOCAL_ACTIVITY_MARKER:
        return None
    data: dict[str, Any] = json.loads(marker.details["data"].payloads[0].data)
    return data


def _timed_out(failure: Failure) -> bool:
    while failure.ByteSize():
        if failure.HasField("timeout_failure_info"):
            return True
        if not failure.HasField("cause"):
            return False
        failure = failure.cause
    return False


def activity_endings(events: Iterable[HistoryEvent]) -> list[ActivityEnding]:
    """Every activity's ending, regular and local, in history order."""
    scheduled: dict[int, str] = {}
    attempts: dict[int, int] = {}
    endings: list[ActivityEnding] = []
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = attrs.activity_type.name
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            attempts[started.scheduled_event_id] = started.attempt
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            sid = event.activity_task_completed_event_attributes.scheduled_event_id
            endings.append(ActivityEnding(scheduled[sid], "completed", False, attempts[sid]))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            failed = event.activity_task_failed_event_attributes
            sid = failed.scheduled_event_id
            endings.append(
                ActivityEnding(scheduled[sid], "failed", False, attempts[sid], failed.failure)
            )
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            timed_out = event.activity_task_timed_out_event_attributes
            sid = timed_out.scheduled_event_id
            endings.append(
                ActivityEnding(
                    scheduled[sid], "timed_out", False, attempts.get(sid, 0), timed_out.failure
                )
            )
        elif (data := local_activity_marker_data(event)) is not None:
            marker = event.marker_recorded_event_attributes
            failure = marker.failure if marker.HasField("failure") else None
            outcome = (
                "completed" if failure is None else "timed_out" if _timed_out(failure) else "failed"
            )
            endings.append(
                ActivityEnding(
                    str(data["activity_type"]), outcome, True, int(data["attempt"]), failure
                )
            )
    return endings


def charge_attempts(events: Iterable[HistoryEvent]) -> list[ActivityEnding]:
    """The payment's charge attempts, in order: the workflow runs one activity (local
    or regular) per attempt and retries the charge itself."""
    return [ending for ending in activity_endings(events) if ending.activity_type == CHARGE]


def regular_activities_scheduled(events: Iterable[HistoryEvent]) -> list[str]:
    """Activity types the server scheduled on the task queue, in order (no local ones)."""
    return [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


def patches_recorded(events: Iterable[HistoryEvent]) -> list[str]:
    """Ids of the ``workflow.patched`` markers in the history, in order."""
    found = []
    for event in events:
        marker = event.marker_recorded_event_attributes
        if (
            event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and marker.marker_name == PATCH_MARKER
        ):
            found.append(str(json.loads(marker.details["patch-data"].payloads[0].data)["id"]))
    return found
