"""Adapter versions as GGUF-LoRA files: ready `.gguf` files as they are, PEFT directories
(LoRA or VeRA) converted once with the GGUF-LoRA exporter and cached.

The cache name carries a hash of the adapter's files and of the base, so a rewritten adapter
or another base never reuses a stale conversion; files are written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE
from loraplex.server.engine.api import AdapterRef

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
Exporter = Callable[[Path, Path, Path], Path]  # (adapter dir, base gguf, out file) -> out file


class ConvertingResolver:
    """An AdapterFileResolver over adapter locations given by `locate(ref)`."""

    def __init__(
        self,
        locate: Callable[[AdapterRef], Path],
        base_gguf: Path,
        base_sha256: str,
        cache_dir: Path,
        export: Exporter | None = None,
    ) -> None:
        self._locate = locate
        self._base = base_gguf
        self._base_sha = base_sha256
        self._cache = cache_dir / "gguf-lora"
        self._export = export or _default_exporter

    def __call__(self, ref: AdapterRef) -> Path:
        source = Path(self._locate(ref))
        if source.is_file() and source.suffix == ".gguf":
            return source
        if not source.is_dir():
            raise AdapterNotFound(ref.adapter_id, f"{source} is neither a directory nor a .gguf")
        named = source / GGUF_LORA_FILE  # the name the adapter store looks for
        ready = [named] if named.is_file() else sorted(source.glob("*.gguf"))
        if ready and not (source / PEFT_FILES[1]).is_file():
            return ready[0]
        return self._converted(ref.adapter_id, source)

    def _converted(self, adapter_id: str, source: Path) -> Path:
        target = self._cache / f"{adapter_id}-{self._fingerprint(adapter_id, source)}.gguf"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            self._export(source, self._base, Path(scratch))
            os.replace(scratch, target)
        finally:
            Path(scratch).unlink(missing_ok=True)
        return target

    def _fingerprint(self, adapter_id: str, source: Path) -> str:
        digest = hashlib.sha256(self._base_sha.encode())
        for name in PEFT_FILES:
            path = source / name
            if not path.is_file():
                raise InvalidAdapter(adapter_id, f"{source} has no {name}")
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]


def _default_exporter(adapter_dir: Path, base_gguf: Path, out_file: Path) -> Path:
    from loraplex.adapters.gguf_export import export_gguf  # torch-heavy: only when converting

    return export_gguf(adapter_dir, base_gguf, out_file, progress=False)
