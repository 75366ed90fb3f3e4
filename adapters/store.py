"""The adapter store: adapter roots, lazy loading, versions, pins and LRU residency limits.

Thread-safe: the gRPC threads call list/load/unload/pin/acquire/release while the engine thread
calls `get`. A version handed out by `acquire` stays alive until its last `release`, whatever
loads, unloads or evictions happen meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from loraplex.adapters.errors import (
    AdapterCapacityExceeded,
    AdapterError,
    AdapterInUse,
    AdapterNotFound,
    AdapterPinned,
    InvalidAdapter,
)
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE
from loraplex.adapters.paths import resolve_adapter_dir, scan_adapter_ids
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, BaseSpec, read_adapter
from loraplex.adapters.types import AdapterInfo, AdapterRef, StoreEvents
from loraplex.adapters.weights import AdapterWeights, LoadedAdapter, tensors_nbytes

RESIDENCY_WAIT_S = 30.0
T = TypeVar("T")

Key = tuple[str, int]  # (adapter id, version)
AdapterReader = Callable[[str, Path, BaseSpec], AdapterWeights]  # (id, directory, base)
Fingerprint = tuple[tuple[str, float, int], ...]
SideWork = Callable[[], contextlib.AbstractContextManager[object]]


class _Unheard:
    def adapter_loaded(self, adapter_id: str, seconds: float) -> None:
        pass

    def adapter_evicted(self, adapter_id: str) -> None:
        pass


@contextlib.contextmanager
def _unreadable_files(adapter_id: str) -> Iterator[None]:
    """An OSError while reading an adapter is the adapter's fault: InvalidAdapter, naming
    the file, as the AdapterAdmin contract promises."""
    try:
        yield
    except OSError as err:
        name = err.filename or "its files"
        raise InvalidAdapter(adapter_id, f"cannot read {name}: {err.strerror or err}") from err


@dataclass
class _Held:
    adapter: LoadedAdapter
    count: int = 0


def _fingerprint(path: Path) -> Fingerprint:
    """Changes whenever an adapter file is written, added or removed."""
    stats = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, GGUF_LORA_FILE):
        try:
            stat = (path / name).stat()
        except FileNotFoundError:
            continue  # a missing file is the reader's to report
        stats.append((name, stat.st_mtime, stat.st_size))
    return tuple(stats)


class AdapterStore:
    """Implements AdapterAdmin (loraplex.server.engine.api) over PEFT adapter directories."""

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        max_resident: int = 64,
        max_resident_bytes: int = 4 << 30,
        base: BaseSpec | None = None,
        prepare: Callable[[LoadedAdapter], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        residency_wait_s: float = RESIDENCY_WAIT_S,
        read: AdapterReader = read_adapter,
        side_work: SideWork = contextlib.nullcontext,
    ) -> None:
        """`prepare` runs on each new version before it is installed (for example, converting
        it for another backend); an error it raises refuses the load. `on_drop` hears of each
        id that is unloaded or evicted (versions in use still live until their release).
        `acquire` waits up to `residency_wait_s` for room when every resident adapter is in
        use. `read` parses and validates one adapter directory against the base. Loads
        (reading and preparing) run inside `side_work()`, which may wait for a turn on the
        CPU (loraplex.server.cpu_turns); settable later, as the server does. Waiting for room
        happens outside it, since room comes from sequences that need steps to finish.
        `events` hears of each load (with the seconds its reading and preparing took) and
        each eviction; settable later too."""
        if max_resident < 1 or max_resident_bytes < 1:
            raise ValueError("residency limits must be positive")
        self.roots = [Path(root) for root in roots]
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self._base = base
        self._read = read
        self._prepare = prepare
        self.side_work = side_work
        self.events: StoreEvents = _Unheard()
        self._on_drop = on_drop or (lambda _adapter_id: None)
        self.residency_wait_s = residency_wait_s
        self._releases = 0  # counts versions that stopped being in use, for waiting acquires
        self._lock = threading.Condition(threading.RLock())
        self._load_lock = threading.Lock()  # one disk load at a time; dedupes lazy loads
        self._current: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU order, oldest first
        self._fingerprints: dict[Key, Fingerprint] = {}
        self._held: dict[Key, _Held] = {}
        self._pinned: set[str] = set()
        self._last_version: dict[str, int] = {}

    def attach_base(self, base: BaseSpec) -> None:
        """Set the resident base that adapters are validated against (done by the engine)."""
        with self._lock:
            self._base = base

    # ---- AdapterAdmin -------------------------------------------------------------------

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            infos = {a.adapter_id: self._info(a) for a in self._current.values()}
        for adapter_id in scan_adapter_ids(self.roots):
            if adapter_id not in infos:
                infos[adapter_id] = self._disk_info(adapter_id)
        return [infos[k] for k in sorted(infos)]

    def load(self, adapter_id: str) -> AdapterInfo:
        """Load the files' current version (a no-op when unchanged); waits for room as
        `acquire` does."""

        def load_exclusively() -> LoadedAdapter:
            with self.side_work(), self._load_lock:
                return self._load_locked(adapter_id, reuse_unchanged=True)

        adapter = self._with_room(load_exclusively)
        with self._lock:
            return self._info(adapter)

    def unload(
        self, adapter_id: str, wait: bool = True, timeout: float | None = None, force: bool = False
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            known = adapter_id in self._current or self._in_use(adapter_id) > 0
            if not known:
                raise AdapterNotFound(adapter_id, "is not loaded")
            # A pin is an operator's promise that the adapter stays; only force overrides it.
            if adapter_id in self._pinned and not force:
                raise AdapterPinned(adapter_id)
            if self._in_use(adapter_id) and not wait:
                raise AdapterInUse(adapter_id, f"{self._in_use(adapter_id)} sequences use it")
            self._current.pop(adapter_id, None)
            self._pinned.discard(adapter_id)
            self._on_drop(adapter_id)
            while self._in_use(adapter_id):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AdapterInUse(adapter_id, "still in use when the unload timed out")
                self._lock.wait(left)

    def pin(self, adapter_id: str, pinned: bool = True) -> AdapterInfo:
        if pinned:
            self._ensure_loaded(adapter_id)
        with self._lock:
            adapter = self._current.get(adapter_id)
            if adapter is None:
                raise AdapterNotFound(adapter_id, "is not loaded")
            if pinned:
                self._pinned.add(adapter_id)
            else:
                self._pinned.discard(adapter_id)
            return self._info(adapter)

    def acquire(self, adapter_id: str, scale: float = 1.0) -> AdapterRef:
        """Hold the current version, loading it first if needed. When there is no room because
        every resident adapter is in use, wait for a release (backpressure) rather than fail,
        up to residency_wait_s; then AdapterCapacityExceeded."""
        while True:
            with self._lock:
                adapter = self._current.get(adapter_id)
                if adapter is not None:
                    self._current.move_to_end(adapter_id)
                    key = (adapter_id, adapter.version)
                    self._held.setdefault(key, _Held(adapter)).count += 1
                    return AdapterRef(adapter_id, adapter.version, scale)
            self._with_room(lambda: self._ensure_loaded(adapter_id))

    def _with_room(self, load: Callable[[], T]) -> T:
        """Run `load`, retrying after each release while it finds every resident adapter in
        use, until residency_wait_s has passed."""
        deadline = time.monotonic() + self.residency_wait_s
        while True:
            with self._lock:
                releases = self._releases
            try:
                return load()
            except AdapterCapacityExceeded:
                if not self._wait_for_release(releases, deadline):
                    raise

    def _wait_for_release(self, seen: int, deadline: float) -> bool:
        """True once some version was released after `seen`; False at the deadline, or at
        once when nothing is in use (pinned adapters alone fill the room: waiting is futile)."""
        with self._lock:
            if not self._held:
                return False
            timeout = max(0.0, deadline - time.monotonic())
            return self._lock.wait_for(lambda: self._releases != seen, timeout=timeout)

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            key = (ref.adapter_id, ref.version)
            held = self._held.get(key)
            if held is None:
                return  # releasing twice is harmless
            held.count -= 1
            if held.count <= 0:
                del self._held[key]
                self._releases += 1
                self._lock.notify_all()

    # ---- engine side --------------------------------------------------------------------

    def get(self, ref: AdapterRef) -> LoadedAdapter:
        """The exact version a sequence acquired; AdapterNotFound if it was never acquired."""
        with self._lock:
            held = self._held.get((ref.adapter_id, ref.version))
            if held is None:
                raise AdapterNotFound(
                    ref.adapter_id, f"version {ref.version} is not held by any sequence"
                )
            return held.adapter

    def resident_bytes(self) -> int:
        with self._lock:
            return self._bytes_locked()

    # ---- internals ----------------------------------------------------------------------

    def _ensure_loaded(self, adapter_id: str) -> None:
        # The turn comes before the lock, so loads that waited for one step all run before
        # the next, one after another, instead of one load per step.
        with self.side_work(), self._load_lock:
            with self._lock:
                if adapter_id in self._current:
                    return
            self._load_locked(adapter_id, reuse_unchanged=False)

    def _load_locked(self, adapter_id: str, reuse_unchanged: bool) -> LoadedAdapter:
        with _unreadable_files(adapter_id):
            return self._read_and_install(adapter_id, reuse_unchanged)

    def _read_and_install(self, adapter_id: str, reuse_unchanged: bool) -> LoadedAdapter:
        """Read from disk (outside the state lock) and install as the current version."""
        path = resolve_adapter_dir(adapter_id, self.roots)
        fingerprint = _fingerprint(path)
        with self._lock:
            current = self._current.get(adapter_id)
            base = self._base
        unchanged = current is not None and (
            self._fingerprints.get((adapter_id, current.version)) == fingerprint
        )
        if current is not None and unchanged and reuse_unchanged:
            return current
        if base is None:
            raise InvalidAdapter(adapter_id, "no base model is attached to the adapter store")
        started = time.perf_counter()
        weights = self._read(adapter_id, path, base)
        with self._lock:  # only loads bump versions, and they are serialized by _load_lock
            version = self._last_version.get(adapter_id, 0) + 1
        adapter = LoadedAdapter(adapter_id, version, str(path), weights, tensors_nbytes(weights))
        if self._prepare is not None:
            self._prepare(adapter)
        with self._lock:
            self._current.pop(adapter_id, None)
            self._make_room(adapter)
            self._last_version[adapter_id] = version
            self._current[adapter_id] = adapter
            self._fingerprints[(adapter_id, version)] = fingerprint
        self.events.adapter_loaded(adapter_id, time.perf_counter() - started)
        return adapter

    def _make_room(self, incoming: LoadedAdapter) -> None:
        """Evict least recently used idle, unpinned adapters until `incoming` fits."""

        def too_full() -> bool:
            over_count = len(self._current) + 1 > self.max_resident
            return over_count or self._bytes_locked() + incoming.nbytes > self.max_resident_bytes

        while too_full():
            victim = next(
                (
                    a
                    for a in self._current.values()
                    if a.adapter_id not in self._pinned
                    and (a.adapter_id, a.version) not in self._held
                ),
                None,
            )
            if victim is None:
                raise AdapterCapacityExceeded(
                    incoming.adapter_id,
                    f"residency limits ({self.max_resident} adapters, "
                    f"{self.max_resident_bytes} bytes) reached and every resident adapter "
                    "is pinned or in use",
                )
            del self._current[victim.adapter_id]
            self._on_drop(victim.adapter_id)
            self.events.adapter_evicted(victim.adapter_id)

    def _bytes_locked(self) -> int:
        alive = {(a.adapter_id, a.version): a for a in self._current.values()}
        alive.update({key: held.adapter for key, held in self._held.items()})
        return sum(a.nbytes for a in alive.values())

    def _in_use(self, adapter_id: str) -> int:
        return sum(h.count for (aid, _), h in self._held.items() if aid == adapter_id)

    def _info(self, adapter: LoadedAdapter) -> AdapterInfo:
        aid = adapter.adapter_id
        return AdapterInfo(
            adapter_id=aid,
            version=adapter.version,
            peft_type=adapter.peft_type,
            rank=adapter.weights.rank,
            target_modules=adapter.target_modules,
            nbytes=adapter.nbytes,
            resident=self._current.get(aid) is adapter,
            pinned=aid in self._pinned,
            in_use=self._in_use(aid),
            path=adapter.path,
        )

    def _disk_info(self, adapter_id: str) -> AdapterInfo:
        """What the config file says about an adapter that is not loaded (best effort)."""
        try:
            path = resolve_adapter_dir(adapter_id, self.roots)
            if not (path / CONFIG_FILE).is_file():
                return AdapterInfo(adapter_id, 0, "LORA", 0, (), 0, False, False, 0, str(path))
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            targets = config.get("target_modules") or ()
            targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
            peft_type, rank = str(config.get("peft_type", "")), int(config.get("r", 0))
        except (AdapterError, OSError, ValueError, TypeError, AttributeError, RecursionError):
            path, targets, peft_type, rank = Path(), (), "", 0
        return AdapterInfo(adapter_id, 0, peft_type, rank, targets, 0, False, False, 0, str(path))
