"""The sandbox provider over HTTP: Stripe's shapes, its idempotency, its test endpoints."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sandbox_provider.conftest import SEED, Sandbox, SandboxProcess, running_sandbox


def _key() -> str:
    return str(uuid.uuid4())


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


async def test_health_needs_no_key_and_everything_else_does(
    sandbox_process: SandboxProcess,
) -> None:
    async with httpx.AsyncClient(base_url=sandbox_process.base_url) as http:
        health = await http.get("/healthz")
        refused = [
            await http.post("/v1/charges", json={}, headers={"Idempotency-Key": _key()}),
            await http.get("/v1/charges/ch_1"),
            await http.get("/sandbox/stats"),
            await http.put("/sandbox/faults", json={"fail_next": 1}),
            await http.get("/sandbox/stats", headers={"Authorization": "Bearer sk_test_wrong"}),
            await http.get("/sandbox/stats", headers={"Authorization": "Basic c2tfdGVzdA=="}),
            # A non-ASCII key must be a 401, not a crash in the comparison.
            await http.get("/sandbox/stats", headers={b"Authorization": b"Bearer sk_t\xc3\xa9st"}),
        ]

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert [response.status_code for response in refused] == [401] * len(refused)
    assert {_error(response)["type"] for response in refused} == {"invalid_request_error"}


async def test_a_charge_is_a_stripe_charge_object_with_the_currency_in_lower_case(
    sandbox: Sandbox,
) -> None:
    key = _key()
    response = await sandbox.charge(key, amount=1234, currency="EUR", description="order 7")
    charge = response.json()

    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response.headers
    assert charge["id"].startswith("ch_")
    assert isinstance(charge["created"], int)
    assert {k: v for k, v in charge.items() if k not in ("id", "created")} == {
        "object": "charge",
        "amount": 1234,
        "currency": "eur",
        "status": "succeeded",
        "payment_method": "pm_card_visa",
        "description": "order 7",
        "idempotency_key": key,
        "amount_refunded": 0,
        "failure_code": None,
    }
    assert (await sandbox.http.get(f"/v1/charges/{charge['id']}")).json() == charge
    missing = await sandbox.http.get("/v1/charges/ch_missing")
    assert missing.status_code == 404
    assert _error(missing)["code"] == "resource_missing"


async def test_a_repeated_key_replays_the_first_answer_and_charges_once(
    sandbox: Sandbox,
) -> None:
    key = _key()
    first = await sandbox.charge(key)
    replay = await sandbox.charge(key)
    stats = await sandbox.stats()

    assert replay.status_code == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == first.content
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 2


async def test_a_key_reused_with_other_parameters_is_refused_and_changes_nothing(
    sandbox: Sandbox,
) -> None:
    key = _key()
    first = await sandbox.charge(key, amount=700)
    other_amount = await sandbox.charge(key, amount=701)
    other_card = await sandbox.charge(key, amount=700, payment_method="pm_card_mastercard")
    still_first = await sandbox.charge(key, amount=700, currency="eur")

    for refused in (other_amount, other_card):
        assert refused.status_code == 400
        assert _error(refused)["type"] == "idempotency_error"
    # The currency is compared as the provider stores it: "EUR" and "eur" are one request.
    assert still_first.json() == first.json()
    assert (await sandbox.stats())["charges_by_key"][key] == 1


@pytest.mark.parametrize(
    ("payment_method", "code", "decline_code"),
    [
        ("pm_card_chargeDeclined", "card_declined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card"),
        ("pm_card_chargeDeclinedProcessingError", "processing_error", "processing_error"),
    ],
)
async def test_a_decline_is_a_stored_failed_charge_that_moved_no_money(
    sandbox: Sandbox, payment_method: str, code: str, decline_code: str
) -> None:
    key = _key()
    declined = await sandbox.charge(key, payment_method=payment_method)
    replayed = await sandbox.charge(key, payment_method=payment_method)
    error = _error(declined)
    charge = (await sandbox.http.get(f"/v1/charges/{error['charge']}")).json()
    stats = await sandbox.stats()

    assert declined.status_code == 402
    assert (error["type"], error["code"], error["decline_code"]) == (
        "card_error",
        code,
        decline_code,
    )
    assert error["message"]
    assert (replayed.status_code, replayed.content) == (402, declined.content)
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert (charge["status"], charge["failure_code"]) == ("failed", decline_code)
    assert key not in stats["charges_by_key"]
    assert stats["charge_requests_by_key"][key] == 2


async def test_an_unknown_payment_method_is_missing_and_its_token_is_not_echoed(
    sandbox: Sandbox,
) -> None:
    response = await sandbox.charge(_key(), payment_method="pm_card_secretLooking")

    assert response.status_code == 400
    assert (_error(response)["type"], _error(response)["code"]) == (
        "invalid_request_error",
        "resource_missing",
    )
    assert "pm_card_secretLooking" not in response.text


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"amount": 0}, "parameter_invalid", "amount"),
        ({"amount": -5}, "parameter_invalid", "amount"),
        ({"amount": "500"}, "parameter_invalid", "amount"),
        ({"amount": 5.5}, "parameter_invalid", "amount"),
        ({"amount": True}, "parameter_invalid", "amount"),
        ({"currency": "euro"}, "parameter_invalid", "currency"),
        ({"payment_method": None}, "parameter_invalid", "payment_method"),
        ({"colour": "red"}, "parameter_unknown", "colour"),
    ],
)
async def test_invalid_parameters_are_refused_without_using_up_the_key(
    sandbox: Sandbox, body: dict[str, Any], code: str, param: str
) -> None:
    key = _key()
    refused = await sandbox.charge(key, **body)
    accepted = await sandbox.charge(key)

    assert refused.status_code == 400
    assert (_error(refused)["type"], _error(refused)["code"], _error(refused)["param"]) == (
        "invalid_request_error",
        code,
        param,
    )
    assert accepted.status_code == 200
    assert "Idempotent-Replayed" not in accepted.headers
    assert (await sandbox.stats())["charge_requests_by_key"][key] == 2


async def test_a_body_that_is_not_json_or_lacks_fields_is_refused(sandbox: Sandbox) -> None:
    not_json = await sandbox.http.post(
        "/v1/charges", content=b"amount=500", headers={"Idempotency-Key": _key()}
    )
    incomplete = await sandbox.http.post(
        "/v1/charges", json={"amount": 500}, headers={"Idempotency-Key": _key()}
    )

    assert not_json.status_code == incomplete.status_code == 400
    assert _error(not_json)["type"] == "invalid_request_error"
    assert _error(incomplete)["code"] == "parameter_missing"


async def test_posts_need_an_idempotency_key_of_at_most_255_characters(
    sandbox: Sandbox,
) -> None:
    body = {"amount": 500, "currency": "eur", "payment_method": "pm_card_visa"}
    without = await sandbox.http.post("/v1/charges", json=body)
    refund_without = await sandbox.http.post("/v1/refunds", json={"charge": "ch_1"})
    too_long = await sandbox.charge("k" * 256)
    longest = await sandbox.charge(_key().ljust(255, "k"))

    assert [without.status_code, refund_without.status_code, too_long.status_code] == [400] * 3
    assert _error(without)["code"] == "idempotency_key_required"
    assert _error(too_long)["code"] == "idempotency_key_too_long"
    assert longest.status_code == 200


async def test_the_lookup_by_key_lists_the_charge_made_under_it(sandbox: Sandbox) -> None:
    key = _key()
    before = (await sandbox.http.get("/v1/charges", params={"idempotency_key": key})).json()
    charge = (await sandbox.charge(key)).json()
    after = (await sandbox.http.get("/v1/charges", params={"idempotency_key": key})).json()
    without_key = await sandbox.http.get("/v1/charges")

    assert before == {"object": "list", "data": []}
    assert after == {"object": "list", "data": [charge]}
    assert without_key.status_code == 400
    assert _error(without_key)["code"] == "parameter_missing"


async def test_a_refund_defaults_to_what_remains_and_grows_the_charges_refunded_amount(
    sandbox: Sandbox,
) -> None:
    charge = (await sandbox.charge(_key(), amount=1000)).json()
    partial = await sandbox.refund(_key(), charge["id"], 400)
    rest = await sandbox.refund(_key(), charge["id"])
    nothing_left = await sandbox.refund(_key(), charge["id"])
    after = (await sandbox.http.get(f"/v1/charges/{charge['id']}")).json()

    assert partial.status_code == rest.status_code == 200
    refund = rest.json()
    assert refund["id"].startswith("re_")
    assert {k: v for k, v in refund.items() if k not in ("id", "created", "idempotency_key")} == {
        "object": "refund",
        "charge": charge["id"],
        "amount": 600,
        "currency": "eur",
        "status": "succeeded",
    }
    assert nothing_left.status_code == 400
    assert _error(nothing_left)["code"] == "amount_too_large"
    assert after["amount_refunded"] == 1000
    assert (await sandbox.stats())["refunds_by_charge"][charge["id"]] == {
        "count": 2,
        "amount": 1000,
    }


async def test_refunds_of_a_failed_or_unknown_charge_are_refused(sandbox: Sandbox) -> None:
    declined = await sandbox.charge(_key(), payment_method="pm_card_chargeDeclined")
    failed = await sandbox.refund(_key(), _error(declined)["charge"])
    unknown = await sandbox.refund(_key(), "ch_missing")

    assert failed.status_code == unknown.status_code == 400
    assert _error(failed)["code"] == "charge_not_refundable"
    assert _error(unknown)["code"] == "resource_missing"


async def test_faults_are_replaced_read_counted_down_and_cleared(sandbox: Sandbox) -> None:
    put = await sandbox.http.put("/sandbox/faults", json={"fail_next": 2, "latency_ms": 10})
    faulted = await sandbox.charge(_key())
    read = (await sandbox.http.get("/sandbox/faults")).json()
    cleared = (await sandbox.http.delete("/sandbox/faults")).json()
    invalid = await sandbox.http.put("/sandbox/faults", json={"error_rate": 2})
    unknown = await sandbox.http.put("/sandbox/faults", json={"explode": True})

    assert put.json() == {
        "latency_ms": 10,
        "error_rate": 0.0,
        "fail_next": 2,
        "timeout_after_charge_rate": 0.0,
        "timeout_after_charge_next": 0,
        "hang_seconds": 30.0,
        "malformed_after_charge_next": 0,
        "malformed_after_charge_rate": 0.0,
    }
    assert faulted.status_code == 500
    assert _error(faulted)["type"] == "api_error"
    assert read == {**put.json(), "fail_next": 1}
    assert cleared == {**put.json(), "fail_next": 0, "latency_ms": 0}
    assert invalid.status_code == unknown.status_code == 400


async def test_fail_next_answers_500_without_charging_then_the_same_key_charges(
    sandbox: Sandbox,
) -> None:
    await sandbox.set_faults(fail_next=2)
    key = _key()
    answers = [await sandbox.charge(key) for _ in range(3)]
    stats = await sandbox.stats()

    assert [answer.status_code for answer in answers] == [500, 500, 200]
    assert "Idempotent-Replayed" not in answers[2].headers
    assert stats["charges_by_key"][key] == 1
    assert stats["charge_requests_by_key"][key] == 3


async def test_an_error_rate_of_one_fails_charges_and_refunds_alike(sandbox: Sandbox) -> None:
    charge = (await sandbox.charge(_key())).json()
    await sandbox.set_faults(error_rate=1.0)
    key = _key()
    charges = [await sandbox.charge(key) for _ in range(3)]
    refund = await sandbox.refund(_key(), charge["id"])
    stats = await sandbox.stats()

    assert [answer.status_code for answer in [*charges, refund]] == [500] * 4
    assert key not in stats["charges_by_key"]
    assert charge["id"] not in stats["refunds_by_charge"]


async def test_random_faults_fall_the_same_way_for_the_same_seed(tmp_path: Path) -> None:
    async def pattern() -> list[int]:
        with running_sandbox(tmp_path, "--seed", str(SEED)) as process:
            async with Sandbox(process.base_url, process.api_key) as sandbox:
                await sandbox.set_faults(error_rate=0.5)
                return [(await sandbox.charge(_key())).status_code for _ in range(16)]

    first, second = await pattern(), await pattern()

    assert first == second
    assert set(first) == {200, 500}


async def test_latency_delays_every_answer(sandbox: Sandbox) -> None:
    await sandbox.set_faults(latency_ms=300)
    started = time.monotonic()
    response = await sandbox.charge(_key())

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


async def test_a_malformed_answer_follows_a_committed_charge(sandbox: Sandbox) -> None:
    await sandbox.set_faults(malformed_after_charge_next=1)
    key = _key()
    malformed = await sandbox.charge(key)
    retried = await sandbox.charge(key)

    assert malformed.status_code == 200
    with pytest.raises(ValueError, match="Expecting value"):
        malformed.json()
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert (await sandbox.stats())["charges_by_key"][key] == 1


async def test_reset_forgets_charges_refunds_requests_and_faults(
    tmp_path: Path,
) -> None:
    with running_sandbox(tmp_path) as process:
        async with Sandbox(process.base_url, process.api_key) as sandbox:
            charge = (await sandbox.charge(_key())).json()
            await sandbox.refund(_key(), charge["id"], 100)
            await sandbox.set_faults(fail_next=5)
            reset = await sandbox.http.post("/sandbox/reset")
            stats = await sandbox.stats()
            faults = (await sandbox.http.get("/sandbox/faults")).json()
            gone = await sandbox.http.get(f"/v1/charges/{charge['id']}")

    assert reset.status_code == 200
    assert stats == {
        "charges_by_key": {},
        "charge_requests_by_key": {},
        "refunds_by_charge": {},
        "total_charges": 0,
        "total_charged_amount": 0,
    }
    assert faults["fail_next"] == 0
    assert gone.status_code == 404


async def test_charges_refunds_and_stored_answers_survive_a_crash_with_a_database_file(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "provider.sqlite3")
    key = _key()
    with running_sandbox(tmp_path / "first", "--db", db) as process:
        async with Sandbox(process.base_url, process.api_key) as sandbox:
            first = await sandbox.charge(key, amount=900)
            await sandbox.refund(_key(), first.json()["id"], 200)
        process.crash()

    with running_sandbox(tmp_path / "second", "--db", db) as process:
        async with Sandbox(process.base_url, process.api_key) as sandbox:
            retried = await sandbox.charge(key, amount=900)
            charge = (await sandbox.http.get(f"/v1/charges/{first.json()['id']}")).json()
            stats = await sandbox.stats()

    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json() == first.json()
    assert charge["amount_refunded"] == 200
    assert stats["charges_by_key"] == {key: 1}
    assert stats["charge_requests_by_key"] == {key: 2}
    assert stats["total_charged_amount"] == 900
