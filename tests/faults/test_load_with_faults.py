"""Fault test 12: 1,000 requests (30 % duplicates of the others) while the provider fails
20 % of its calls and the worker is SIGKILLed twice; audit clean at the end.

Concurrency is bounded (as a client pool would be) so that it finishes in a few minutes
on two cores; the wall time is printed, not asserted (a benchmark's business).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter

import pytest

from domain.payments import payment_id_for
from tests.faults.stack import DECLINED, VISA, FaultStack, assert_settled, body

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REQUESTS = 1000
DUPLICATE_SHARE = 0.3
DECLINED_SHARE = 0.1
PROVIDER_ERROR_RATE = 0.2
CONCURRENCY = 40
KILL_AFTER = (300, 650)  # requests answered before each SIGKILL


async def test_load_with_duplicates_provider_failures_and_two_worker_kills(
    faults: FaultStack,
) -> None:
    rng = random.Random(12)
    unique = int(REQUESTS * (1 - DUPLICATE_SHARE))
    methods = {str(uuid.uuid4()): DECLINED if rng.random() < DECLINED_SHARE else VISA
               for _ in range(unique)}  # fmt: skip
    keys = list(methods)
    requests = keys + [rng.choice(keys) for _ in range(REQUESTS - unique)]
    rng.shuffle(requests)
    expected_ids = {key: payment_id_for(faults.client.client_id, key) for key in keys}

    await faults.provider.set_faults(error_rate=PROVIDER_ERROR_RATE)
    requests_before = sum((await faults.provider.stats())["charge_requests_by_key"].values())
    started = time.monotonic()
    answered = 0
    kills: list[float] = []
    kill_now = asyncio.Event()
    limit = asyncio.Semaphore(CONCURRENCY)

    async def send(key: str) -> str:
        nonlocal answered
        async with limit:
            payment_id = await faults.pay_until_accepted(key, body(payment_method=methods[key]))
        answered += 1
        if answered in KILL_AFTER:
            kill_now.set()
        return payment_id

    async def killer() -> None:
        for _ in KILL_AFTER:
            await kill_now.wait()
            kill_now.clear()
            kills.append(time.monotonic() - started)
            await faults.stack.worker.kill()
            await faults.stack.start_worker()

    killing = asyncio.create_task(killer())
    got = await asyncio.gather(*(send(key) for key in requests))
    accepted_in = time.monotonic() - started
    await killing
    assert len(kills) == 2

    # A duplicate is the same payment as its original.
    assert [expected_ids[key] for key in requests] == got
    settled = await assert_settled(faults, expected_ids.values(), within=300)
    total = time.monotonic() - started

    by_method = Counter((methods[key], settled[expected_ids[key]]) for key in keys)
    assert by_method == Counter(
        {(VISA, "succeeded"): sum(m == VISA for m in methods.values()),
         (DECLINED, "failed"): sum(m == DECLINED for m in methods.values())}
    )  # fmt: skip
    stats = await faults.provider.stats()
    charge_requests = sum(stats["charge_requests_by_key"].values()) - requests_before
    # The provider's failures really happened, and were retried.
    assert charge_requests > unique * 1.1, charge_requests
    print(
        f"\n[load: {REQUESTS} requests, {unique} payments, accepted in {accepted_in:.0f} s, "
        f"all settled and audited in {total:.0f} s; worker killed at "
        f"{', '.join(f'{k:.0f} s' for k in kills)}; {charge_requests} charge requests]"
    )
