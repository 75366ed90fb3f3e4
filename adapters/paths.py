"""Map adapter ids to directories inside the configured roots, refusing any escape."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.adapters.gguf_lora import GGUF_LORA_FILE
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

MAX_ID_LENGTH = 200
MAX_SCAN_DEPTH = 3
MARKERS = (CONFIG_FILE, GGUF_LORA_FILE)  # a PEFT adapter directory, or a ready GGUF-LoRA one
READ_FILES = (CONFIG_FILE, WEIGHTS_FILE, GGUF_LORA_FILE)  # every file the readers open
# Another root is outside too: the roots are separate trees, and an id names one of them.
STAY_INSIDE = "links must stay inside the root that holds them"
LINK_ERRORS = (OSError, RuntimeError)  # RuntimeError: a link loop, before Python 3.13


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
    """The first root holding the adapter. A folder or adapter file that links outside its
    root is refused (InvalidAdapter, with the reason) before anything in it is read."""
    relative = check_adapter_id(adapter_id)
    for root in roots:
        real_root = _real_path(adapter_id, root, "the adapter root")
        candidate = _real_path(adapter_id, root / relative, "the adapter folder")
        if not candidate.is_relative_to(real_root):
            raise InvalidAdapter(
                adapter_id, f"the adapter folder links outside its adapter root ({STAY_INSIDE})"
            )
        _refuse_files_linking_out(adapter_id, candidate, real_root)
        if any((candidate / marker).is_file() for marker in MARKERS):
            return candidate
    raise AdapterNotFound(adapter_id, "no adapter with this id under the adapter roots")


def _refuse_files_linking_out(adapter_id: str, folder: Path, real_root: Path) -> None:
    """A real folder inside the root may still hold files that are links to elsewhere."""
    for name in READ_FILES:
        file = folder / name
        if not file.is_symlink():
            continue  # a plain file (or none) lies where its folder does
        if not _real_path(adapter_id, file, name).is_relative_to(real_root):
            raise InvalidAdapter(
                adapter_id, f"{name} links outside its adapter root ({STAY_INSIDE})"
            )


def _real_path(adapter_id: str, path: Path, what: str) -> Path:
    """`path` with every link followed; a loop is the adapter's fault, not the server's."""
    try:
        return path.resolve()
    except LINK_ERRORS as err:
        raise InvalidAdapter(adapter_id, f"{what} cannot be resolved: {err}") from None


def scan_adapter_ids(roots: Sequence[Path]) -> Iterator[str]:
    """Ids of every adapter directory under the roots (a few levels deep), first root first,
    shallowest first. Links that lead outside their root are not followed, so listing never
    reads (or reveals) what lies outside; loading such an id says why it is refused."""
    seen: set[str] = set()
    for root in roots:
        if not root.is_dir():
            continue
        real_root = root.resolve()
        level = [root]
        for _ in range(MAX_SCAN_DEPTH):
            level = sorted(child for folder in level for child in _subfolders(folder, real_root))
            for folder in level:
                adapter_id = folder.relative_to(root).as_posix()
                is_adapter = any((folder / marker).is_file() for marker in MARKERS)
                if is_adapter and adapter_id not in seen:
                    seen.add(adapter_id)
                    yield adapter_id


def _subfolders(folder: Path, real_root: Path) -> list[Path]:
    """Folders to scan below `folder`: not hidden (a writer's scratch copy), and not links out
    of the root."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []  # vanished or unreadable meanwhile: nothing to list there
    children = []
    for entry in entries:
        child = folder / entry.name
        if entry.name.startswith(".") or (
            entry.is_symlink() and not _stays_inside(child, real_root)
        ):
            continue
        if _is_dir(entry):
            children.append(child)
    return children


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Follows links; a loop or a vanished target is no folder."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _stays_inside(path: Path, real_root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(real_root)
    except LINK_ERRORS:
        return False
