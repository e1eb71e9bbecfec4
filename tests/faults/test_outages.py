"""Fault tests 4 and 5: Temporal crashes and comes back on its database file;
PostgreSQL stops (immediate shutdown: crash-like) for 30 s while outcomes are recorded."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from domain.payments import payment_id_for
from tests.faults.stack import FaultStack, assert_settled
from tests.helpers.eventually import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

IN_FLIGHT = 10


async def _requested_all(fs: FaultStack, ids: list[str]) -> bool:
    requested = (await fs.provider.stats())["charge_requests_by_key"]
    return all(i in requested for i in ids)


async def test_temporal_killed_and_restarted_mid_run_loses_and_doubles_nothing(
    faults: FaultStack,
) -> None:
    stack = faults.stack
    # The provider holds each charge 6 s: past the API's 5 s wait, so every payment is
    # accepted (202) and still at the provider when Temporal dies.
    await faults.provider.set_faults(latency_ms=6000)
    keys = [str(uuid.uuid4()) for _ in range(IN_FLIGHT)]
    ids = [payment_id_for(faults.client.client_id, key) for key in keys]
    first = await asyncio.gather(*(faults.pay(key) for key in keys))
    # 202 as a rule; a 503 (the API's bounded look at Temporal ran out on a loaded
    # machine) is retried with its key after the restart like any client would.
    codes = [r.status_code for r in first]
    assert set(codes) <= {202, 503}, [r.text for r in first][:2]
    assert 202 in codes

    await stack.temporal.kill()
    down_at = time.monotonic()

    # While it is down: new payments get 503 + Retry-After; accepted ones stay readable.
    late_key = str(uuid.uuid4())
    refused = await faults.pay(late_key)
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"].isdigit()
    assert refused.headers["content-type"].startswith("application/problem+json")
    read = await faults.http.get(
        f"/v1/payments/{ids[0]}", headers={"Authorization": f"Bearer {faults.client.api_key}"}
    )
    assert read.status_code == 200, read.text
    # The charge and the ledger record run in one workflow task inside the worker (local
    # activities): a charge at the provider when Temporal died may reach the ledger while
    # Temporal is still down. Never a failure, and never another charge later (below).
    while_down = read.json()
    assert while_down["status"] in {"processing", "succeeded"}, while_down

    await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    await stack.temporal.start()
    await faults.provider.clear_faults()

    accepted = await asyncio.gather(*(faults.pay_until_accepted(k) for k in [*keys, late_key]))
    assert accepted[:-1] == ids
    ids.append(accepted[-1])
    settled = await assert_settled(faults, ids, within=180)
    assert set(settled.values()) == {"succeeded"}
    # Temporal never heard of that workflow task: the worker ran it again after the
    # restart (charge included), and the provider's idempotency key gave the same charge.
    after = await faults.http.get(
        f"/v1/payments/{ids[0]}", headers={"Authorization": f"Bearer {faults.client.api_key}"}
    )
    if while_down["status"] == "succeeded":
        assert after.json()["provider_charge_id"] == while_down["provider_charge_id"]


async def test_postgres_down_30s_while_recording_completes_with_nothing_partial(
    faults: FaultStack,
) -> None:
    stack = faults.stack
    await faults.provider.set_faults(latency_ms=3000)
    keys = [str(uuid.uuid4()) for _ in range(IN_FLIGHT)]
    ids = [payment_id_for(faults.client.client_id, key) for key in keys]
    # Clients keep retrying with their key until the API accepts (it answers 503 while
    # PostgreSQL is down).
    accepting = [asyncio.create_task(faults.pay_until_accepted(key, within=180)) for key in keys]
    await wait_until(lambda: _requested_all(faults, ids), within=30)

    await stack.postgres.stop(mode="immediate")
    # The provider answers while the ledger is down: every outcome must be recorded later.
    charged = await wait_until(lambda: _charged_all(faults, ids), within=20, interval=0.2)
    assert charged
    await asyncio.sleep(30)
    async with httpx.AsyncClient(timeout=10) as http:
        health = await http.get(f"{stack.api_url}/healthz")
    assert health.status_code == 200  # the API stays up, answering what it can
    await stack.postgres.start()

    assert sorted(await asyncio.gather(*accepting)) == sorted(ids)
    settled = await assert_settled(faults, ids, within=180)
    assert set(settled.values()) == {"succeeded"}


async def _charged_all(fs: FaultStack, ids: list[str]) -> bool:
    charged = (await fs.provider.stats())["charges_by_key"]
    return all(charged.get(i) == 1 for i in ids)
