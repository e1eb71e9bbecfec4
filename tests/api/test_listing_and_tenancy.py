"""Reads are scoped to the key's client; listings page newest first, from the ledger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.payments import PaymentStatus
from tests.api.conftest import bearer, store_payment


async def test_another_clients_payment_is_a_404_identical_to_a_missing_one(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    owner, other = await new_client("owner"), await new_client("other")
    payment_id = await store_payment(sessions, owner.client_id)

    mine = await api.get(f"/v1/payments/{payment_id}", headers=bearer(owner.api_key))
    theirs = await api.get(f"/v1/payments/{payment_id}", headers=bearer(other.api_key))
    missing = await api.get(f"/v1/payments/{payment_id[:-1]}x", headers=bearer(other.api_key))
    listed = await api.get("/v1/payments", headers=bearer(other.api_key))

    assert mine.status_code == 200
    assert theirs.status_code == missing.status_code == 404
    assert theirs.headers["content-type"] == "application/problem+json"

    def without_instance(response: httpx.Response) -> dict[str, Any]:
        body: dict[str, Any] = response.json()
        body.pop("instance")
        return body

    assert without_instance(theirs) == without_instance(missing)
    assert payment_id not in listed.text


async def test_a_listing_pages_newest_first_without_gaps_or_repeats(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    client, other = await new_client("lister"), await new_client("noise")
    created = [await store_payment(sessions, client.client_id, amount=100 + n) for n in range(7)]
    await store_payment(sessions, other.client_id)

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["starting_after"] = cursor
        page = await api.get("/v1/payments", params=params, headers=bearer(client.api_key))
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["object"] == "list"
        seen += [payment["id"] for payment in body["data"]]
        pages += 1
        if not body["has_more"]:
            break
        cursor = body["data"][-1]["id"]

    assert seen == list(reversed(created))
    assert pages == 3
    default = (await api.get("/v1/payments", headers=bearer(client.api_key))).json()
    assert len(default["data"]) == 7
    assert default["has_more"] is False


async def test_a_listing_filters_by_status(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    client = await new_client("filter")
    ok = await store_payment(sessions, client.client_id)
    declined = await store_payment(sessions, client.client_id, status=PaymentStatus.FAILED)
    pending = await store_payment(sessions, client.client_id, status=PaymentStatus.PROCESSING)

    def ids(response: httpx.Response) -> list[str]:
        return [payment["id"] for payment in response.json()["data"]]

    headers = bearer(client.api_key)
    failed = await api.get("/v1/payments", params={"status": "failed"}, headers=headers)
    processing = await api.get("/v1/payments", params={"status": "processing"}, headers=headers)
    succeeded = await api.get("/v1/payments", params={"status": "succeeded"}, headers=headers)
    assert ids(failed) == [declined]
    assert failed.json()["data"][0]["failure_code"] == "card_declined"
    assert ids(processing) == [pending]
    assert ids(succeeded) == [ok]


async def test_listing_parameters_out_of_bounds_are_400_problems_naming_the_field(
    api: httpx.AsyncClient,
    new_client: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    client, other = await new_client("bounds"), await new_client("bounds-other")
    foreign = await store_payment(sessions, other.client_id)
    headers = bearer(client.api_key)
    cases: dict[str, dict[str, str | int]] = {
        "limit": {"limit": 101},
        "status": {"status": "refunded"},
        "starting_after": {"starting_after": foreign},
    }
    for field, params in cases.items():
        response = await api.get("/v1/payments", params=params, headers=headers)
        assert response.status_code == 400, (field, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"] == "https://payments.example.com/problems/validation-error"
        assert [error["field"] for error in body["errors"]] == [field]
    zero = await api.get("/v1/payments", params={"limit": 0}, headers=headers)
    hundred = await api.get("/v1/payments", params={"limit": 100}, headers=headers)
    assert zero.status_code == 400
    assert hundred.status_code == 200
