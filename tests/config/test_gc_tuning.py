"""What the API and the worker do to the garbage collector once started."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from config.gc_tuning import DEFAULT_FULL_THRESHOLD, tune_garbage_collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds, callbacks, enabled = gc.get_threshold(), list(gc.callbacks), gc.isenabled()
    yield
    if enabled:
        gc.enable()
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks


def _pauses(generation: str) -> float:
    value = REGISTRY.get_sample_value("payments_gc_pause_seconds_count", {"generation": generation})
    return value or 0.0


def test_start_up_objects_are_frozen_and_full_collections_spaced_out(
    restored_collector: None,
) -> None:
    tune_garbage_collector(full_collection_every=100)
    # This process's modules, classes and functions, as the app's would be.
    assert gc.get_freeze_count() > 1000
    assert gc.get_threshold()[2] == 100
    assert gc.get_threshold()[:2] == (700, 10)


def test_the_worker_keeps_the_default_full_collections(restored_collector: None) -> None:
    tune_garbage_collector()
    assert gc.get_threshold()[2] == DEFAULT_FULL_THRESHOLD


def test_every_collection_is_timed_by_generation(restored_collector: None) -> None:
    tune_garbage_collector()
    tune_garbage_collector()  # twice: still one callback, each collection timed once
    gc.disable()  # only the two collections below (explicit ones still run)
    before_full, before_young = _pauses("2"), _pauses("0")
    gc.collect()
    gc.collect(0)
    assert _pauses("2") == before_full + 1
    assert _pauses("0") == before_young + 1
