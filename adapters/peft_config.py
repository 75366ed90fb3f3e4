"""The fields of a PEFT `adapter_config.json` that loraplex reads, typed, since the file is
untrusted input: a wrong type or an impossible value becomes a message naming the field
rather than an exception deep inside the loader.

Every other field is either known not to change a saved adapter's forward (metadata, training
settings) or refused when set: PEFT keeps adding LoRA variants behind new config fields, and
serving such an adapter as plain LoRA would answer wrongly with status OK."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_RANK_FIELD = 1 << 16  # the loader's own --max-lora-rank check gives the useful message
MAX_VIRTUAL_TOKENS = 1024  # a soft prompt's length; PEFT's own examples use 8-100


class PeftConfigFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    peft_type: str = ""
    r: int | None = Field(default=None, ge=1, le=MAX_RANK_FIELD)
    lora_alpha: float | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    fan_in_fan_out: bool | None = None
    bias: str | None = None
    modules_to_save: list[str] | None = None
    target_modules: list[str] | str | None = None
    projection_prng_key: int | None = Field(default=None, ge=0, lt=1 << 63)
    save_projection: bool | None = None
    num_virtual_tokens: int | None = Field(default=None, ge=1, le=MAX_VIRTUAL_TOKENS)
    token_dim: int | None = Field(default=None, ge=1)
    num_transformer_submodules: int | None = Field(default=None, ge=1)

    @field_validator("lora_alpha")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, number in (value or {}).items():
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"key {key!r} is not a regular expression ({err})") from None
            if not math.isfinite(number) or not 0 < number <= MAX_RANK_FIELD * 1024:
                raise ValueError(f"{key!r}: {number} is not a positive finite number in range")
        return value


def validated(config: dict[str, Any]) -> dict[str, Any] | str:
    """The config with the fields loraplex reads coerced to their types, or what is wrong."""
    try:
        fields = PeftConfigFields.model_validate(config)
    except ValidationError as err:
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
    typed = fields.model_dump(exclude_unset=True)
    merged = {**config, **typed}
    return {k: v for k, v in merged.items() if not (k in typed and v is None)}  # null: default


# Fields that describe or train an adapter but never change the forward of its saved weights
# (the tensors alone say which layers are adapted).
INERT_FIELDS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
    "peft_version", "lora_dropout", "vera_dropout", "exclude_modules", "layers_to_transform",
    "layers_pattern", "megatron_config", "megatron_core", "runtime_config", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
    "d_initial", "init_weights",
    # prompt tuning: how the virtual tokens were initialised, and the base's shape (read from
    # the tensors and the base itself)
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
    "tokenizer_kwargs", "num_attention_heads", "num_layers",
})  # fmt: skip
READ_FIELDS = frozenset(PeftConfigFields.model_fields)
# Fields that select another forward (PEFT's LoRA variants) or change the model around the
# adapter: refused whenever they hold a value.
MATH_FIELDS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies its delta only from the "
    "invocation tokens on",
    "layer_replication": "it duplicates decoder layers of the base",
    "lora_bias": "it adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA pools each layer's input before lora_A",
    "trainable_token_indices": "it retrains rows of the token embeddings",
    "target_parameters": "it adapts raw parameters (such as MoE experts), not linear layers",
    "arrow_config": "Arrow routes each token among several LoRA experts",
    "use_bdlora": "block-diagonal LoRA shards its factors",
    "velora_config": "VeLoRA changes the adapter's forward",
    "monteclora_config": "MonteCLoRA samples its adapter weights",
    "kasa_config": "KaSA rewrites the base weights and adds singular values",
}
# Initializations that rewrote the base weights (W - scaling·BA) during training: until PEFT
# converts the adapter to a plain LoRA (which saves init_lora_weights = true), it only fits
# that rewritten base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def unsupported_field(config: dict[str, Any]) -> str | None:
    """What makes `config` describe math loraplex does not serve, naming the field; None if
    every field is read, inert or unset."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        return (
            f"init_lora_weights is {init!r}: this initialization rewrote the base weights while "
            "training, so the adapter does not fit the original base; convert it to a plain "
            "LoRA first (PEFT's save_pretrained with path_initial_model_for_weight_conversion)"
        )
    for name, value in config.items():
        known = name in READ_FIELDS or name in INERT_FIELDS or name == "init_lora_weights"
        if _unset(value) or (known and name not in MATH_FIELDS):
            continue
        if name in MATH_FIELDS:
            return f"{name} is set: {MATH_FIELDS[name]}, which loraplex does not serve"
        return (
            f"unknown config field {name!r} is set ({value!r:.60}); loraplex cannot tell whether "
            "it changes the adapter's math, so it refuses the adapter"
        )
    return None


def _unset(value: Any) -> bool:
    """Whether a field holds PEFT's 'off' value: null, false, zero or empty."""
    return (
        value is None
        or value is False
        or value == 0
        or value in ("", "none")
        or (isinstance(value, list | dict) and not value)
    )
