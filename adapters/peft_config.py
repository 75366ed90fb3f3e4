"""The fields of a PEFT `adapter_config.json` that loraplex reads, typed, since the file is
untrusted input: a wrong type or an impossible value becomes a message naming the field
rather than an exception deep inside the loader. Other fields are kept and ignored."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_RANK_FIELD = 1 << 16  # the loader's own --max-lora-rank check gives the useful message


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
