"""``Prefer: wait=N`` (RFC 7240 §4.3): how long a client is willing to wait for the outcome."""

from __future__ import annotations

import math

# Below this the start of the payment itself might not reach Temporal in time.
MIN_WAIT_SECONDS = 1


def requested_wait(prefer: str | None) -> int | None:
    """The ``wait`` preference in seconds, or None if absent or not a delta-seconds.

    RFC 7240: preferences a server does not understand are ignored, and of a
    preference given twice only the first counts.
    """
    if not prefer:
        return None
    for preference in prefer.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not (value.isascii() and value.isdigit()):
            return None
        return int(value[-10:]) if len(value.lstrip("0")) <= 10 else 10**10
    return None


def applied_wait(requested: int | None, *, default: float, cap: float) -> float:
    """The wait the API applies: the default without a preference, else the request
    bounded to ``[MIN_WAIT_SECONDS, cap]``."""
    if requested is None:
        return default
    return float(max(MIN_WAIT_SECONDS, min(requested, math.floor(cap))))
