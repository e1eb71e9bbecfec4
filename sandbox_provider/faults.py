"""Faults on demand, for POST /v1/charges and POST /v1/refunds.

``*_next`` fields are counters that each faulted request decrements; ``*_rate``
fields are drawn from a seedable ``random.Random`` so a benchmark can replay a run.
"""

from __future__ import annotations

import asyncio
import random
from enum import StrEnum

import structlog
from pydantic import BaseModel, ConfigDict, Field

log = structlog.get_logger(__name__)


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_ms: int = Field(default=0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    fail_next: int = Field(default=0, ge=0)
    timeout_after_charge_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_after_charge_next: int = Field(default=0, ge=0)
    hang_seconds: float = Field(default=30.0, ge=0)
    malformed_after_charge_next: int = Field(default=0, ge=0)
    malformed_after_charge_rate: float = Field(default=0.0, ge=0, le=1)


class AfterCommit(StrEnum):
    """What becomes of the answer once the effect is committed."""

    ANSWER = "answer"
    HANG = "hang"
    MALFORMED = "malformed"


class FaultInjector:
    def __init__(self, rng: random.Random) -> None:
        self.config = Faults()
        self._rng = rng

    def reset(self) -> None:
        self.config = Faults()

    async def delay(self) -> None:
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)

    def fail_before(self, endpoint: str) -> bool:
        """True when this request must answer 500 without doing anything."""
        failed = self._draw("fail_next", self.config.error_rate)
        if failed:
            log.info("sandbox.fault_injected", fault="error", endpoint=endpoint)
        return failed

    def after_commit(self, endpoint: str) -> AfterCommit:
        # A hang wins over a malformed body: the client never sees the body anyway, and
        # the malformed counter is then kept for a request that can show it.
        if self._draw("timeout_after_charge_next", self.config.timeout_after_charge_rate):
            outcome = AfterCommit.HANG
        elif self._draw("malformed_after_charge_next", self.config.malformed_after_charge_rate):
            outcome = AfterCommit.MALFORMED
        else:
            return AfterCommit.ANSWER
        log.info("sandbox.fault_injected", fault=str(outcome), endpoint=endpoint)
        return outcome

    async def hang(self) -> None:
        await asyncio.sleep(self.config.hang_seconds)

    def _draw(self, counter: str, rate: float) -> bool:
        remaining: int = getattr(self.config, counter)
        if remaining > 0:
            self.config = self.config.model_copy(update={counter: remaining - 1})
            return True
        return rate > 0 and self._rng.random() < rate
