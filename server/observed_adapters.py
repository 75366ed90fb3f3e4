"""An AdapterAdmin wrapper that reports adapter load times and evictions to the metrics.

The store keeps adapters resident in LRU order and evicts only to make room for a load, so
the adapters that stop being resident across a load, other than the one loaded, were evicted.

It also holds the contract's promise that unreadable adapter files raise InvalidAdapter:
an OSError escaping the store while it reads an adapter becomes one, naming the file.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from loraplex.adapters.errors import InvalidAdapter
from loraplex.server.engine.api import AdapterAdmin, AdapterInfo, AdapterRef
from loraplex.server.metrics import Metrics


@contextlib.contextmanager
def _unreadable_files(adapter_id: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        name = err.filename or "its files"
        raise InvalidAdapter(adapter_id, f"cannot read {name}: {err.strerror or err}") from err


class ObservedAdapters:
    """Passes every call through to `inner`; loads (explicit or lazy) are timed and diffed."""

    def __init__(self, inner: AdapterAdmin, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._loading = threading.Lock()  # one observed load at a time keeps the diff exact
        self._resident = self._resident_now()

    def _resident_now(self) -> set[str]:
        return {a.adapter_id for a in self.inner.list() if a.resident}

    def list(self) -> list[AdapterInfo]:
        return self.inner.list()

    def load(self, adapter_id: str) -> AdapterInfo:
        with self._loading:
            before = self._resident_now()
            started = time.perf_counter()
            with _unreadable_files(adapter_id):
                info = self.inner.load(adapter_id)
            self._observe(adapter_id, before, time.perf_counter() - started)
            return info

    def acquire(self, adapter_id: str, scale: float = 1.0) -> AdapterRef:
        if adapter_id in self._resident:
            with _unreadable_files(adapter_id):
                return self.inner.acquire(adapter_id, scale)
        with self._loading:
            before = self._resident_now()
            started = time.perf_counter()
            with _unreadable_files(adapter_id):
                ref = self.inner.acquire(adapter_id, scale)
            if adapter_id not in before:
                self._observe(adapter_id, before, time.perf_counter() - started)
            return ref

    def _observe(self, adapter_id: str, before: set[str], seconds: float) -> None:
        self._resident = self._resident_now()
        self.metrics.adapter_load_time.observe(seconds)
        evicted = before - self._resident - {adapter_id}
        if evicted:
            self.metrics.adapter_evictions.inc(len(evicted))

    def unload(self, adapter_id: str, wait: bool = True, timeout: float | None = None) -> None:
        self.inner.unload(adapter_id, wait, timeout)
        self._resident.discard(adapter_id)

    def pin(self, adapter_id: str, pinned: bool = True) -> AdapterInfo:
        info = self.inner.pin(adapter_id, pinned)
        self._resident = self._resident_now()  # pinning loads the adapter if needed
        return info

    def release(self, ref: AdapterRef) -> None:
        self.inner.release(ref)
