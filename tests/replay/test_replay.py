"""Every recorded history replays against today's workflow code.

The histories under ``histories/`` were captured from the real stack by
``make capture-histories`` (``devstack/histories.py``), one or more per payment
path. A change to workflow code that would break a payment already running
(a new, removed or reordered command) makes its test fail with a non-determinism
error; docs/changing-workflows.md says what to do then.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

import workflows
from config.codec import ENCODING
from devstack.histories import replay_only_codec
from tests.replay.changed_workflows import (
    LookupBeforeChargeWorkflow,
    PatchedLookupBeforeChargeWorkflow,
)

HISTORIES = Path(__file__).parent / "histories"
ENCRYPTED_ENCODING = base64.b64encode(ENCODING).decode()
HISTORY_FILES = sorted(HISTORIES.glob("*.json"))

# The payment paths a history must exist for; refunds once a refund workflow exists.
PAYMENT_SCENARIOS = {
    "success",
    "decline",
    "provider_retries",
    "unknown_outcome_lookup",
    "webhook_retry",
}
REFUND_SCENARIOS = {"refund_full", "refund_partial"}


def todays_workflows() -> list[type]:
    """Every workflow class defined in the ``workflows`` package, as the worker runs them."""
    found: list[type] = []
    for module_info in pkgutil.iter_modules(workflows.__path__, f"{workflows.__name__}."):
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and workflow._Definition.from_class(cls):
                found.append(cls)
    return found


def data_converter() -> DataConverter:
    """The histories' payloads are sealed with the TEST-ONLY key (never used outside tests)."""
    return DataConverter(payload_codec=replay_only_codec())


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"replay-{path.stem}", path.read_text())


def events(path: Path) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads(path.read_text())["events"]
    return loaded


def scenario_of(path: Path) -> str:
    return path.name.split(".", 1)[0]


@pytest.mark.parametrize("path", HISTORY_FILES, ids=lambda p: p.name)
async def test_history_replays_against_todays_code(path: Path) -> None:
    replayer = Replayer(workflows=todays_workflows(), data_converter=data_converter())
    result = await replayer.replay_workflow(load(path), raise_on_replay_failure=False)
    assert result.replay_failure is None, (
        f"{path.name} no longer replays: {result.replay_failure!r}. A workflow change would "
        "break runs already in flight; see docs/changing-workflows.md"
    )


def test_every_payment_path_has_a_history() -> None:
    captured = {scenario_of(path) for path in HISTORY_FILES}
    expected = set(PAYMENT_SCENARIOS)
    if any(cls.__name__ == "RefundWorkflow" for cls in todays_workflows()):
        expected |= REFUND_SCENARIOS
    missing = expected - captured
    assert not missing, f"no history for {sorted(missing)}: run `make capture-histories`"


def _activities_scheduled(path: Path) -> list[str]:
    return [
        e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in events(path)
        if "activityTaskScheduledEventAttributes" in e
    ]


def _max_attempt(path: Path, activity_type: str) -> int:
    """The highest attempt of an activity type, as the history records it."""
    scheduled = {
        e["eventId"]: e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in events(path)
        if "activityTaskScheduledEventAttributes" in e
    }
    attempts = [
        int(attrs.get("attempt", 1))
        for e in events(path)
        if (attrs := e.get("activityTaskStartedEventAttributes"))
        and scheduled.get(attrs["scheduledEventId"]) == activity_type
    ]
    return max(attempts, default=0)


def _failure_types(path: Path) -> set[str]:
    """ApplicationError types of failed activity attempts, through each failure's causes."""
    types: set[str] = set()
    for e in events(path):
        failure = e.get("activityTaskFailedEventAttributes", {}).get("failure")
        while failure:
            if "applicationFailureInfo" in failure:
                types.add(failure["applicationFailureInfo"].get("type", ""))
            failure = failure.get("cause")
    return types


def _history(scenario: str) -> Path:
    path = HISTORIES / f"{scenario}.json"
    assert path.exists(), f"{path.name} missing: run `make capture-histories`"
    return path


def test_each_history_took_the_path_it_is_named_for() -> None:
    """A recapture that silently missed its fault would leave a path untested.

    The workflow retries the charge itself: each charge attempt is an activity of its
    own (a first attempt for the server), so attempts are counted as scheduled charges.
    """
    assert _activities_scheduled(_history("success")) == ["charge_payment", "notify_webhook"]
    assert _max_attempt(_history("success"), "charge_payment") == 1

    assert "PaymentDeclined" in _failure_types(_history("decline"))
    assert _activities_scheduled(_history("decline")).count("charge_payment") == 1

    retried = _activities_scheduled(_history("provider_retries"))
    assert retried == ["charge_payment"] * 3 + ["notify_webhook"]
    assert "ProviderUnavailable" in _failure_types(_history("provider_retries"))
    assert "PaymentDeclined" not in _failure_types(_history("provider_retries"))

    unknown = _activities_scheduled(_history("unknown_outcome_lookup"))
    charges = unknown.count("charge_payment")
    assert charges > 1
    assert unknown == ["charge_payment"] * charges + ["find_charge", "notify_webhook"]

    assert _max_attempt(_history("webhook_retry"), "notify_webhook") >= 3

    if any(cls.__name__ == "RefundWorkflow" for cls in todays_workflows()):
        for scenario, amount in (("refund_full", 1250), ("refund_partial", 500)):
            refund = HISTORIES / f"{scenario}.refund.json"
            assert refund.exists(), f"{refund.name} missing: run `make capture-histories`"
            assert "refund_at_provider" in _activities_scheduled(refund)
            started = events(refund)[0]["workflowExecutionStartedEventAttributes"]
            indexed = started["searchAttributes"]["indexedFields"]
            amount_sa = json.loads(base64.b64decode(indexed["AmountMinor"]["data"]))
            assert amount_sa == amount, (scenario, amount_sa)


def test_histories_hold_no_payload_in_clear() -> None:
    """Captured as the stack stores them: every input and result sealed (with the
    TEST-ONLY key), so the replay test exercises the codec as the worker does."""
    for path in HISTORY_FILES:
        started = events(path)[0]["workflowExecutionStartedEventAttributes"]
        for payload in started["input"]["payloads"]:
            assert payload["metadata"]["encoding"] == ENCRYPTED_ENCODING, path.name


async def test_guard_an_unpatched_change_fails_to_replay_an_old_history() -> None:
    replayer = Replayer(workflows=[LookupBeforeChargeWorkflow], data_converter=data_converter())
    with pytest.raises(NondeterminismError, match="find_charge"):
        await replayer.replay_workflow(load(_history("success")))


async def test_guard_the_same_change_behind_a_patch_replays_cleanly() -> None:
    replayer = Replayer(
        workflows=[PatchedLookupBeforeChargeWorkflow], data_converter=data_converter()
    )
    result = await replayer.replay_workflow(load(_history("success")))
    assert result.replay_failure is None
