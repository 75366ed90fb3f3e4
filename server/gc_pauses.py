"""Keep Python's cyclic garbage collector from pausing a latency-sensitive process.

The collector's oldest generation walks every tracked object the process holds. Importing
torch, transformers and PEFT alone makes about 445,000; a server with the real model loaded
holds 500,000, and so does a benchmark client that wrote its adapters with PEFT, so one
full collection is long enough to show in a request's latency. It comes whenever enough
objects have survived since the last one, so it lands on a random request's first token.
`gc.freeze()` moves the objects alive at that point out of the collector's sight, and a full
collection then walks only what was made later (figures: docs/measurements.md). Objects
made later are collected as before.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_objects() -> int:
    """Collect the garbage of start-up, then exempt everything still alive from later
    collections; returns how many objects are now exempt."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen_startup_objects() -> Iterator[int]:
    """`freeze_startup_objects` for the block only: what it froze is collectable again after."""
    try:
        yield freeze_startup_objects()
    finally:
        gc.unfreeze()
