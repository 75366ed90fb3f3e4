"""Map adapter ids to directories inside the configured roots, refusing any escape."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE
from loraplex.adapters.peft_format import CONFIG_FILE

MAX_ID_LENGTH = 200
MAX_SCAN_DEPTH = 3
MARKERS = (CONFIG_FILE, GGUF_LORA_FILE)  # a PEFT adapter directory, or a ready GGUF-LoRA one


def check_adapter_id(adapter_id: str) -> PurePosixPath:
    """Ids are relative slash-separated names: no '..', no absolute paths, no backslashes."""
    if not adapter_id or len(adapter_id) > MAX_ID_LENGTH:
        raise InvalidAdapter(adapter_id, f"ids must be 1 to {MAX_ID_LENGTH} characters")
    relative = PurePosixPath(adapter_id)
    bad_part = any(
        part in ("", ".", "..") or part.startswith(".") for part in adapter_id.split("/")
    )
    if relative.is_absolute() or bad_part or "\\" in adapter_id or "\0" in adapter_id:
        raise InvalidAdapter(
            adapter_id, "ids must be relative names inside an adapter root, no part hidden"
        )
    return relative


def resolve_adapter_dir(adapter_id: str, roots: Sequence[Path]) -> Path:
    """The first root holding the adapter; links that lead outside their root are refused."""
    relative = check_adapter_id(adapter_id)
    for root in roots:
        real_root = root.resolve()
        candidate = (root / relative).resolve()
        if not candidate.is_relative_to(real_root):
            raise InvalidAdapter(adapter_id, "the id leads outside its adapter root")
        if any((candidate / marker).is_file() for marker in MARKERS):
            return candidate
    raise AdapterNotFound(adapter_id, "no adapter with this id under the adapter roots")


def scan_adapter_ids(roots: Sequence[Path]) -> Iterator[str]:
    """Ids of every adapter directory under the roots (a few levels deep), first root first."""
    seen: set[str] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for depth in range(1, MAX_SCAN_DEPTH + 1):
            pattern = "/".join(["*"] * depth)
            found = {f.parent for marker in MARKERS for f in root.glob(f"{pattern}/{marker}")}
            for folder in sorted(found):
                adapter_id = folder.relative_to(root).as_posix()
                hidden = any(part.startswith(".") for part in adapter_id.split("/"))
                if not hidden and adapter_id not in seen:  # hidden: a writer's scratch copy
                    seen.add(adapter_id)
                    yield adapter_id
