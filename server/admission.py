"""The bounded admission queue: one FIFO per adapter, served round robin.

Fairness bound. Keys (adapter ids; "" is the base model) are kept in a rotation; a key that
gets a request admitted moves to the back, and a key whose queue becomes non-empty joins at
the back. So between a request reaching the head of its adapter's queue and its admission,
at most Q-1 requests of other adapters are admitted (Q = adapters with waiting requests),
however many requests the other adapters have queued.

A head that does not fit (its adapter would exceed the distinct-adapter cap, or its prompt
exceeds the token budget left) is skipped, not blocking the others. After `max_skips` steps
of being skipped it becomes urgent: nothing queued behind it is admitted until it fits, so
running sequences drain and it is admitted at most `max_skips` steps plus the longest
remaining generation of the running sequences after reaching the head.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from loraplex.server.errors import Overloaded


class Queued(Protocol):
    @property
    def adapter_key(self) -> str: ...

    @property
    def slot_key(self) -> str:
        """What occupies an engine adapter slot: adapter id and version ("" for the base)."""
        ...

    @property
    def prompt_tokens(self) -> int: ...


ItemT = TypeVar("ItemT", bound=Queued)


@dataclass
class StepBudget:
    """Room left in the step being planned."""

    free_sequences: int
    free_tokens: int
    max_adapters: int
    adapters: Counter[str] = field(default_factory=Counter)  # slot key -> sequences in step
    empty: bool = True  # nothing else (decode or prefill) runs in this step yet

    def fits(self, item: Queued) -> bool:
        if self.free_sequences <= 0:
            return False
        key = item.slot_key
        distinct = sum(1 for k, n in self.adapters.items() if k and n > 0)
        if key and self.adapters[key] == 0 and distinct >= self.max_adapters:
            return False
        # A prompt longer than the whole budget can still run, alone in its step.
        return item.prompt_tokens <= self.free_tokens or self.empty

    def take(self, item: Queued) -> None:
        self.free_sequences -= 1
        self.free_tokens -= item.prompt_tokens
        self.adapters[item.slot_key] += 1
        self.empty = False


class AdmissionQueue(Generic[ItemT]):
    """Bounded queue of waiting requests; not thread-safe (the scheduler holds its lock)."""

    def __init__(self, capacity: int, max_skips: int = 8) -> None:
        self.capacity = capacity
        self.max_skips = max_skips
        self._queues: OrderedDict[str, deque[ItemT]] = OrderedDict()  # order = rotation
        self._skips: dict[int, int] = {}  # id(head item) -> steps it was skipped
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[ItemT]:
        for queue in self._queues.values():
            yield from queue

    def push(self, item: ItemT) -> None:
        if self._size >= self.capacity:
            raise Overloaded(
                f"the admission queue is full ({self.capacity} requests waiting); retry later"
            )
        self._queues.setdefault(item.adapter_key, deque()).append(item)
        self._size += 1

    def push_back_to_head(self, item: ItemT) -> None:
        """Return a selected item that could not start; it was admitted, so no capacity
        check."""
        self._queues.setdefault(item.adapter_key, deque()).appendleft(item)
        self._size += 1

    def remove(self, item: ItemT) -> bool:
        queue = self._queues.get(item.adapter_key)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        self._size -= 1
        self._skips.pop(id(item), None)
        if not queue:
            del self._queues[item.adapter_key]
        return True

    def select(self, budget: StepBudget) -> list[ItemT]:
        """Pop the requests to prefill this step, in round-robin order over adapters."""
        chosen: list[ItemT] = []
        skipped: set[str] = set()
        while budget.free_sequences > 0:
            key = next((k for k in self._queues if k not in skipped), None)
            if key is None:
                break
            head = self._queues[key][0]
            if budget.fits(head):
                chosen.append(self._pop(key))
                budget.take(head)
                skipped.discard(key)
                continue
            skipped.add(key)
            if self._skip(head) >= self.max_skips:
                break  # urgent: let capacity drain towards it
        return chosen

    def _skip(self, head: ItemT) -> int:
        count = self._skips.get(id(head), 0) + 1
        self._skips[id(head)] = count
        return count

    def _pop(self, key: str) -> ItemT:
        queue = self._queues.pop(key)  # rotation: the served key goes to the back
        item = queue.popleft()
        self._skips.pop(id(item), None)
        self._size -= 1
        if queue:
            self._queues[key] = queue
        return item
