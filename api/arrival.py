"""When a request arrived. A request may wait in the admission line before the layers
that time it see it (api/admission.py parks new payments ahead of them, so a herd's
parking costs no more than it must); they time it from its arrival all the same, so
the access line's ``duration_ms`` and the duration histogram hold what the client
waited."""

from __future__ import annotations

import time

from starlette.types import Scope

_ARRIVED_AT = "arrived_at"


def note_arrival(scope: Scope) -> None:
    """Called by the outermost layer that holds a request."""
    scope.setdefault("state", {})[_ARRIVED_AT] = time.perf_counter()


def arrived_at(scope: Scope) -> float:
    """The request's arrival (``time.perf_counter``): as noted, or now if it was not."""
    noted = scope.get("state", {}).get(_ARRIVED_AT)
    return float(noted) if noted is not None else time.perf_counter()
