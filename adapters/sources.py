"""Where adapters come from: the adapter roots on local disk, and, where the operator's
`--adapter-sources` allow-list says so, the Hugging Face hub (`org/name[@revision]`) and
http(s):// or s3:// folders (through fsspec).

A remote adapter is downloaded once into the adapter cache, before its request reaches the
engine: each file's size is checked against what the source declares before its body is
read, the files pass the same checks as a local folder's, and the folder appears in the
cache in one rename, or not at all. The store then reads it from there like any local one.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from loraplex.adapters.downloads import HUB_ID, download_hub, download_url
from loraplex.adapters.errors import AdapterError, AdapterNotFound, AdapterSourceRefused
from loraplex.adapters.paths import resolve_adapter_dir
from loraplex.adapters.peft_format import check_files

LOCAL, HUB = "local", "hf"
URL_SCHEMES = ("http", "https", "s3")
FETCH_LOCKS = 64


def is_url(adapter_id: str) -> bool:
    return "://" in adapter_id


def parse_allowed(entries: Sequence[str]) -> tuple[str, ...]:
    """The allow-list as given, each entry checked: `local`, `hf`, or a URL prefix such as
    `https://host/adapters/` or `s3://bucket/` (scheme and host at least). ValueError says
    what is wrong."""
    for entry in entries:
        if entry in (LOCAL, HUB):
            continue
        parts = urlsplit(entry)
        if parts.scheme not in URL_SCHEMES or not parts.netloc:
            raise ValueError(
                f"--adapter-sources entry {entry!r}: use 'local', 'hf', or a URL prefix "
                f"(scheme {', '.join(URL_SCHEMES)}, and a host or bucket), for example "
                "https://models.example.com/adapters/ or s3://my-bucket/"
            )
    return tuple(entries)


class AdapterSources:
    """Resolves adapter ids to folders: the roots for local ids, the cache for remote ones,
    which `fetch` downloads. Fetches of one id run one at a time; others run in parallel."""

    def __init__(
        self,
        roots: Sequence[Path],
        cache: Path,
        allowed: Sequence[str] = (LOCAL,),
        max_download_bytes: int = 4 << 30,
    ) -> None:
        self.roots = [Path(r) for r in roots]
        self.cache = Path(cache)
        self.allowed = parse_allowed(allowed)
        self.max_download_bytes = max_download_bytes
        # fetches of one id wait for each other; a fixed set of locks, so that ids that are
        # asked once (a typo, a 404) leave nothing behind
        self._locks = [threading.Lock() for _ in range(FETCH_LOCKS)]

    def locate(self, adapter_id: str) -> Path:
        """The folder the store reads the adapter from; never downloads."""
        if self._is_local(adapter_id):
            return resolve_adapter_dir(adapter_id, self.roots)
        if not (self.cache / _cache_key(adapter_id)).is_dir():
            raise AdapterNotFound(adapter_id, "is not downloaded yet; request it or load it")
        return resolve_adapter_dir(_cache_key(adapter_id), [self.cache])

    def fetch(self, adapter_id: str, refresh: bool = False) -> None:
        """Download a remote adapter into the cache unless it is there already (`refresh`:
        download it again, as LoadAdapter asks). Local ids need nothing."""
        if self._is_local(adapter_id):
            return
        self._check_allowed(adapter_id)
        with self._lock_for(adapter_id):
            if refresh or not (self.cache / _cache_key(adapter_id)).is_dir():
                self._download(adapter_id)

    def _is_local(self, adapter_id: str) -> bool:
        """Local unless a URL, a hub id with a revision, or (with 'hf' allowed) a hub id
        that no root holds."""
        if is_url(adapter_id):
            return False
        hub = HUB_ID.fullmatch(adapter_id)
        if hub is None:
            return True
        if hub["revision"]:
            return False
        if HUB not in self.allowed:
            return True  # no disk look-up on each request of a server without hub sources
        try:
            resolve_adapter_dir(adapter_id, self.roots)
        except AdapterError:
            return False
        return True

    def _check_allowed(self, adapter_id: str) -> None:
        if is_url(adapter_id):
            scheme = urlsplit(adapter_id).scheme
            if scheme not in URL_SCHEMES:
                raise AdapterSourceRefused(
                    adapter_id, f"unknown source scheme {scheme!r}: use {', '.join(URL_SCHEMES)}"
                )
            if not any(_within(adapter_id, e) for e in self.allowed if e not in (LOCAL, HUB)):
                raise AdapterSourceRefused(
                    adapter_id, "this URL is outside the server's --adapter-sources allow-list"
                )
        elif HUB not in self.allowed:
            raise AdapterSourceRefused(adapter_id, "hub ids need 'hf' in --adapter-sources")

    def _lock_for(self, adapter_id: str) -> threading.Lock:
        return self._locks[int(_cache_key(adapter_id), 16) % FETCH_LOCKS]

    def _download(self, adapter_id: str) -> None:
        """Into a hidden partial folder, checked, then renamed into place."""
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = self.cache / f".partial-{uuid.uuid4().hex}"
        partial.mkdir()
        try:
            if is_url(adapter_id):
                download_url(adapter_id, partial, self.max_download_bytes)
            else:
                download_hub(adapter_id, partial, self.max_download_bytes)
            check_files(adapter_id, partial)
            (partial / "source.txt").write_text(adapter_id + "\n", encoding="utf-8")
            _replace_folder(partial, self.cache / _cache_key(adapter_id))
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _within(url: str, prefix: str) -> bool:
    """Whether `url` lies under the allowed `prefix`: the same scheme and host (so a prefix
    without its slash cannot admit another host or port), and the prefix's path on a segment
    boundary."""
    asked, allowed = urlsplit(url), urlsplit(prefix)
    if (asked.scheme, asked.netloc.lower()) != (allowed.scheme, allowed.netloc.lower()):
        return False
    folder = allowed.path.rstrip("/")
    return asked.path == folder or asked.path.startswith(folder + "/")


def _cache_key(adapter_id: str) -> str:
    return hashlib.sha256(adapter_id.encode()).hexdigest()[:32]


def _replace_folder(new: Path, final: Path) -> None:
    """Move `new` to `final`, replacing what was there: a reader sees the old folder or the
    new one, never a mix."""
    old = final.with_name(f".old-{uuid.uuid4().hex}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)
