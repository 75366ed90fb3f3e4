"""Model specs resolve to loadable files, or fail with a one-line error and no partial files."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from loraplex.server import models
from loraplex.server.cli import main
from loraplex.server.errors import CorruptModel, HubUnreachable, ModelNotFound


def _write_gguf(path: Path) -> Path:
    writer = GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    for i in range(4):
        writer.add_tensor(f"blk.0.t{i}.weight", np.arange(4096, dtype=np.float32) * i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_local_gguf_resolves_with_its_checksum(tmp_path: Path, cache_dir: Path) -> None:
    gguf_file = _write_gguf(tmp_path / "tiny.gguf")
    source = models.resolve(str(gguf_file), cache_dir)
    assert source.format == "gguf"
    assert source.sha256 == models.sha256_file(gguf_file)


def test_local_checkpoint_directory_resolves(
    tiny_checkpoints: dict[str, Path], cache_dir: Path
) -> None:
    source = models.resolve(str(tiny_checkpoints["llama"]), cache_dir)
    assert (source.format, source.path) == ("hf", tiny_checkpoints["llama"].resolve())
    assert models.hf_checkpoint(source, cache_dir) == source.path


def test_truncated_gguf_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    gguf_file = _write_gguf(tmp_path / "tiny.gguf")
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptModel, match="truncated"):
        models.resolve(str(gguf_file), cache_dir)
    assert _files_in(cache_dir) == []


def test_file_that_is_not_gguf_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf file" * 10)
    with pytest.raises(CorruptModel, match="not a GGUF file"):
        models.resolve(str(bogus), cache_dir)


def test_missing_path_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        models.resolve(str(tmp_path / "absent.gguf"), cache_dir)
    with pytest.raises(ModelNotFound, match="does not exist"):
        models.resolve(str(tmp_path / "absent-dir") + "/", cache_dir)


def test_unreachable_hub_says_so_and_leaves_no_files(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubUnreachable, match="cannot reach a model hub"):
        models.resolve("someorg/some-model", cache_dir)
    assert _files_in(cache_dir) == []


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_cli_prints_one_line_error(
    case: str, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "model.gguf"
    if case == "corrupt":
        target.write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["model", "info", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraplex: error: ") and "\n" not in err
    assert str(target) in err
