"""Engine steps and side work (adapter loads) take turns on the CPU instead of overlapping.

A CPU forward pass runs on every core through torch's intra-op threads. Another thread that
computes meanwhile (reading and validating an adapter, converting one for llama.cpp) takes a
core from that pass, which then waits for its slowest thread at every op. `loraplex bench
turns` (2 cores, 8 rows decoding, a cold rank-16 all-linear LoRA loaded every 0.25 s):
overlapping, the median step took 1.11x as long as with no loads, the slowest 1073 against
743 ms, and each load 85 ms; taking turns, steps took 1.00x, the slowest 694 ms, and loads
waited for the step in progress (316 ms at the median, under one step). A request cannot
join a step before the one after its load anyway. The scheduler submits inside
`keep_side_turn()` and plans each step inside its turn, so a request whose load went first
is queued before that step plans, and joins it.

Side work that arrives during a step waits for its end; the next step waits until every
side job that was waiting has finished. On an accelerator the two do not compete, so the
server only takes turns when the engine runs on the CPU.

Side work also runs on one torch thread. A thread that runs a multi-threaded torch op keeps
an OpenMP pool while it lives, and once the pools hold more threads than there are cores,
libgomp stops spinning between parallel regions and every region of the engine's forward
pays a wake-up (on 2 cores, a multiply of 60x640 floats took 6 us with one such thread, 70
with a second one alive).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, runtime_checkable

from loraplex.server.device import torch_threads


@runtime_checkable
class RunsSideWork(Protocol):
    """Something whose CPU-heavy work runs inside `side_work()` (the adapter store)."""

    side_work: Callable[[], AbstractContextManager[object]]


class _KeptTurn(threading.local):
    """Per thread: inside `keep_side_turn` (keeping), and holding a side turn kept past its
    side work (holding)."""

    keeping = False
    holding = False


class CpuTurns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._stepping = False
        self._engine_waiting = False
        self._steps = 0  # steps finished
        self._side_now = 0  # side jobs that go before the next step: running or waking
        self._side_next = 0  # side jobs that wait for the step in progress or about to start
        self._thread = _KeptTurn()

    @contextmanager
    def step(self) -> Iterator[None]:
        """Around an engine step: waits for the side jobs whose turn it is."""
        with self._changed:
            self._engine_waiting = True
            self._changed.wait_for(lambda: self._side_now == 0)
            self._engine_waiting, self._stepping = False, True
        try:
            yield
        finally:
            with self._changed:
                self._stepping = False
                self._steps += 1
                self._side_now, self._side_next = self._side_now + self._side_next, 0
                self._changed.notify_all()

    @contextmanager
    def side_work(self) -> Iterator[None]:
        """Around CPU-heavy work off the engine thread. It starts at once when the engine is
        idle, else after the step in progress (or about to start) ends, so a stream of side
        jobs never keeps the engine from stepping."""
        if not self._thread.holding:  # else it goes on with its kept turn
            self._take_side_turn()
        finished = False
        try:
            with torch_threads(1):  # see the module's doc
                yield
            finished = True
        finally:
            self._thread.holding = finished and self._thread.keeping
            if not self._thread.holding:
                self._end_side_turn()

    @contextmanager
    def keep_side_turn(self) -> Iterator[None]:
        """Side work that this thread finishes inside the block keeps its turn until the block
        ends, so what the thread does with the result (queueing a request for the adapter it
        just loaded) happens before the next step plans. Side work that fails ends its turn at
        once: the caller may go on to wait for something only steps can bring about."""
        self._thread.keeping = True
        try:
            yield
        finally:
            self._thread.keeping = False
            if self._thread.holding:
                self._thread.holding = False
                self._end_side_turn()

    def _take_side_turn(self) -> None:
        with self._changed:
            if self._stepping or self._engine_waiting:
                ticket = self._steps
                self._side_next += 1
                self._changed.wait_for(lambda: self._steps > ticket)  # counted in _side_now
            else:
                self._side_now += 1

    def _end_side_turn(self) -> None:
        with self._changed:
            self._side_now -= 1
            self._changed.notify_all()
