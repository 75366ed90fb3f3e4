"""Write a finished adapter atomically: a temporary sibling directory, then one rename.

A server scanning the adapter root therefore sees either no adapter or a complete one.
The metadata file names the base (spec and checksum), the method, the data checksum, the
hyperparameters and the final metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

METADATA_FILE = "loraplex-adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class OutputExists(FileExistsError):
    """The output directory exists and the caller did not ask to overwrite it."""


def check_output(target: Path, overwrite: bool) -> None:
    """Fail before training, not after, when the result could not be written."""
    if target.exists() and not overwrite:
        raise OutputExists(f"{target} already exists; pass --overwrite to replace it")


def write_adapter(
    target: Path, save: Callable[[Path], None], metadata: dict[str, Any], overwrite: bool
) -> Path:
    """Call `save(scratch_dir)`, add the metadata, then move the directory into place."""
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save(scratch)
        _make_readable(scratch)
        (scratch / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        _replace_dir(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp makes the directory private (0700); a server under another user must read it."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(scratch: Path, target: Path) -> None:
    if not target.exists():
        os.replace(scratch, target)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first,
    # so the window without an adapter is two renames long, never a partial copy.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(scratch, target)
    shutil.rmtree(old, ignore_errors=True)


def cast_weights(adapter_dir: Path, dtype: str) -> None:
    """Store the adapter's floating-point tensors as `dtype`; PEFT upcasts them on load."""
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter_dir / WEIGHTS_FILE
    target = getattr(torch, dtype)
    tensors = load_file(str(path))
    cast = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt"})


def read_metadata(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
