"""Which GGUF-LoRA file an adapter directory becomes, and when an export runs again."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapters.errors import InvalidAdapter
from loraplex.server.engine.gguf_convert import gguf_lora_file


class RecordingExporter:
    """Writes the adapter's weight bytes as the 'converted' file and counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.fail = fail

    def __call__(self, adapter_dir: Path, base: Path, out: Path) -> Path:
        self.calls.append(adapter_dir)
        out.write_bytes(b"partial")
        if self.fail:
            raise RuntimeError("export failed")
        out.write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
        return out


def peft_dir(root: Path, name: str, weights: bytes = b"weights") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def file_for(
    tmp_path: Path, adapter_id: str, exporter: RecordingExporter, base: str = "ab"
) -> Path:
    source = tmp_path / "adapters" / adapter_id
    base_gguf, cache = tmp_path / "base.gguf", tmp_path / "cache"
    return gguf_lora_file(adapter_id, source, base_gguf, base * 32, cache, export=exporter)


def test_peft_adapter_exports_once_and_again_after_a_rewrite_or_for_another_base(
    tmp_path: Path,
) -> None:
    exporter = RecordingExporter()
    folder = peft_dir(tmp_path / "adapters", "a")
    first = file_for(tmp_path, "a", exporter)
    assert file_for(tmp_path, "a", exporter) == first
    assert first.read_bytes() == b"weights" and exporter.calls == [folder]
    peft_dir(tmp_path / "adapters", "a", b"retrained")
    second = file_for(tmp_path, "a", exporter)
    assert second != first and second.read_bytes() == b"retrained"
    assert len(exporter.calls) == 2
    assert file_for(tmp_path, "a", exporter, base="cd") not in (first, second)
    assert len(exporter.calls) == 3


def test_ready_gguf_lora_is_used_as_it_is(tmp_path: Path) -> None:
    exporter = RecordingExporter()
    folder = tmp_path / "adapters" / "ready"
    folder.mkdir(parents=True)
    (folder / "adapter_model.gguf").write_bytes(b"GGUF")
    assert file_for(tmp_path, "ready", exporter) == folder / "adapter_model.gguf"
    assert exporter.calls == []


def test_a_gguf_beside_a_peft_config_is_not_taken_as_ready(tmp_path: Path) -> None:
    exporter = RecordingExporter()
    folder = peft_dir(tmp_path / "adapters", "both")
    (folder / "adapter_model.gguf").write_bytes(b"GGUF")
    assert file_for(tmp_path, "both", exporter).read_bytes() == b"weights"
    assert exporter.calls == [folder]


def test_incomplete_adapters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapter, match=r"adapter_config\.json"):
        file_for(tmp_path, "nowhere", RecordingExporter())
    folder = tmp_path / "adapters" / "config-only"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(InvalidAdapter, match=r"adapter_model\.safetensors"):
        file_for(tmp_path, "config-only", RecordingExporter())


def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    peft_dir(tmp_path / "adapters", "a")
    with pytest.raises(RuntimeError):
        file_for(tmp_path, "a", RecordingExporter(fail=True))
    assert list((tmp_path / "cache" / "gguf-lora").iterdir()) == []
