"""Read PEFT adapter directories (adapter_config.json + adapter_model.safetensors) into weights.

Every problem is raised as InvalidAdapter naming the adapter; pickled `.bin` weights are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loraplex.adapters.errors import InvalidAdapter
from loraplex.adapters.peft_config import unsupported_field, validated
from loraplex.adapters.safetensors_header import HeaderError, read_header
from loraplex.adapters.weights import (
    AdapterWeights,
    LoraModule,
    LoraWeights,
    PromptWeights,
    VeraModule,
    VeraProjection,
    VeraWeights,
    refuse_overflowing,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1 << 20
KEY_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b"}
DORA_SUFFIXES = {**LORA_SUFFIXES, ".lora_magnitude_vector": "m"}
LORA_PARTS = {  # by use_dora: what each adapted module must hold
    False: "both lora_A and lora_B",
    True: "lora_A, lora_B and lora_magnitude_vector (use_dora)",
}
VERA_SUFFIXES = {".vera_lambda_d": "lambda_d", ".vera_lambda_b": "lambda_b"}
VERA_PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
LOADABLE_DTYPES = ("F32", "F16", "BF16", "F64")
UNADAPTABLE_TARGETS = ("embed_tokens", "lm_head")
SERVED_TYPES = ("LORA", "VERA", "PROMPT_TUNING")
PROMPT_KEY = "prompt_embeddings"


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter must fit: the resident base's architecture and adaptable linear layers."""

    model_type: str
    linear_shapes: Mapping[str, tuple[int, int]]  # module name -> (in_features, out_features)
    max_rank: int
    hidden_size: int = 0  # the token embeddings' width (a soft prompt's); 0: soft prompts refused


def read_adapter(adapter_id: str, path: Path, base: BaseSpec) -> AdapterWeights:
    """Parse and validate the adapter in `path` against `base`."""
    config = _read_config(adapter_id, path)  # validated
    _check_kind(adapter_id, config)  # before reading tensors: say what a wrong kind is
    return _parse(adapter_id, config, _read_tensors(adapter_id, path, base), base)


def check_files(adapter_id: str, path: Path) -> None:
    """The checks that need no base: a supported, valid config and a well-formed safetensors
    header (a download is checked so before it enters the cache)."""
    _check_kind(adapter_id, _read_config(adapter_id, path))
    try:
        read_header(path / WEIGHTS_FILE)
    except (HeaderError, OSError) as err:
        raise InvalidAdapter(adapter_id, f"{WEIGHTS_FILE}: {err}") from None


def adapter_weights(
    adapter_id: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseSpec
) -> AdapterWeights:
    """An adapter's weights from its adapter_config.json fields and its saved tensors (as
    PEFT names them), validated as a directory's are: a model's adapter held in memory."""
    checked = validated(config)
    if isinstance(checked, str):
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE}: {checked}")
    _check_kind(adapter_id, checked)
    return _parse(adapter_id, checked, tensors, base)


def _parse(
    adapter_id: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseSpec
) -> AdapterWeights:
    """The weights of a validated LoRA or VeRA config and its tensors."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "PROMPT_TUNING":
        return _parse_prompt(adapter_id, config, tensors, base)
    if peft_type == "LORA":
        weights: AdapterWeights = _parse_lora(adapter_id, config, tensors, base)
    else:
        weights = _parse_vera(adapter_id, config, tensors, base)
    refuse_overflowing(adapter_id, weights)
    return weights


def _check_kind(adapter_id: str, config: dict[str, Any]) -> None:
    """Refuse reward models and PEFT types the engines cannot apply, saying what they are."""
    peft_type = str(config.get("peft_type", "")).upper()
    if str(config.get("task_type", "")).upper() == "SEQ_CLS":
        raise InvalidAdapter(
            adapter_id,
            "it is a reward model (a sequence classifier, task_type SEQ_CLS): it scores text "
            "for training and `eval-adapter`, and generates nothing",
        )
    if peft_type not in SERVED_TYPES:
        raise InvalidAdapter(
            adapter_id, f"peft_type {peft_type!r} is not supported ({', '.join(SERVED_TYPES)})"
        )
    problem = unsupported_field(config)
    if problem is not None:
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE}: {problem}")


def _read_config(adapter_id: str, path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if (path / "adapter_model.gguf").is_file():
            raise InvalidAdapter(
                adapter_id,
                "is a ready GGUF-LoRA file (adapter_model.gguf); serve it with --backend gguf, "
                "or give its PEFT form (adapter_config.json and adapter_model.safetensors)",
            )
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE} is missing in {path}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE} must hold a JSON object")
    checked = validated(config)
    if isinstance(checked, str):
        raise InvalidAdapter(adapter_id, f"{CONFIG_FILE}: {checked}")
    return checked


def _read_tensors(adapter_id: str, path: Path, base: BaseSpec) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
        if pickles:
            raise InvalidAdapter(
                adapter_id,
                f"only {pickles[0]} found: pickled weights are never loaded; "
                f"save the adapter as {WEIGHTS_FILE}",
            )
        raise InvalidAdapter(adapter_id, f"{WEIGHTS_FILE} is missing in {path}")
    _check_header(adapter_id, weights_path, base)
    try:
        return load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise InvalidAdapter(adapter_id, f"{WEIGHTS_FILE} is corrupt: {err}") from None


def largest_adapter(base: BaseSpec) -> tuple[int, int]:
    """(bytes, longest dimension) of the largest adapter `base` can take: LoRA factors of the
    top rank on every layer plus VeRA's shared projections, in 8-byte floats to be generous."""
    widest = max((max(shape) for shape in base.linear_shapes.values()), default=0)
    features = sum(i + o for i, o in base.linear_shapes.values()) + 2 * widest
    return 8 * base.max_rank * features, max(widest, base.max_rank)


def _check_header(adapter_id: str, weights_path: Path, base: BaseSpec) -> None:
    """Refuse impossible tensors from the header alone, before anything is allocated. What
    the tensors are (names, dtypes) is judged before how large they are: an embedding LoRA is
    also too large, and its size is the less useful thing to say."""
    try:
        header = read_header(weights_path)
    except (HeaderError, OSError) as err:
        raise InvalidAdapter(adapter_id, f"{WEIGHTS_FILE} is invalid: {err}") from None
    for name, entry in header.entries.items():
        _refuse_unadaptable_target(adapter_id, name)
        if entry.dtype not in LOADABLE_DTYPES:
            raise InvalidAdapter(
                adapter_id, f"tensor {name!r} has dtype {entry.dtype}; adapter weights must be "
                f"{', '.join(LOADABLE_DTYPES)} (convert the file, e.g. to BF16 or F32)",
            )  # fmt: skip
    max_bytes, longest = largest_adapter(base)
    if header.data_bytes > max_bytes:
        raise InvalidAdapter(
            adapter_id, f"{WEIGHTS_FILE} holds {header.data_bytes} bytes of tensors; the limit is "
            f"{max_bytes}, what rank {base.max_rank} on every layer of the resident base takes",
        )  # fmt: skip
    for name, entry in header.entries.items():
        if len(entry.shape) > 2 or any(d > longest for d in entry.shape):
            raise InvalidAdapter(
                adapter_id, f"tensor {name!r} of shape {list(entry.shape)} fits no layer of the "
                f"resident {base.model_type} base",
            )  # fmt: skip


def _refuse_unadaptable_target(adapter_id: str, tensor_name: str) -> None:
    for target in UNADAPTABLE_TARGETS:
        if f".{target}." in f".{tensor_name}.":
            raise InvalidAdapter(
                adapter_id, f"tensor {tensor_name!r} adapts {target}: adapters on the token "
                "embeddings or the output head (embed_tokens, lm_head) are not supported; only "
                "the decoder blocks' linear layers can be adapted (drop those target_modules)",
            )  # fmt: skip


def _group_by_module(
    adapter_id: str,
    tensors: dict[str, torch.Tensor],
    suffixes: dict[str, str],
    skip: tuple[str, ...],
) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {part: tensor}}; any other tensor (DoRA, modules_to_save, ...) is refused."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in skip:
            continue
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None or not key.startswith(KEY_PREFIX):
            raise InvalidAdapter(adapter_id, f"unsupported tensor {key!r} in {WEIGHTS_FILE}")
        name = key[len(KEY_PREFIX) : -len(suffix)]
        modules.setdefault(name, {})[suffixes[suffix]] = tensor
    if not modules:
        raise InvalidAdapter(adapter_id, f"{WEIGHTS_FILE} holds no adapter tensors")
    return modules


def _base_shape(adapter_id: str, name: str, base: BaseSpec) -> tuple[int, int]:
    shape = base.linear_shapes.get(name)
    if shape is None:
        raise InvalidAdapter(
            adapter_id,
            f"targets {name!r}, which is not a linear layer of the resident "
            f"{base.model_type} base model (wrong architecture or module name)",
        )
    return shape


def _check_shape(adapter_id: str, what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise InvalidAdapter(
            adapter_id, f"{what} has shape {tuple(tensor.shape)}, the base model needs {shape}"
        )
    # The largest magnitude is finite exactly when every value is (NaN propagates through
    # amax): two ops, where isfinite is four, on each of an adapter's hundreds of tensors.
    if not torch.is_floating_point(tensor) or not bool(torch.isfinite(tensor.abs().amax())):
        raise InvalidAdapter(adapter_id, f"{what} must hold finite floating-point values")


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching a suffix of the name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _refuse_unsupported_lora(adapter_id: str, config: Mapping[str, Any]) -> None:
    if config.get("modules_to_save"):
        raise InvalidAdapter(adapter_id, "modules_to_save is not supported (LoRA layers only)")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(adapter_id, "trained biases (bias != 'none') are not supported")
    if config.get("fan_in_fan_out"):
        raise InvalidAdapter(adapter_id, "fan_in_fan_out layers are not supported")


def _parse_lora(
    adapter_id: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor], base: BaseSpec
) -> LoraWeights:
    _refuse_unsupported_lora(adapter_id, config)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    dora = bool(config.get("use_dora"))
    parts_needed = {"a", "b", "m"} if dora else {"a", "b"}
    suffixes = DORA_SUFFIXES if dora else LORA_SUFFIXES
    modules: dict[str, LoraModule] = {}
    for name, parts in _group_by_module(adapter_id, tensors, suffixes, ()).items():
        if set(parts) != parts_needed:
            raise InvalidAdapter(adapter_id, f"{name} needs {LORA_PARTS[dora]}")
        in_features, out_features = _base_shape(adapter_id, name, base)
        rank = int(_pattern_value(rank_pattern, name, config.get("r", 8)))
        if not 1 <= rank <= base.max_rank:
            raise InvalidAdapter(
                adapter_id, f"rank {rank} of {name} is over the limit of {base.max_rank}"
            )
        _check_shape(adapter_id, f"{name}.lora_A", parts["a"], (rank, in_features))
        _check_shape(adapter_id, f"{name}.lora_B", parts["b"], (out_features, rank))
        if dora:
            _check_shape(adapter_id, f"{name}.lora_magnitude_vector", parts["m"], (out_features,))
        alpha = float(_pattern_value(alpha_pattern, name, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[name] = LoraModule(parts["a"], parts["b"], scaling, parts.get("m"))
    return LoraWeights(modules=modules)


def _parse_prompt(
    adapter_id: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor], base: BaseSpec
) -> PromptWeights:
    """A causal LM's soft prompt: one [virtual tokens, hidden size] embedding table."""
    if base.hidden_size < 1:
        raise InvalidAdapter(adapter_id, "soft prompts (PROMPT_TUNING) need --backend hf")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise InvalidAdapter(
            adapter_id, "num_transformer_submodules must be 1 (a decoder-only model's prompt)"
        )
    if set(tensors) != {PROMPT_KEY}:
        raise InvalidAdapter(adapter_id, f"{WEIGHTS_FILE} must hold only {PROMPT_KEY!r}")
    embeddings = tensors[PROMPT_KEY]
    virtual = int(config.get("num_virtual_tokens") or embeddings.shape[0])
    _check_shape(adapter_id, PROMPT_KEY, embeddings, (virtual, base.hidden_size))
    return PromptWeights(embeddings.float())


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init: Kaiming-uniform with gain sqrt(2) over fan_in, drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def regenerate_projection(key: int, rank: int, in_max: int, out_max: int) -> VeraProjection:
    """Rebuild the shared projection as PEFT draws it: A then B from one seeded CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((rank, in_max), generator)
    b = kaiming_uniform((out_max, rank), generator)
    return VeraProjection(prng_key=key, a=a, b=b)


def _parse_vera(
    adapter_id: str, config: Mapping[str, Any], tensors: dict[str, torch.Tensor], base: BaseSpec
) -> VeraWeights:
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise InvalidAdapter(adapter_id, "VeRA with modules_to_save or biases is not supported")
    rank = int(config.get("r", 256))
    if not 1 <= rank <= base.max_rank:
        raise InvalidAdapter(adapter_id, f"rank {rank} is over the limit of {base.max_rank}")
    grouped = _group_by_module(adapter_id, tensors, VERA_SUFFIXES, VERA_PROJECTION_KEYS)
    modules: dict[str, VeraModule] = {}
    for name, parts in grouped.items():
        if set(parts) != {"lambda_d", "lambda_b"}:
            raise InvalidAdapter(adapter_id, f"{name} needs both vera_lambda_d and vera_lambda_b")
        _, out_features = _base_shape(adapter_id, name, base)
        _check_shape(adapter_id, f"{name}.vera_lambda_d", parts["lambda_d"], (rank,))
        _check_shape(adapter_id, f"{name}.vera_lambda_b", parts["lambda_b"], (out_features,))
        modules[name] = VeraModule(lambda_d=parts["lambda_d"], lambda_b=parts["lambda_b"])
    # PEFT sizes the shared projection by the largest targeted layer in each dimension.
    in_max = max(base.linear_shapes[name][0] for name in modules)
    out_max = max(base.linear_shapes[name][1] for name in modules)
    key = int(config.get("projection_prng_key", 0))
    if all(k in tensors for k in VERA_PROJECTION_KEYS):
        a, b = (tensors[k] for k in VERA_PROJECTION_KEYS)
        _check_shape(adapter_id, "vera_A", a, (rank, in_max))
        _check_shape(adapter_id, "vera_B", b, (out_max, rank))
        projection = VeraProjection(prng_key=key, a=a, b=b)
    elif config.get("save_projection", True):
        raise InvalidAdapter(adapter_id, "save_projection is true but vera_A/vera_B are missing")
    else:
        projection = regenerate_projection(key, rank, in_max, out_max)
    return VeraWeights(projection=projection, modules=modules)
