"""The garbage collector's settings for our long-running processes (API and worker).

In the storm benchmark with CPython's defaults the API ran a full collection every
≈ 7 s, each stopping its event loop for 140-570 ms: every request in flight, a
repeat's included, waited that long. Most of what a full collection walks was never
garbage: the modules, classes and app built at start-up. Frozen, they are left out
of every later collection. The API also runs full collections ten times less often:
its garbage is short-lived request state that the younger generations free.
docs/scaling.md ("The garbage collector round") has the figures.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_PAUSE = Histogram(
    "payments_gc_pause_seconds",
    "How long each garbage collection of this process took (wall clock), by "
    "generation. Nothing else in the process runs meanwhile: not an API's event loop, "
    "not a worker's activations.",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

# CPython's defaults: a young collection every 700 net allocations, the middle
# generation every 10 young ones, a full collection every 10 middle ones (and only
# once a quarter more objects have survived since the last).
YOUNG_THRESHOLD, MIDDLE_THRESHOLD, DEFAULT_FULL_THRESHOLD = gc.get_threshold()

_started: dict[int, float] = {}


def _time_collection(phase: str, info: dict[str, Any]) -> None:
    generation = int(info["generation"])
    if phase == "start":
        _started[generation] = time.perf_counter()
    elif (began := _started.pop(generation, None)) is not None:
        GC_PAUSE.labels(str(generation)).observe(time.perf_counter() - began)


def tune_garbage_collector(*, full_collection_every: int = DEFAULT_FULL_THRESHOLD) -> None:
    """Call once start-up is done (app built, clients and pools open).

    ``full_collection_every``: middle-generation collections between two full ones.
    The worker keeps the default: the workflow sandbox's per-run modules are cyclic
    garbage that only the older generations' collections free; with every collection
    spaced out (a young generation of 50,000) its memory in the storm rose to 273 MB,
    against 188.
    """
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)
    gc.collect()  # start-up's own garbage, before the survivors are frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, full_collection_every)
