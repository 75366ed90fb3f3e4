"""Start-up objects leave the garbage collector's sight; start-up garbage is collected first."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from loraplex.server.gc_pauses import freeze_startup_objects, frozen_startup_objects


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_freezing_exempts_live_objects_and_collects_start_up_garbage_first() -> None:
    live = Node()
    garbage = weakref.ref(Node())
    assert garbage() is not None and tracked(live)
    frozen = freeze_startup_objects()
    assert garbage() is None  # collected, not frozen forever
    assert frozen == gc.get_freeze_count() > 0
    assert not tracked(live)
    later = Node()
    assert tracked(later)  # objects made after the freeze are collected as usual
    made_later = weakref.ref(Node())
    gc.collect()
    assert made_later() is None


def test_the_block_form_puts_frozen_objects_back_in_sight() -> None:
    live = Node()
    with frozen_startup_objects() as frozen:
        assert frozen > 0 and not tracked(live)
    assert gc.get_freeze_count() == 0 and tracked(live)
