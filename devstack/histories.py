"""``python -m devstack capture-histories``: drive every payment path, save its histories.

The replay test (``tests/replay``) replays each saved history against today's
workflow code, so a change that would break payments already running fails in CI.
This command refreshes those histories in one step: it starts the stack on free
ports (or, with ``--attach``, uses one that is running, such as ``make run``'s),
drives each scenario over the public API with the sandbox provider's faults, waits
for every workflow of the scenario to close and writes its history, encoded as
Temporal stores it, to ``tests/replay/histories/<scenario>.json``.

Each scenario uses an API client of its own whose webhooks go to a receiver this
command runs, so that it can play a receiver that is down.

Payloads in the histories are sealed with a fixed, public, TEST-ONLY payload key
(``tests/replay/test-only-payload-key.json``) so that the replay test can open them:
the stack this command starts encrypts with it; with ``--attach`` the running
stack's payloads are opened with its own keys (from PAYMENTS_* settings) and sealed
again with the test key before they are written. Never configure that key anywhere
but tests: it is in the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.converter import DataConverter

from admin.clients import CreatedClient, create_client_async
from config.codec import ENCODING, AesGcmCodec, parse_payload_keys
from config.settings import DEV_PROVIDER_API_KEY, Settings
from config.temporal import data_converter
from devstack.ports import free_port
from devstack.stack import DEV_PAYLOAD_KEY_ID, REPO_ROOT, Stack, StackConfig, StackPorts
from devstack.temporal_server import NAMESPACE
from devstack.webhook_receiver import WebhookReceiver
from domain.payments import payment_id_for, payment_workflow_id

HISTORIES_DIR = REPO_ROOT / "tests" / "replay" / "histories"
TEST_ONLY_KEY_FILE = REPO_ROOT / "tests" / "replay" / "test-only-payload-key.json"
REFUNDS_ROUTE_SUFFIX = "/refunds"

# The charge's retry budget (workflows/payment.py CHARGE_BUDGET) must run out before
# the workflow looks the charge up: that scenario takes about five minutes.
UNKNOWN_OUTCOME_WITHIN = 7 * 60.0


def replay_only_payload_key() -> tuple[str, str]:
    """(key id, base64 key) of the TEST-ONLY key that seals the committed histories."""
    loaded = json.loads(TEST_ONLY_KEY_FILE.read_text())
    return str(loaded["key_id"]), str(loaded["key"])


def replay_only_settings_env() -> dict[str, str]:
    """PAYMENTS_* settings that make a stack encrypt with the TEST-ONLY key."""
    key_id, key = replay_only_payload_key()
    return {"PAYMENTS_PAYLOAD_KEYS": f"{key_id}:{key}", "PAYMENTS_PAYLOAD_KEY_ID": key_id}


def replay_only_codec() -> AesGcmCodec:
    key_id, key = replay_only_payload_key()
    return AesGcmCodec(parse_payload_keys(f"{key_id}:{key}"), key_id)


def payloads_in(message: Message) -> list[Payload]:
    """Every Payload anywhere in a protobuf message (inputs, results, failures' details,
    headers, memos, user metadata, ...)."""
    found: list[Payload] = []
    for descriptor, value in message.ListFields():
        entry = descriptor.message_type
        if entry is None:
            continue  # a scalar
        if entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].message_type is None:
                continue  # a map of scalars
            items = list(value.values())
        elif descriptor.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, Payload):
                found.append(item)
            else:
                found += payloads_in(item)
    return found


def reseal(history: WorkflowHistory, opener: AesGcmCodec, sealer: AesGcmCodec) -> int:
    """Open the history's encrypted payloads with ``opener``, seal them with ``sealer``,
    in place; payloads in clear (search attributes) stay in clear. Returns how many."""
    count = 0
    for event in history.events:
        for payload in payloads_in(event):
            if payload.metadata.get("encoding") == ENCODING:
                payload.CopyFrom(sealer.encrypt(opener.decrypt(payload)))
                count += 1
    return count


class ScenarioSkipped(Exception):
    """The running code cannot play this scenario (yet); the reason says why."""


@dataclass(frozen=True)
class Target:
    """Where the stack answers, and what the command needs to reach behind the API."""

    api_url: str
    provider_url: str
    provider_api_key: str
    temporal_address: str
    namespace: str
    database_url: str
    # How the stack's clients encode payloads; its codec, if it is not the test key's.
    data_converter: DataConverter = DataConverter.default

    @classmethod
    def of_stack(cls, stack: Stack) -> Target:
        return cls(
            api_url=stack.api_url,
            provider_url=stack.provider_url,
            provider_api_key=DEV_PROVIDER_API_KEY,
            temporal_address=stack.temporal_address,
            namespace=NAMESPACE,
            database_url=stack.database_url,
            data_converter=stack.data_converter(),
        )


@dataclass
class Run:
    """One scenario being driven: its client, and the workflows it started."""

    name: str
    target: Target
    temporal: Client
    http: httpx.AsyncClient
    webhooks: WebhookReceiver
    client: CreatedClient
    workflow_ids: list[str] = field(default_factory=list)

    # -- the public API -------------------------------------------------------------

    async def pay(self, payment_method: str = "pm_card_visa", amount: int = 1250) -> str:
        """Start a payment; returns its id. The workflow is recorded for export."""
        key = f"{self.name}-{uuid.uuid4()}"
        response = await self.http.post(
            f"{self.target.api_url}/v1/payments",
            headers={
                "Authorization": f"Bearer {self.client.api_key}",
                "Idempotency-Key": key,
            },
            json={
                "amount": amount,
                "currency": "EUR",
                "payment_method": payment_method,
                "description": f"Replay history: {self.name}",
            },
        )
        if response.status_code not in (201, 202):
            raise RuntimeError(f"{self.name}: POST /v1/payments -> {response.status_code} "
                               f"{response.text}")  # fmt: skip
        self.workflow_ids.append(payment_workflow_id(self.client.client_id, key))
        payment_id: str = response.json()["id"]
        assert payment_id == payment_id_for(self.client.client_id, key)
        return payment_id

    async def refund(self, payment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(
            f"{self.target.api_url}/v1/payments/{payment_id}/refunds",
            headers={
                "Authorization": f"Bearer {self.client.api_key}",
                "Idempotency-Key": f"{self.name}-refund-{uuid.uuid4()}",
            },
            json=body,
        )
        if response.status_code not in (200, 201, 202):
            raise RuntimeError(f"{self.name}: POST refund -> {response.status_code} "
                               f"{response.text}")  # fmt: skip
        refund: dict[str, Any] = response.json()
        return refund

    # -- the sandbox provider's test endpoints ----------------------------------------

    async def faults(self, **faults: float) -> None:
        response = await self.http.put(
            f"{self.target.provider_url}/sandbox/faults",
            headers={"Authorization": f"Bearer {self.target.provider_api_key}"},
            json=faults,
        )
        response.raise_for_status()

    async def clear_faults(self) -> None:
        response = await self.http.delete(
            f"{self.target.provider_url}/sandbox/faults",
            headers={"Authorization": f"Bearer {self.target.provider_api_key}"},
        )
        response.raise_for_status()

    async def charges_made(self, payment_id: str) -> int:
        response = await self.http.get(
            f"{self.target.provider_url}/sandbox/stats",
            headers={"Authorization": f"Bearer {self.target.provider_api_key}"},
        )
        response.raise_for_status()
        made: int = response.json()["charges_by_key"].get(payment_id, 0)
        return made

    # -- Temporal ---------------------------------------------------------------------

    async def wait_closed(self, workflow_id: str, within: float = 60.0) -> WorkflowExecutionStatus:
        deadline = time.monotonic() + within
        handle = self.temporal.get_workflow_handle(workflow_id)
        while True:
            status = (await handle.describe()).status
            if status is not None and status != WorkflowExecutionStatus.RUNNING:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {workflow_id} still running after {within} s")
            await asyncio.sleep(0.5)

    async def wait_activity(self, workflow_id: str, activity_type: str, within: float) -> None:
        """Until the workflow has scheduled an activity of this type."""
        deadline = time.monotonic() + within
        handle = self.temporal.get_workflow_handle(workflow_id)
        while True:
            history = await handle.fetch_history()
            for event in history.events:
                if (
                    event.HasField("activity_task_scheduled_event_attributes")
                    and event.activity_task_scheduled_event_attributes.activity_type.name
                    == activity_type
                ):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {activity_type} in {workflow_id} "
                                   f"after {within} s")  # fmt: skip
            await asyncio.sleep(1.0)


async def _eventually(probe: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within} s")
        await asyncio.sleep(0.2)


# -- the scenarios ------------------------------------------------------------------------


async def success(run: Run) -> None:
    await run.pay("pm_card_visa")


async def decline(run: Run) -> None:
    await run.pay("pm_card_chargeDeclined")


async def provider_retries(run: Run) -> None:
    """The provider answers 500 twice; the third attempt charges (once)."""
    await run.faults(fail_next=2)
    try:
        payment_id = await run.pay()
        await run.wait_closed(run.workflow_ids[-1])
    finally:
        await run.clear_faults()
    if await run.charges_made(payment_id) != 1:
        raise RuntimeError(f"{run.name}: expected exactly one charge")


async def unknown_outcome_lookup(run: Run) -> None:
    """The provider charges and never answers, then fails every retry until the
    charge's budget is spent; the workflow finds the charge by its idempotency key."""
    # Longer than the adapter's timeout (10 s): the first attempt's outcome is unknown.
    await run.faults(timeout_after_charge_next=1, hang_seconds=15)
    try:
        payment_id = await run.pay()
        await _eventually(lambda: _charged(run, payment_id), f"{run.name}: first charge", within=20)
        await run.faults(error_rate=1.0)
        print(f"  {run.name}: charged once, every retry now fails; the lookup comes when the "
              "charge budget (5 min) is spent ...", flush=True)  # fmt: skip
        await run.wait_activity(run.workflow_ids[-1], "find_charge", UNKNOWN_OUTCOME_WITHIN)
    finally:
        await run.clear_faults()
    await run.wait_closed(run.workflow_ids[-1])
    if await run.charges_made(payment_id) != 1:
        raise RuntimeError(f"{run.name}: expected exactly one charge")


async def _charged(run: Run, payment_id: str) -> bool:
    return await run.charges_made(payment_id) >= 1


async def webhook_retry(run: Run) -> None:
    """The client's receiver answers 503 twice, then accepts the event."""
    run.webhooks.respond_with = 503
    try:
        await run.pay()
        await _eventually(
            lambda: _deliveries_at_least(run, 2), f"{run.name}: two failed deliveries", within=60
        )
    finally:
        run.webhooks.respond_with = 204
    await run.wait_closed(run.workflow_ids[-1])


async def _deliveries_at_least(run: Run, count: int) -> bool:
    return len(run.webhooks.received) >= count


async def _require_refunds(run: Run) -> None:
    response = await run.http.get(f"{run.target.api_url}/openapi.json")
    response.raise_for_status()
    paths: dict[str, Any] = response.json().get("paths", {})
    if not any(path.startswith("/v1/payments/") and path.endswith(REFUNDS_ROUTE_SUFFIX)
               and "post" in ops for path, ops in paths.items()):  # fmt: skip
        raise ScenarioSkipped(
            "the API has no POST /v1/payments/{id}/refunds route yet (RefundWorkflow not merged)"
        )


async def refund_full(run: Run) -> None:
    await _require_refunds(run)
    payment_id = await run.pay(amount=1250)
    await run.wait_closed(run.workflow_ids[-1])
    # No amount: what remains of the payment, all of it here (api/schemas.py RefundCreate).
    await run.refund(payment_id, {"reason": "requested_by_customer"})


async def refund_partial(run: Run) -> None:
    await _require_refunds(run)
    payment_id = await run.pay(amount=1250)
    await run.wait_closed(run.workflow_ids[-1])
    await run.refund(payment_id, {"amount": 500, "reason": "requested_by_customer"})


Scenario = Callable[[Run], Awaitable[None]]

# The slow one last, so that a developer watching sees the quick ones land first.
SCENARIOS: dict[str, Scenario] = {
    "success": success,
    "decline": decline,
    "provider_retries": provider_retries,
    "webhook_retry": webhook_retry,
    "refund_full": refund_full,
    "refund_partial": refund_partial,
    "unknown_outcome_lookup": unknown_outcome_lookup,
}


# -- export -------------------------------------------------------------------------------


def _history_name(scenario: str, workflow_type: str, index: int, count: int) -> str:
    """``<scenario>.json`` for the payment; other workflows of the scenario beside it."""
    if workflow_type == "Payment" and index == 0:
        return f"{scenario}.json"
    suffix = workflow_type.lower() if count == 1 else f"{workflow_type.lower()}-{index + 1}"
    return f"{scenario}.{suffix}.json"


async def _scenario_workflows(run: Run, started: datetime) -> list[tuple[str, str]]:
    """(workflow id, type) of everything the scenario's client started, payment first.

    Payments are known by id; anything else (a refund) is found by the client's
    search attribute or, if it carries none, by having started during the scenario.
    """
    since = started.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    query = (
        f'ClientId = "{run.client.client_id}" '
        f'OR (StartTime >= "{since}" AND WorkflowType != "Payment")'
    )
    found: dict[str, str] = {}
    async for execution in run.temporal.list_workflows(query):
        found.setdefault(execution.id, execution.workflow_type)
    ordered = [(wid, "Payment") for wid in run.workflow_ids]
    ordered += [(wid, wtype) for wid, wtype in sorted(found.items(), key=lambda kv: (kv[1], kv[0]))
                if wid not in run.workflow_ids]  # fmt: skip
    return ordered


async def capture(
    target: Target, names: list[str], out_dir: Path, *, webhooks_host: str = "127.0.0.1"
) -> tuple[list[Path], dict[str, str]]:
    """Drive the named scenarios, write their histories; returns (written, skipped)."""
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    temporal = await Client.connect(
        target.temporal_address, namespace=target.namespace, data_converter=target.data_converter
    )
    receiver = WebhookReceiver(webhooks_host, free_port(webhooks_host))
    await receiver.start()
    written: list[Path] = []
    skipped: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            for name in names:
                client = await create_client_async(
                    target.database_url,
                    name=f"replay-{name}",
                    webhook_url=receiver.url,
                    allow_loopback=True,  # the receiver is this command's, on this machine
                )
                receiver.secrets.append(client.webhook_secret)
                receiver.received.clear()
                run = Run(name, target, temporal, http, receiver, client)
                started = datetime.now(UTC)
                print(f"- {name} ...", flush=True)
                try:
                    await SCENARIOS[name](run)
                except ScenarioSkipped as reason:
                    skipped[name] = str(reason)
                    print(f"  {name}: SKIPPED, {reason}", flush=True)
                    continue
                written += await _export(run, started, out_dir)
    finally:
        await receiver.stop()
    return written, skipped


async def _export(run: Run, started: datetime, out_dir: Path) -> list[Path]:
    # Visibility lags the workflows a little; every workflow of the scenario must close.
    await asyncio.sleep(1.0)
    workflows = await _scenario_workflows(run, started)
    for workflow_id, _ in workflows:
        await run.wait_closed(workflow_id)
    written: list[Path] = []
    by_type: dict[str, list[str]] = {}
    for workflow_id, workflow_type in workflows:
        by_type.setdefault(workflow_type, []).append(workflow_id)
    for workflow_type, ids in by_type.items():
        for index, workflow_id in enumerate(ids):
            history = await run.temporal.get_workflow_handle(workflow_id).fetch_history()
            _seal_with_test_key(history, run.target.data_converter)
            path = out_dir / _history_name(run.name, workflow_type, index, len(ids))
            path.write_text(history.to_json() + "\n")
            written.append(path)
            print(f"  {run.name}: {workflow_type} {workflow_id} -> "
                  f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}"
                  f" ({len(history.events)} events)", flush=True)  # fmt: skip
    return written


def _attached_converter(settings: Settings) -> DataConverter:
    """The running stack's payload keys: from PAYMENTS_* settings, else ``make run``'s
    (kept in .data/dev-secrets.json, which it does not put in the environment)."""
    if settings.payload_keyring is not None:
        return data_converter(settings)
    dev_secrets = REPO_ROOT / ".data" / "dev-secrets.json"
    if not dev_secrets.exists():
        return DataConverter.default
    key = json.loads(dev_secrets.read_text())["payload_key"]
    keys = parse_payload_keys(f"{DEV_PAYLOAD_KEY_ID}:{key}")
    return DataConverter(payload_codec=AesGcmCodec(keys, DEV_PAYLOAD_KEY_ID))


def _seal_with_test_key(history: WorkflowHistory, converter: DataConverter) -> None:
    """Histories are committed sealed with the TEST-ONLY key, whatever the stack's key."""
    codec = converter.payload_codec
    sealer = replay_only_codec()
    if codec is None:
        return  # payloads in clear: the replay test reads those too
    if not isinstance(codec, AesGcmCodec):
        raise RuntimeError(f"cannot re-seal payloads encoded by {type(codec).__name__}")
    if codec.active_key_id != sealer.active_key_id:
        reseal(history, codec, sealer)


# -- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attach",
        action="store_true",
        help="use a running stack (addresses from PAYMENTS_* settings, the API from --api-url) "
        "instead of starting one on free ports",
    )
    parser.add_argument("--api-url", default=f"http://127.0.0.1:{StackPorts().api}")
    parser.add_argument("--out", type=Path, default=HISTORIES_DIR)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        help="capture this scenario only (repeatable); default: all of them",
    )


async def run_command(args: argparse.Namespace, data_dir: Path) -> int:
    names: list[str] = args.only or list(SCENARIOS)
    started = time.monotonic()
    if args.attach:
        settings = Settings()
        target = Target(
            api_url=args.api_url,
            provider_url=settings.provider_url,
            provider_api_key=settings.provider_api_key.get_secret_value(),
            temporal_address=settings.temporal_address,
            namespace=settings.temporal_namespace,
            database_url=settings.database_url,
            data_converter=_attached_converter(settings),
        )
        written, skipped = await capture(target, names, args.out)
    else:
        print(f"Starting a stack on free ports (data in {data_dir}) ...", flush=True)
        config = StackConfig.for_tests(data_dir).with_env(**replay_only_settings_env())
        async with Stack(config) as stack:
            written, skipped = await capture(Target.of_stack(stack), names, args.out)
    print(f"\n{len(written)} histories written to {args.out} in "
          f"{time.monotonic() - started:.0f} s.", flush=True)  # fmt: skip
    for name, reason in skipped.items():
        print(f"SKIPPED {name}: {reason}", flush=True)
    return 0
