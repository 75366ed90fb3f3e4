"""Polling for a condition that another thread or process brings about."""

from __future__ import annotations

import time
from collections.abc import Callable

PAUSE_S = 0.02


def wait_for(condition: Callable[[], object], within_s: float = 300) -> None:
    """Poll until `condition()` holds; the bound only stops a broken test from hanging."""
    give_up = time.monotonic() + within_s
    while time.monotonic() < give_up:
        if condition():
            return
        time.sleep(PAUSE_S)
    raise AssertionError(f"condition never became true within {within_s} s")
