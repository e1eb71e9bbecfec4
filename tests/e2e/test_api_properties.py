"""Random sequences of what two clients do, against the running stack: create, repeat,
reuse a key with another body, refund, read. After every step the money is checked
where a user would check it:

- the provider made at most one charge per payment (its idempotency key), exactly one
  for a payment the API says succeeded;
- each payment's ledger entries sum to zero;
- refunds never exceed what was captured, at the provider or in the API's answer;
- neither client ever sees the other's payments.

Hypothesis drives it (``RuleBasedStateMachine``), derandomized so every run tries the
same sequences; idempotency keys are fresh UUIDs, so runs never meet each other's
payments. Bounded by ``max_examples`` and ``stateful_step_count`` to fit the suite.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from admin.clients import CreatedClient
from ledger.outcomes import libpq_url
from tests.helpers.e2e import E2EStack

pytestmark = pytest.mark.e2e

TYPES = "https://payments.example.com/problems/"
METHODS = ("pm_card_visa", "pm_card_visa", "pm_card_chargeDeclined")
PROPERTY_SETTINGS = settings(
    max_examples=8,
    stateful_step_count=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass
class Made:
    """A payment as the test made it: whose, with which key and body."""

    owner: int
    key: str
    body: dict[str, Any]
    id: str = ""
    refunded: int = 0
    refunds: list[str] = field(default_factory=list)


def _problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    kind: str = response.json()["type"]
    return kind.removeprefix(TYPES)


def machine_for(stack: E2EStack, clients: list[CreatedClient]) -> type[RuleBasedStateMachine]:
    api_url, provider_url = stack.api_url, stack.stack.provider_url
    provider_auth = {"Authorization": f"Bearer {stack.provider.api_key}"}
    database_url = libpq_url(stack.stack.database_url)

    class TwoClients(RuleBasedStateMachine):
        payments = Bundle("payments")

        def __init__(self) -> None:
            super().__init__()
            self.http = httpx.Client(base_url=api_url, timeout=60)
            self.made: list[Made] = []

        def teardown(self) -> None:
            self.http.close()

        def auth(self, owner: int, key: str | None = None) -> dict[str, str]:
            headers = {"Authorization": f"Bearer {clients[owner].api_key}"}
            if key is not None:
                headers["Idempotency-Key"] = key
            return headers

        def read(self, made: Made, owner: int | None = None) -> httpx.Response:
            who = made.owner if owner is None else owner
            return self.http.get(f"/v1/payments/{made.id}", headers=self.auth(who))

        @rule(
            target=payments,
            owner=st.integers(0, 1),
            amount=st.integers(100, 5000),
            method=st.sampled_from(METHODS),
        )
        def create(self, owner: int, amount: int, method: str) -> Made:
            made = Made(owner, str(uuid.uuid4()), {"amount": amount, "currency": "EUR",
                                                  "payment_method": method})  # fmt: skip
            response = self.http.post(
                "/v1/payments", json=made.body, headers=self.auth(owner, made.key)
            )
            assert response.status_code in (201, 202), response.text
            assert "Idempotent-Replayed" not in response.headers
            made.id = response.json()["id"]
            self.made.append(made)
            return made

        @rule(made=payments)
        def repeat(self, made: Made) -> None:
            response = self.http.post(
                "/v1/payments", json=made.body, headers=self.auth(made.owner, made.key)
            )
            assert response.status_code in (201, 202), response.text
            assert response.headers["Idempotent-Replayed"] == "true"
            assert response.json()["id"] == made.id

        @rule(made=payments, extra=st.integers(1, 100))
        def reuse_the_key_with_another_body(self, made: Made, extra: int) -> None:
            body = {**made.body, "amount": made.body["amount"] + extra}
            response = self.http.post(
                "/v1/payments", json=body, headers=self.auth(made.owner, made.key)
            )
            assert response.status_code == 422, response.text
            assert _problem_type(response) == "idempotency-key-reused"

        @rule(made=payments, amount=st.integers(1, 3000))
        def refund(self, made: Made, amount: int) -> None:
            before = self.read(made).json()
            response = self.http.post(
                f"/v1/payments/{made.id}/refunds",
                json={"amount": amount},
                headers=self.auth(made.owner, str(uuid.uuid4())),
            )
            if response.status_code in (201, 202):
                assert before["status"] != "failed"
                assert amount <= before["amount_refundable"] or before["status"] == "processing"
                refund = response.json()
                made.refunds.append(refund["id"])
                if refund["status"] == "succeeded":
                    made.refunded += amount
                return
            assert response.status_code == 409, response.text
            kind = _problem_type(response)
            if kind == "refund-exceeds-refundable":
                assert amount > response.json()["amount_refundable"]
            else:
                assert kind == "payment-not-refundable"
                assert before["status"] != "succeeded"

        @rule(made=payments)
        def read_both_ways(self, made: Made) -> None:
            mine = self.read(made)
            assert mine.status_code == 200
            assert mine.json()["id"] == made.id
            theirs = self.read(made, owner=1 - made.owner)
            assert theirs.status_code == 404
            assert _problem_type(theirs) == "payment-not-found"
            for refund_id in made.refunds:
                path = f"/v1/payments/{made.id}/refunds/{refund_id}"
                assert self.http.get(path, headers=self.auth(made.owner)).status_code == 200
                other = self.http.get(path, headers=self.auth(1 - made.owner))
                assert other.status_code == 404

        @invariant()
        def each_client_lists_only_its_own(self) -> None:
            for owner in (0, 1):
                listed = self.http.get("/v1/payments?limit=100", headers=self.auth(owner))
                assert listed.status_code == 200
                ids = {p["id"] for p in listed.json()["data"]}
                assert not ids & {m.id for m in self.made if m.owner != owner}

        @invariant()
        def money_adds_up(self) -> None:
            if not self.made:
                return
            answer = self.http.get(f"{provider_url}/sandbox/stats", headers=provider_auth)
            answer.raise_for_status()
            stats = answer.json()
            with psycopg.connect(database_url) as conn:
                sums: dict[str, int] = dict(
                    conn.execute(
                        "SELECT payment_id, COALESCE(SUM(amount), 0) FROM ledger_entries "
                        "WHERE payment_id = ANY(%s) GROUP BY payment_id",
                        ([m.id for m in self.made],),
                    ).fetchall()
                )
            for made in self.made:
                payment = self.read(made).json()
                charges = stats["charges_by_key"].get(made.id, 0)
                assert charges <= 1, (made.id, charges)
                if payment["status"] == "succeeded":
                    assert charges == 1, made.id
                    refunds = stats["refunds_by_charge"].get(payment["provider_charge_id"])
                    at_provider = refunds["amount"] if refunds else 0
                    assert at_provider <= payment["amount"]
                assert sums.get(made.id, 0) == 0, (made.id, sums.get(made.id))
                assert 0 <= payment["amount_refunded"] <= payment["amount"]
                assert payment["amount_refunded"] >= made.refunded

    return TwoClients


async def test_random_sequences_of_two_clients_never_double_charge_or_leak(
    stack: E2EStack,
) -> None:
    clients = [await stack.stack.add_client(f"prop-{n}-{uuid.uuid4().hex[:6]}") for n in range(2)]
    machine = machine_for(stack, clients)
    # In a thread: the stack's webhook receiver runs on this test's event loop.
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=PROPERTY_SETTINGS)
