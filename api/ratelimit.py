"""Per-client rate limit: one token bucket per client, in each API process.

A client may burst up to ``burst`` requests, then ``rate`` per second. Buckets are
per process (N API processes allow N times the rate) and per client, so one client
at its limit never slows another. Headers follow the IETF draft *RateLimit header
fields for HTTP* (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy``
announces the sustained quota (``q`` requests per ``w`` seconds), ``RateLimit``
the remaining requests ``r`` and ``t``, the seconds until the bucket is full again
(or, when empty, until the next request is allowed).

A refused request is told when to come back (``Retry-After``), and each refused
request of a client is given its own slot: the n-th refusal in a row waits for the
n-th token, not for the first. With one answer for all ("1 s"), clients that honour
it come back together, and all but one second's worth of them are refused again,
while every other answer the API gives waits behind the herd.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

POLICY_NAME = "default"
# Refused requests are spread over at most this long; a client that keeps sending
# while refused is not pushed further out than this.
MAX_RETRY_AFTER_SECONDS = 60


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
    # The last time a refused request was told to come back (monotonic seconds).
    last_slot: float = -math.inf


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
        self._policy: str | None = None

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
            retry_after = 0
        else:
            retry_after = self._slot(bucket, now)
        reset = math.ceil((self.burst - bucket.tokens) / self.rate)
        return RateDecision(
            allowed=allowed,
            remaining=int(bucket.tokens),
            retry_after=retry_after,
            reset=retry_after if not allowed else reset,
        )

    def _slot(self, bucket: _Bucket, now: float) -> int:
        """Seconds until this refused request's own token: one token after the slot
        given to the refusal before it, and no sooner than the next token."""
        next_token = now + (1.0 - bucket.tokens) / self.rate
        slot = min(
            max(next_token, bucket.last_slot + 1.0 / self.rate), now + MAX_RETRY_AFTER_SECONDS
        )
        bucket.last_slot = slot
        return max(1, math.ceil(slot - now))

    def policy_header(self) -> str:
        # The sustained quota as q requests per w seconds (w >= 1, integers).
        window = max(1, math.ceil(1 / self.rate))
        return f'"{POLICY_NAME}";q={max(1, round(self.rate * window))};w={window}'

    def headers(self, decision: RateDecision) -> dict[str, str]:
        if self._policy is None:  # the same on every answer: built once
            self._policy = self.policy_header()
        return {
            "RateLimit-Policy": self._policy,
            "RateLimit": f'"{POLICY_NAME}";r={decision.remaining};t={decision.reset}',
        }
