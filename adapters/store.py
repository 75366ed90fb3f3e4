"""The adapter store: adapter roots, lazy loading, versions, pins and LRU residency limits.

Loads (`load`, `acquire`, `pin`) and `detach` run on one thread, the server's loop, between
engine steps; they never wait: when every resident adapter is pinned or in use they raise
AdapterCapacityExceeded and the scheduler retries them after a release. `list`, `get`,
`release` and `wait_unused` may be called from any thread. A version handed out by `acquire`
stays alive until its last `release`, whatever loads, unloads or evictions happen meanwhile.
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
from loraplex.adapters.weights import AdapterWeights, LoadedAdapter, LoraWeights, tensors_nbytes

Key = tuple[str, int]  # (adapter id, version)
AdapterReader = Callable[[str, Path, BaseSpec], AdapterWeights]  # (id, directory, base)
Fingerprint = tuple[tuple[str, float, int], ...]


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
        read: AdapterReader = read_adapter,
    ) -> None:
        """`prepare` runs on each new version before it is installed (for example, converting
        it for another backend); an error it raises refuses the load. `on_drop` hears of each
        id that is unloaded or evicted (versions in use still live until their release).
        `read` parses and validates one adapter directory against the base. `events` hears
        of each load (with the seconds its reading and preparing took) and each eviction;
        the server sets it to its metrics."""
        if max_resident < 1 or max_resident_bytes < 1:
            raise ValueError("residency limits must be positive")
        self.roots = [Path(root) for root in roots]
        self.max_resident = max_resident
        self.max_resident_bytes = max_resident_bytes
        self._base = base
        self._read = read
        self._prepare = prepare
        self.events: StoreEvents = _Unheard()
        # Where an id's folder is: the roots by default; the server sets its adapter sources,
        # which also place downloaded adapters (adapters/sources.py).
        self.locate: Callable[[str], Path] = lambda adapter_id: resolve_adapter_dir(
            adapter_id, self.roots
        )
        self._on_drop = on_drop or (lambda _adapter_id: None)
        self._lock = threading.Condition(threading.RLock())
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
        """Load the files' current version (a no-op when unchanged)."""
        adapter = self._load(adapter_id, reuse_unchanged=True)
        with self._lock:
            return self._info(adapter)

    def unload(
        self, adapter_id: str, wait: bool = True, timeout: float | None = None, force: bool = False
    ) -> None:
        """`detach`, then (with `wait`) `wait_unused`: for callers that own no loop."""
        self.detach(adapter_id, force=force, if_unused=not wait)
        if wait:
            self.wait_unused(adapter_id, timeout)

    def detach(self, adapter_id: str, force: bool = False, if_unused: bool = False) -> None:
        """Make the adapter unknown to new requests; running sequences keep their version.
        With `if_unused`, raise AdapterInUse instead while any sequence uses it."""
        with self._lock:
            known = adapter_id in self._current or self._in_use(adapter_id) > 0
            if not known:
                raise AdapterNotFound(adapter_id, "is not loaded")
            # A pin is an operator's promise that the adapter stays; only force overrides it.
            if adapter_id in self._pinned and not force:
                raise AdapterPinned(adapter_id)
            if self._in_use(adapter_id) and if_unused:
                raise AdapterInUse(adapter_id, f"{self._in_use(adapter_id)} sequences use it")
            self._current.pop(adapter_id, None)
            self._pinned.discard(adapter_id)
            self._on_drop(adapter_id)

    def wait_unused(self, adapter_id: str, timeout: float | None = None) -> None:
        """Wait until no sequence uses any version of the adapter; AdapterInUse on timeout."""
        with self._lock:
            if not self._lock.wait_for(lambda: not self._in_use(adapter_id), timeout):
                raise AdapterInUse(adapter_id, "still in use when the unload timed out")

    def pin(self, adapter_id: str, pinned: bool = True) -> AdapterInfo:
        if pinned and adapter_id not in self._current:
            self._load(adapter_id, reuse_unchanged=False)
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
        """Hold the current version, loading it first if needed; AdapterCapacityExceeded at
        once when every resident adapter is pinned or in use."""
        with self._lock:
            adapter = self._current.get(adapter_id)
        if adapter is None:
            adapter = self._load(adapter_id, reuse_unchanged=False)
        if scale != 1.0 and isinstance(adapter.weights, LoraWeights) and adapter.weights.uses_dora:
            raise InvalidAdapter(
                adapter_id,
                "use_dora: a DoRA adapter runs at adapter_scale 1 only (its magnitude is "
                f"normalised for its weights at scale 1), got {scale}",
            )
        with self._lock:
            self._current.move_to_end(adapter_id)
            key = (adapter_id, adapter.version)
            self._held.setdefault(key, _Held(adapter)).count += 1
            return AdapterRef(adapter_id, adapter.version, scale)

    def install(self, adapter_id: str, weights: AdapterWeights) -> AdapterInfo:
        """Make weights built in memory (not read from a root) the adapter's next version:
        a trainer's policy, swapped in at every step without a write to disk. Sequences
        holding an earlier version keep it until they end."""
        if self._base is None:
            raise InvalidAdapter(adapter_id, "no base model is attached to the adapter store")
        adapter = self._install(adapter_id, "<memory>", weights)
        self.events.adapter_loaded(adapter_id, 0.0)
        with self._lock:
            return self._info(adapter)

    def any_in_use(self) -> bool:
        """Whether any sequence holds a version: only then can a release make room."""
        with self._lock:
            return bool(self._held)

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            key = (ref.adapter_id, ref.version)
            held = self._held.get(key)
            if held is None:
                return  # releasing twice is harmless
            held.count -= 1
            if held.count <= 0:
                del self._held[key]
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

    def _load(self, adapter_id: str, reuse_unchanged: bool) -> LoadedAdapter:
        with _unreadable_files(adapter_id):
            return self._read_and_install(adapter_id, reuse_unchanged)

    def _read_and_install(self, adapter_id: str, reuse_unchanged: bool) -> LoadedAdapter:
        """Read from disk (outside the state lock) and install as the current version."""
        path = self.locate(adapter_id)
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
        self._check_count_room(adapter_id)
        started = time.perf_counter()
        weights = self._read(adapter_id, path, base)
        adapter = self._install(adapter_id, str(path), weights)
        with self._lock:
            self._fingerprints[(adapter_id, adapter.version)] = fingerprint
        self.events.adapter_loaded(adapter_id, time.perf_counter() - started)
        return adapter

    def _install(self, adapter_id: str, source: str, weights: AdapterWeights) -> LoadedAdapter:
        """Prepare `weights` and make them the adapter's current version, evicting for room."""
        with self._lock:  # only loads bump versions, and they run on one thread
            version = self._last_version.get(adapter_id, 0) + 1
        adapter = LoadedAdapter(adapter_id, version, source, weights, tensors_nbytes(weights))
        if self._prepare is not None:
            self._prepare(adapter)
        with self._lock:
            replaced = self._current.pop(adapter_id, None)
            try:
                self._make_room(adapter)
            except AdapterCapacityExceeded:
                if replaced is not None:
                    self._current[adapter_id] = replaced
                raise
            self._last_version[adapter_id] = version
            self._current[adapter_id] = adapter
        return adapter

    def _make_room(self, incoming: LoadedAdapter) -> None:
        """Evict least recently used idle, unpinned adapters until `incoming` fits."""

        def too_full() -> bool:
            over_count = len(self._current) + 1 > self.max_resident
            return over_count or self._bytes_locked() + incoming.nbytes > self.max_resident_bytes

        while too_full():
            victim = self._idle_victim(incoming.adapter_id)
            if victim is None:
                raise self._no_room(incoming.adapter_id)
            del self._current[victim.adapter_id]
            self._on_drop(victim.adapter_id)
            self.events.adapter_evicted(victim.adapter_id)

    def _check_count_room(self, adapter_id: str) -> None:
        """Refuse before reading when the count limit alone leaves no room, so that a load
        the scheduler retries after each release costs no disk read while it waits."""
        with self._lock:
            others = len(self._current) - (adapter_id in self._current)
            if others + 1 > self.max_resident and self._idle_victim(adapter_id) is None:
                raise self._no_room(adapter_id)

    def _idle_victim(self, incoming_id: str) -> LoadedAdapter | None:
        """The least recently used adapter that is neither pinned nor in use."""
        for adapter in self._current.values():
            aid = adapter.adapter_id
            idle = (aid, adapter.version) not in self._held
            if idle and aid not in self._pinned and aid != incoming_id:
                return adapter
        return None

    def _no_room(self, adapter_id: str) -> AdapterCapacityExceeded:
        return AdapterCapacityExceeded(
            adapter_id,
            f"residency limits ({self.max_resident} adapters, {self.max_resident_bytes} "
            "bytes) reached and every resident adapter is pinned or in use",
        )

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
            path = self.locate(adapter_id)
            if not (path / CONFIG_FILE).is_file():
                return AdapterInfo(adapter_id, 0, "LORA", 0, (), 0, False, False, 0, str(path))
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            targets = config.get("target_modules") or ()
            targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
            peft_type, rank = str(config.get("peft_type", "")), int(config.get("r", 0))
        except (AdapterError, OSError, ValueError, TypeError, AttributeError, RecursionError):
            path, targets, peft_type, rank = Path(), (), "", 0
        return AdapterInfo(adapter_id, 0, peft_type, rank, targets, 0, False, False, 0, str(path))
