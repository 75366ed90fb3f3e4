"""Check a safetensors file's header before any tensor is read, since adapter files are
untrusted: a header claiming a 100 GB tensor is refused after reading a few kilobytes.

Layout: an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets: [begin, end]} (offsets into the data that follows), then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

MAX_HEADER_BYTES = 8 << 20
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file, or claims more than allowed."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, TensorEntry]
    data_bytes: int  # what the tensors take, as the file's size says


def read_header(path: Path) -> Header:
    """The tensors `path` declares; raises HeaderError for anything malformed. The caller
    judges sizes, names and dtypes, in the order that gives the most useful message."""
    with path.open("rb") as file:
        size = path.stat().st_size
        prefix = file.read(8)
        if len(prefix) < 8:
            raise HeaderError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise HeaderError(f"claims a {length}-byte header in a {size}-byte file")
        raw = file.read(length)
    data_bytes = size - 8 - length
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeaderError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {str(name): _entry(str(name), info, data_bytes) for name, info in header.items()}
    _check_coverage(header, data_bytes)
    return Header(entries, data_bytes)


def _entry(name: str, info: Any, data_bytes: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise HeaderError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
        raise HeaderError(f"tensor {name!r}: shape and data_offsets must be lists of integers")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
        raise HeaderError(
            f"tensor {name!r}: {dtype}{list(shape)} needs {nbytes} bytes, "
            f"data_offsets {offsets} do not fit the {data_bytes} bytes of data"
        )
    return TensorEntry(dtype, tuple(shape), nbytes)


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _check_coverage(header: dict[str, Any], data_bytes: int) -> None:
    """Tensors must tile the data exactly: no overlaps, no gaps (as safetensors requires)."""
    spans = sorted(tuple(info["data_offsets"]) for info in header.values())
    position = 0
    for begin, end in spans:
        if begin != position:
            raise HeaderError("tensor data overlaps or leaves gaps")
        position = end
    if position != data_bytes:
        raise HeaderError(f"tensors cover {position} of the {data_bytes} bytes of data")
