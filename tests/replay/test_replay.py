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
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

import workflows
from config.codec import ENCODING
from devstack.histories import replay_only_codec
from tests.helpers.history import (
    CHARGE,
    ActivityEnding,
    activity_endings,
    charge_attempts,
    patches_recorded,
    regular_activities_scheduled,
)
from tests.replay.changed_workflows import (
    LookupBeforeChargeWorkflow,
    PatchedLookupBeforeChargeWorkflow,
)
from workflows.payment import CHARGE_AS_LOCAL_ACTIVITY_PATCH

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
    return DataConverter(
        payload_codec=replay_only_codec(),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


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


# Each generation of histories is kept as long as runs of its code may still be open
# (docs/changing-workflows.md): the suffix before ``.json`` names the generation.
BEFORE_LOCAL_CHARGE = ".before-charge-as-local-activity"
GENERATIONS = {
    # suffix: (the charge is a local activity, the patches its runs recorded)
    "": (True, [CHARGE_AS_LOCAL_ACTIVITY_PATCH]),
    BEFORE_LOCAL_CHARGE: (False, []),
}


def _history(scenario: str, generation: str = "") -> Path:
    path = HISTORIES / f"{scenario}{generation}.json"
    assert path.exists(), f"{path.name} missing: run `make capture-histories`"
    return path


def _events(path: Path) -> list[HistoryEvent]:
    return list(load(path).events)


def _endings(path: Path, activity_type: str) -> list[ActivityEnding]:
    return [e for e in activity_endings(_events(path)) if e.activity_type == activity_type]


def _failure_types(path: Path) -> set[str]:
    """ApplicationError types of failed activity attempts (regular and local)."""
    return {t for e in activity_endings(_events(path)) for t in e.failure_types}


@pytest.mark.parametrize("generation", sorted(GENERATIONS), ids=lambda g: g or "current")
def test_each_history_took_the_path_it_is_named_for(generation: str) -> None:
    """A recapture that silently missed its fault would leave a path untested.

    The workflow retries the charge itself: each charge attempt is an activity of its
    own (one attempt each), a local activity since the patch ``charge-as-local-activity``
    (a marker in the history), a regular one before it. Attempts are read in both forms.
    """
    local, patches = GENERATIONS[generation]
    on_queue = [] if local else [CHARGE]  # the charge on the task queue, per attempt

    success = _history("success", generation)
    assert [(e.activity_type, e.outcome, e.local) for e in activity_endings(_events(success))] == [
        ("open_payment", "completed", True),
        (CHARGE, "completed", local),
        ("record_outcome", "completed", True),
        ("notify_webhook", "completed", False),
    ]
    assert [a.attempt for a in charge_attempts(_events(success))] == [1]
    assert regular_activities_scheduled(_events(success)) == [*on_queue, "notify_webhook"]
    for scenario in PAYMENT_SCENARIOS:
        assert patches_recorded(_events(_history(scenario, generation))) == patches, scenario

    decline = _history("decline", generation)
    assert [(a.outcome, a.local) for a in charge_attempts(_events(decline))] == [("failed", local)]
    assert "PaymentDeclined" in _failure_types(decline)

    retried = _history("provider_retries", generation)
    attempts = charge_attempts(_events(retried))
    assert [(a.outcome, a.local) for a in attempts] == [("failed", local)] * 2 + [
        ("completed", local)
    ]
    assert [a.error_type for a in attempts[:2]] == ["ProviderUnavailable"] * 2
    assert "PaymentDeclined" not in _failure_types(retried)
    assert regular_activities_scheduled(_events(retried)) == on_queue * 3 + ["notify_webhook"]

    unknown = _history("unknown_outcome_lookup", generation)
    attempts = charge_attempts(_events(unknown))
    assert len(attempts) > 1
    assert {(a.outcome, a.local) for a in attempts} <= {("failed", local), ("timed_out", local)}
    assert regular_activities_scheduled(_events(unknown)) == on_queue * len(attempts) + [
        "find_charge",
        "notify_webhook",
    ]
    assert _endings(unknown, "find_charge")[-1].outcome == "completed"

    webhooks = _endings(_history("webhook_retry", generation), "notify_webhook")
    assert max(e.attempt for e in webhooks) >= 3

    if any(cls.__name__ == "RefundWorkflow" for cls in todays_workflows()):
        for scenario, amount in (("refund_full", 1250), ("refund_partial", 500)):
            refund = HISTORIES / f"{scenario}.refund{generation}.json"
            assert refund.exists(), f"{refund.name} missing: run `make capture-histories`"
            assert "refund_at_provider" in regular_activities_scheduled(_events(refund))
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


# Where the change's find_charge meets the old history: the charge activity before the
# patch, the patch's marker since.
UNPATCHED_CHANGE_FAILS_AT = {
    "": "patch marker encountered for change charge-as-local-activity, but there is no "
    "corresponding change command",
    BEFORE_LOCAL_CHARGE: "find_charge",
}


@pytest.mark.parametrize("generation", sorted(GENERATIONS), ids=lambda g: g or "current")
async def test_guard_an_unpatched_change_fails_to_replay_an_old_history(generation: str) -> None:
    replayer = Replayer(workflows=[LookupBeforeChargeWorkflow], data_converter=data_converter())
    with pytest.raises(NondeterminismError, match=UNPATCHED_CHANGE_FAILS_AT[generation]):
        await replayer.replay_workflow(load(_history("success", generation)))


@pytest.mark.parametrize("generation", sorted(GENERATIONS), ids=lambda g: g or "current")
async def test_guard_the_same_change_behind_a_patch_replays_cleanly(generation: str) -> None:
    replayer = Replayer(
        workflows=[PatchedLookupBeforeChargeWorkflow], data_converter=data_converter()
    )
    result = await replayer.replay_workflow(load(_history("success", generation)))
    assert result.replay_failure is None
