"""Adapter directories as GGUF-LoRA files: a ready adapter_model.gguf as it is, a PEFT
directory (LoRA or VeRA) exported once with the GGUF-LoRA exporter and cached.

The cache name carries a hash of the adapter's files and of the base, so a rewritten adapter
or another base never reuses a stale export, and reloading an unchanged one costs a hash;
files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

Exporter = Callable[[Path, Path, Path], Path]  # (adapter dir, base gguf, out file) -> out file


def gguf_lora_file(
    adapter_id: str,
    source: Path,
    base_gguf: Path,
    base_identity: str,
    cache_dir: Path,
    export: Exporter | None = None,
) -> Path:
    """The GGUF-LoRA file of the adapter directory `source` for this base; InvalidAdapter
    (or the exporter's error) when it cannot be made. A directory with adapter_model.gguf and
    no adapter_config.json is a ready one (`ready_file`)."""
    ready = ready_file(source)
    if ready is not None:
        return ready
    digest = _fingerprint(adapter_id, source, base_identity)
    # ids may be hub ids or URLs: only a tame form of the id names the file (the digest,
    # which covers the id, keeps names apart)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", adapter_id)[-80:]
    target = cache_dir / "gguf-lora" / f"{name}-{digest}.gguf"
    if not target.is_file():
        _write_atomically(target, lambda out: (export or _default_exporter)(source, base_gguf, out))
    return target


def ready_file(source: Path) -> Path | None:
    """A ready GGUF-LoRA adapter's file: adapter_model.gguf with no PEFT config beside it."""
    ready = source / GGUF_LORA_FILE
    return ready if ready.is_file() and not (source / CONFIG_FILE).is_file() else None


def _fingerprint(adapter_id: str, source: Path, base_identity: str) -> str:
    digest = hashlib.sha256(base_identity.encode())
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = source / name
        if not path.is_file():
            raise InvalidAdapter(adapter_id, f"{source} has no {name}")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        write(Path(scratch))
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)


def _default_exporter(adapter_dir: Path, base_gguf: Path, out_file: Path) -> Path:
    from loraplex.adapters.gguf_export import export_gguf  # torch-heavy: only when exporting

    return export_gguf(adapter_dir, base_gguf, out_file, progress=False)
