"""What the load generators send: N requests over a set of unique keys, a share of
them duplicates, some sent while the first is in flight and some after its answer.

Pure and deterministic for a seed, so the smoke test can check its arithmetic.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    FIRST = "first"
    DUP_IN_FLIGHT = "dup_in_flight"  # queued right behind the first: sent while it runs
    DUP_AFTER = "dup_after"  # sent once the first request has its answer
    # ... and that answer was the outcome (201): the ledger alone answers it
    DUP_AFTER_FINISHED = "dup_after_finished"


@dataclass(frozen=True)
class Credentials:
    client_id: str
    api_key: str


@dataclass(frozen=True)
class KeyPlan:
    """One unique payment: its client, key and body, and the duplicates it gets."""

    index: int
    client: int  # index into the credentials list
    key: str
    body: bytes
    in_flight_dups: int = 0
    after_dups: int = 0


@dataclass(frozen=True)
class Plan:
    keys: list[KeyPlan] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(1 + k.in_flight_dups + k.after_dups for k in self.keys)

    @property
    def duplicates(self) -> int:
        return sum(k.in_flight_dups + k.after_dups for k in self.keys)

    def shard(self, count: int) -> list[Plan]:
        """Split by key over ``count`` generator processes; a key's duplicates go with it."""
        return [Plan(self.keys[i::count]) for i in range(count)]


DECLINE_METHOD = "pm_card_chargeDeclined"
SUCCESS_METHODS = ("pm_card_visa", "pm_card_mastercard")


def build_plan(
    requests: int,
    *,
    duplicate_share: float,
    clients: int,
    decline_share: float = 0.05,
    seed: int = 1,
    run_id: str | None = None,
) -> Plan:
    """``requests`` in total, ``round(requests * duplicate_share)`` of them duplicates,
    spread round-robin over the unique keys and alternating in-flight / after."""
    if not 0 <= duplicate_share < 1:
        raise ValueError("duplicate share must be in [0, 1)")
    if requests < 1 or clients < 1:
        raise ValueError("need at least one request and one client")
    rng = random.Random(seed)  # noqa: S311 - load shape, not secrets
    run = run_id or uuid.uuid4().hex[:8]
    duplicates = round(requests * duplicate_share)
    unique = requests - duplicates
    in_flight = [0] * unique
    after = [0] * unique
    for d in range(duplicates):
        target = d % unique
        if d % 2 == 0:
            in_flight[target] += 1
        else:
            after[target] += 1
    keys: list[KeyPlan] = []
    for i in range(unique):
        method = DECLINE_METHOD if rng.random() < decline_share else rng.choice(SUCCESS_METHODS)
        body = json.dumps(
            {
                "amount": rng.randint(100, 50_000),
                "currency": "EUR",
                "payment_method": method,
                "description": f"bench {run} #{i}",
            },
            separators=(",", ":"),
        ).encode()
        keys.append(
            KeyPlan(
                index=i,
                client=i % clients,
                key=f"bench-{run}-{i:06d}",
                body=body,
                in_flight_dups=in_flight[i],
                after_dups=after[i],
            )
        )
    return Plan(keys)
