"""pipeline.runtime helpers that every component runs."""

import gc
import weakref

from pipeline.runtime import settle_heap


class _Node:
    pass


def test_settle_heap_collects_garbage_then_freezes_what_lives():
    cycle = _Node()
    cycle.self = cycle  # garbage only the cyclic collector can free
    dead = weakref.ref(cycle)
    live = _Node()
    del cycle
    try:
        settle_heap()
        assert dead() is None  # collected, not frozen for good
        assert gc.get_freeze_count() > 0
        assert not any(o is live for o in gc.get_objects())  # out of the collector's reach
    finally:
        gc.unfreeze()  # this test process goes on collecting as before
    assert any(o is live for o in gc.get_objects())
