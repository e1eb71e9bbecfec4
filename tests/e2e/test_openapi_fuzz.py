"""The API's own OpenAPI document, fuzzed against the running stack (schemathesis):
valid and invalid requests to every operation, as a client with a key would send
them. Every answer must be one the document promises: no 5xx, a documented status,
the documented content type, headers and body; and every error a problem+json with
its stable ``type``.

Bounded by examples per operation (derandomized: every run sends the same requests),
so it fits the suite; ``FUZZ_EXAMPLES`` in the environment runs it longer.
"""

from __future__ import annotations

import asyncio
import os
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers.e2e import E2EStack

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "60"))
TYPES = "https://payments.example.com/problems/"


def errors_are_problem_json(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """RFC 9457: every 4xx and 5xx is application/problem+json with a stable type."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type == "application/problem+json", (
        f"{response.status_code} answered as {content_type!r}: {response.text[:200]}"
    )
    body = response.json()
    assert isinstance(body, dict), body
    assert str(body.get("type", "")).startswith(TYPES), body
    assert body.get("status") == response.status_code, body
    assert body.get("title"), body
    return True


CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@dataclass(frozen=True)
class Known:
    """A real payment and refund of the fuzzing client, for path parameters."""

    payment_id: str
    refund_id: str


def fuzz(api_url: str, headers: dict[str, str], known: Known) -> list[str]:
    """Every operation, ``EXAMPLES_PER_OPERATION`` cases each, valid and invalid ones;
    the failures, shrunk. A case may carry a fresh Idempotency-Key, a currency in use
    (the document cannot say which keys and currencies are valid) and real ids, so it
    reaches past the first refusal."""
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=cases,
            key=st.one_of(st.none(), st.uuids()),
            real_ids=st.booleans(),
            currency=st.sampled_from([None, "EUR", "JPY", "KWD"]),
        )
        def one_request(
            case: Case[Any], key: uuid.UUID | None, real_ids: bool, currency: str | None
        ) -> None:
            sent = dict(headers)
            if key is not None:
                sent["Idempotency-Key"] = str(key)
            if currency is not None and isinstance(case.body, dict) and "currency" in case.body:
                case.body["currency"] = currency
            if real_ids and case.path_parameters:
                if "payment_id" in case.path_parameters:
                    case.path_parameters["payment_id"] = known.payment_id
                if "refund_id" in case.path_parameters:
                    case.path_parameters["refund_id"] = known.refund_id
            response = case.call(base_url=api_url, headers=sent, timeout=60)
            case.validate_response(
                response, checks=CHECKS, additional_checks=[errors_are_problem_json]
            )

        try:
            one_request()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis groups its failures
            failures.append(f"{operation.label}:\n{''.join(traceback.format_exception(exc))}")
    return failures


def known_payment(api_url: str, headers: dict[str, str]) -> Known:
    with httpx.Client(base_url=api_url, headers=headers, timeout=60) as http:
        paid = http.post(
            "/v1/payments",
            json={"amount": 100_000, "currency": "EUR", "payment_method": "pm_card_visa"},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert paid.status_code == 201, paid.text
        payment_id = paid.json()["id"]
        refunded = http.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": 1},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert refunded.status_code in (201, 202), refunded.text
        return Known(payment_id, refunded.json()["id"])


async def test_every_answer_to_fuzzed_requests_is_one_the_document_promises(
    stack: E2EStack,
) -> None:
    client = await stack.stack.add_client("fuzz")
    headers = {"Authorization": f"Bearer {client.api_key}"}
    # In threads: the stack's webhook receiver runs on this test's event loop.
    known = await asyncio.to_thread(known_payment, stack.api_url, headers)
    failures = await asyncio.to_thread(fuzz, stack.api_url, headers, known)
    assert not failures, "\n\n".join(failures)
