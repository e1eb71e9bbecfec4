"""Per-client rate limit: one token bucket per client, in each API process.

A client may burst up to ``burst`` requests, then ``rate`` per second. Buckets are
per process (N API processes allow N times the rate) and per client, so one client
at its limit never slows another. Headers follow the IETF draft *RateLimit header
fields for HTTP* (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy``
announces the sustained quota (``q`` requests per ``w`` seconds), ``RateLimit``
the remaining requests ``r`` and ``t``, the seconds until the bucket is full again
(or, when empty, until the next request is allowed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

POLICY_NAME = "default"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    remaining: int
    # Seconds until the next request would be allowed (0 when allowed now).
    retry_after: int
    # Seconds until the bucket is full again.
    reset: int


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_second
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client_id: str) -> RateDecision:
        """Spend one token of ``client_id``'s bucket if it has one. No await: atomic."""
        now = self._clock()
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        retry_after = 0 if allowed else max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
        reset = math.ceil((self.burst - bucket.tokens) / self.rate)
        return RateDecision(
            allowed=allowed,
            remaining=int(bucket.tokens),
            retry_after=retry_after,
            reset=retry_after if not allowed else reset,
        )

    def policy_header(self) -> str:
        # The sustained quota as q requests per w seconds (w >= 1, integers).
        window = max(1, math.ceil(1 / self.rate))
        return f'"{POLICY_NAME}";q={max(1, round(self.rate * window))};w={window}'

    def headers(self, decision: RateDecision) -> dict[str, str]:
        return {
            "RateLimit-Policy": self.policy_header(),
            "RateLimit": f'"{POLICY_NAME}";r={decision.remaining};t={decision.reset}',
        }
