"""What a service process does to the cyclic garbage collector before it serves."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tickmesh.runtime.lifecycle import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_collects_the_young_generation_less_often_and_keeps_the_others() -> None:
    _, middle, oldest = gc.get_threshold()
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, oldest)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_leaves_what_was_loaded_out_of_every_collection() -> None:
    gc.unfreeze()

    class Loaded:
        pass

    loaded = Loaded()
    tune_gc()
    assert gc.get_freeze_count() > 0
    # Frozen objects are in no generation: a full collection does not visit them.
    assert not any(o is loaded for o in gc.get_objects())
