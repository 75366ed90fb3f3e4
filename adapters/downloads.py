"""Downloading one remote adapter folder into a directory: from the Hugging Face hub
(through its own cache, so offline mode and a pre-populated cache work) or from an
http(s):// or s3:// URL through fsspec, each file's declared size checked before its body is
read and the body cut off past it. Failures become adapter errors: a missing adapter is
AdapterNotFound, an unreachable source AdapterSourceUnavailable."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from loraplex.adapters.errors import (
    AdapterError,
    AdapterNotFound,
    AdapterSourceRefused,
    AdapterSourceUnavailable,
    InvalidAdapter,
)
from loraplex.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,100}))?"
)
REMOTE_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # a remote adapter is a PEFT folder
CHUNK_BYTES = 1 << 20
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 60.0


def download_hub(adapter_id: str, into: Path, max_bytes: int) -> None:
    """An adapter's files from the hub: through the local hub cache, so offline mode
    (HF_HUB_OFFLINE) and a pre-populated cache work; the token comes from HF_TOKEN."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    match = HUB_ID.fullmatch(adapter_id)
    assert match is not None  # the sources only send hub ids here
    try:
        folder = Path(snapshot_download(match["repo"], revision=match["revision"],
                                        allow_patterns=list(REMOTE_FILES)))  # fmt: skip
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base
        raise AdapterSourceUnavailable(
            adapter_id, "the hub cannot be reached (or HF_HUB_OFFLINE is set) and the adapter "
            "is not in the local hub cache",
        ) from None  # fmt: skip
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise AdapterNotFound(
            adapter_id, f"the hub has no such adapter ({_first_line(err)})"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        raise AdapterSourceUnavailable(adapter_id, f"the hub: {_first_line(err)}") from None
    for name in REMOTE_FILES:
        file = folder / name
        if not file.is_file():
            raise InvalidAdapter(adapter_id, f"the hub repository has no {name}")
        _check_size(adapter_id, name, file.stat().st_size, max_bytes)
        shutil.copyfile(file, into / name)


def download_url(url: str, into: Path, max_bytes: int) -> None:
    """An adapter folder's files from an http(s):// or s3:// URL through fsspec: S3
    credentials and endpoint as botocore finds them (AWS_* variables, ~/.aws)."""
    fs, folder = _filesystem(url)
    for name in REMOTE_FILES:
        remote = f"{folder.rstrip('/')}/{name}"
        with _source_errors(url, name):
            declared = fs.info(remote).get("size")
            if declared is None:
                raise InvalidAdapter(url, f"the source did not give the size of {name}")
            _check_size(url, name, int(declared), max_bytes)
            streaming = {"block_size": 0} if fs.protocol[0].startswith("http") else {}
            with fs.open(remote, "rb", **streaming) as body, (into / name).open("wb") as out:
                _copy_at_most(url, name, body, out, int(declared))


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    scheme = urlsplit(url).scheme
    options: dict[str, Any] = {}
    if scheme.startswith("http"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        options["client_kwargs"] = {"timeout": timeout}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError:
        raise AdapterSourceUnavailable(
            url, f"{scheme}:// sources need s3fs: pip install 'loraplex[s3]'"
        ) from None


@contextmanager
def _source_errors(url: str, name: str) -> Iterator[None]:
    """fsspec's errors as adapter errors: a missing file is NOT_FOUND, anything else that
    stops the transfer makes the source unavailable."""
    try:
        yield
    except AdapterError:
        raise
    except FileNotFoundError as err:
        reason = _unreachable(err)
        if reason is None:
            raise AdapterNotFound(url, f"the source has no {name}") from None
        raise AdapterSourceUnavailable(url, f"reading {name}: {reason}") from None
    except PermissionError as err:
        raise AdapterSourceRefused(url, f"the source refused {name}: {_first_line(err)}") from None
    except Exception as err:  # aiohttp, botocore and OS errors alike
        raise AdapterSourceUnavailable(url, f"reading {name}: {_first_line(err)}") from None


def _unreachable(err: FileNotFoundError) -> str | None:
    """Why the source could not answer, where fsspec's http filesystem reports any failed
    request as FileNotFoundError (the cause holds the real error); None for a true 404."""
    cause = err.__cause__
    if cause is None:
        return None
    status = getattr(cause, "status", None)
    if isinstance(status, int):
        return None if status in (404, 410) else f"HTTP status {status}"
    return _first_line(cause)


def _check_size(adapter_id: str, name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InvalidAdapter(
            adapter_id,
            f"{name} is {size} bytes, over the download limit of {max_bytes} "
            "(--max-adapter-download-bytes)",
        )


def _copy_at_most(url: str, name: str, body: BinaryIO, out: BinaryIO, declared: int) -> None:
    """Copy the body, refusing one that runs past its declared size or stops short of it."""
    copied = 0
    while chunk := body.read(CHUNK_BYTES):
        copied += len(chunk)
        if copied > declared:
            raise InvalidAdapter(url, f"{name} is larger than the {declared} bytes declared")
        out.write(chunk)
    if copied != declared:
        raise InvalidAdapter(url, f"{name} ended at {copied} of the {declared} bytes declared")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
