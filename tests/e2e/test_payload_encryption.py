"""Card and customer data never sit in clear in Temporal: the raw history of a real
payment, read without the codec, holds neither the payment-method token nor the
metadata; read with the codec (as the API, the worker and the UI do) it decodes."""

from __future__ import annotations

import base64
import json
import uuid

import httpx
import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryRequest
from temporalio.client import Client

from devstack.stack import REPO_ROOT
from devstack.temporal_server import NAMESPACE
from domain.payments import Payment, PaymentInput, payment_workflow_id
from tests.helpers.e2e import E2EStack, temporal_cli

pytestmark = pytest.mark.e2e


async def test_a_raw_history_holds_no_card_token_or_metadata_in_clear(stack: E2EStack) -> None:
    key = str(uuid.uuid4())
    marker = f"customer-{uuid.uuid4().hex}"
    body = {
        "amount": 4200,
        "currency": "EUR",
        "payment_method": "pm_card_mastercard",
        "description": f"desc-{marker}",
        "metadata": {"customer_email": f"{marker}@example.com"},
    }
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        response = await http.post(
            "/v1/payments",
            json=body,
            headers={"Authorization": f"Bearer {stack.client.api_key}", "Idempotency-Key": key},
        )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "succeeded"

    workflow_id = payment_workflow_id(stack.client.client_id, key)
    decoding = await stack.stack.temporal_client()
    handle = decoding.get_workflow_handle(workflow_id, result_type=Payment)
    # The 201 can come before the history has the events of the workflow task that
    # recorded the outcome (local activities record it from inside that task): read
    # the raw history once the run has closed, so every payload of it is checked.
    result = await handle.result()
    assert result.metadata == body["metadata"]
    # The workflow service speaks protobuf straight to the server: no data converter.
    plain = await Client.connect(stack.temporal_address, namespace=NAMESPACE)
    history = await plain.workflow_service.get_workflow_execution_history(
        GetWorkflowExecutionHistoryRequest(
            namespace=NAMESPACE, execution=WorkflowExecution(workflow_id=workflow_id)
        )
    )
    raw = history.SerializeToString()
    assert len(history.history.events) > 5
    for secret in ("pm_card_mastercard", marker, "customer_email"):
        assert secret.encode() not in raw, f"{secret} is in the raw history"
    # What support searches by stays readable: the key is in the workflow id and attributes.
    assert key.encode() in raw

    started = (await handle.fetch_history()).events[0]
    [input_payload] = started.workflow_execution_started_event_attributes.input.payloads
    assert input_payload.metadata["encoding"] == b"binary/encrypted"
    [payment_input] = await decoding.data_converter.decode([input_payload], [PaymentInput])
    assert payment_input.request.payment_method == "pm_card_mastercard"
    assert payment_input.request.metadata == {"customer_email": f"{marker}@example.com"}


def _payload_bytes(history_json: str) -> bytes:
    """Every payload's data in a ``temporal workflow show --output json`` history."""
    found: list[bytes] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                found.append(base64.b64decode(node["data"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history_json))
    assert found, "no payloads in the history"
    return b"\n".join(found)


async def test_the_temporal_cli_decodes_a_declined_payment_through_our_codec_endpoint(
    stack: E2EStack,
) -> None:
    key = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        response = await http.post(
            "/v1/payments",
            json={"amount": 990, "currency": "EUR", "payment_method": "pm_card_chargeDeclined"},
            headers={"Authorization": f"Bearer {stack.client.api_key}", "Idempotency-Key": key},
        )
    assert response.status_code == 201, response.text
    show = ["workflow", "show", "--address", stack.temporal_address, "--namespace", NAMESPACE,
            "-w", payment_workflow_id(stack.client.client_id, key), "--output", "json"]  # fmt: skip

    raw = await temporal_cli(*show)
    assert b"pm_card_chargeDeclined" not in _payload_bytes(raw)
    assert "pm_card_chargeDeclined" not in raw
    # The failure's message and stack trace are sealed too: its type stays searchable.
    assert "Your card was declined" not in raw
    assert str(REPO_ROOT) not in raw, "a stack trace's file paths are in clear"
    assert "Encoded failure" in raw
    assert "PaymentDeclined" in raw
    token = stack.stack.dev_secrets["codec_token"]
    decoded = await temporal_cli(
        *show, "--codec-endpoint", stack.stack.codec_url, "--codec-auth", f"Bearer {token}"
    )
    assert b"pm_card_chargeDeclined" in _payload_bytes(decoded)
    assert b"Your card was declined" in _payload_bytes(decoded)
