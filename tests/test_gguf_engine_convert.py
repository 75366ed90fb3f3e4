"""Which GGUF-LoRA file an adapter version resolves to, and when a conversion runs again."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapters.errors import AdapterNotFound, InvalidAdapter
from loraplex.server.engine.api import AdapterRef
from loraplex.server.engine.gguf_convert import ConvertingResolver


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


def resolver_for(tmp_path: Path, exporter: RecordingExporter) -> ConvertingResolver:
    return ConvertingResolver(
        lambda ref: tmp_path / "adapters" / ref.adapter_id,
        tmp_path / "base.gguf",
        "ab" * 32,
        tmp_path / "cache",
        export=exporter,
    )


def test_peft_adapter_converts_once_and_again_after_a_rewrite(tmp_path: Path) -> None:
    exporter = RecordingExporter()
    resolve = resolver_for(tmp_path, exporter)
    folder = peft_dir(tmp_path / "adapters", "a")
    first = resolve(AdapterRef("a", 1))
    assert resolve(AdapterRef("a", 1)) == first
    assert first.read_bytes() == b"weights" and exporter.calls == [folder]
    peft_dir(tmp_path / "adapters", "a", b"retrained")
    second = resolve(AdapterRef("a", 2))
    assert second != first and second.read_bytes() == b"retrained"
    assert len(exporter.calls) == 2


def test_ready_gguf_lora_is_used_as_it_is(tmp_path: Path) -> None:
    exporter = RecordingExporter()
    resolve = resolver_for(tmp_path, exporter)
    folder = tmp_path / "adapters" / "ready"
    folder.mkdir(parents=True)
    (folder / "adapter.gguf").write_bytes(b"GGUF")
    assert resolve(AdapterRef("ready", 1)) == folder / "adapter.gguf"
    assert exporter.calls == []


def test_missing_and_incomplete_adapters_are_typed_errors(tmp_path: Path) -> None:
    resolve = resolver_for(tmp_path, RecordingExporter())
    with pytest.raises(AdapterNotFound, match="nowhere"):
        resolve(AdapterRef("nowhere", 1))
    (tmp_path / "adapters" / "empty").mkdir(parents=True)
    with pytest.raises(InvalidAdapter, match=r"adapter_config\.json"):
        resolve(AdapterRef("empty", 1))


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    peft_dir(tmp_path / "adapters", "a")
    with pytest.raises(RuntimeError):
        resolver_for(tmp_path, RecordingExporter(fail=True))(AdapterRef("a", 1))
    assert list((tmp_path / "cache" / "gguf-lora").iterdir()) == []
