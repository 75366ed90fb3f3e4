"""In-memory adapter weights, keyed by base module names (model.layers.0.mlp.up_proj)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loraplex.adapters.errors import InvalidAdapter

# The most an adapter's delta may amplify a layer's input (see `delta_gain`): with inputs up
# to the same size, the delta stays inside the range of float32 and bfloat16 (~3.4e38), the
# dtypes the backends compute in. Trained adapters sit many orders of magnitude below it.
MAX_DELTA_GAIN = math.sqrt(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair: delta W = scaling · B @ A. A DoRA layer also has a magnitude m: its
    output is m / ||W + delta W|| (row norms) times (W + delta W) x."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float  # alpha/r, or alpha/sqrt(r) for rsLoRA, after rank/alpha patterns
    magnitude: torch.Tensor | None = None  # [out]: DoRA's, None for plain LoRA

    def dora_gain(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + delta W|| per output row, for the dense base weight W [out, in] (fp32),
        as PEFT's DoRA computes it (the norm over each row's inputs)."""
        assert self.magnitude is not None
        norm = torch.linalg.norm(weight.float() + self.delta_weight(), dim=1)
        return self.magnitude.float() / norm

    def delta_weight(self) -> torch.Tensor:
        return (self.b.float() @ self.a.float()) * self.scaling


@dataclass(frozen=True)
class VeraProjection:
    """The frozen projection shared by every VeRA adapter made with the same key and rank."""

    prng_key: int
    a: torch.Tensor  # [r, largest in_features]
    b: torch.Tensor  # [largest out_features, r]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class VeraModule:
    """Per-module VeRA vectors: delta W = diag(lambda_b) · B · diag(lambda_d) · A (sliced)."""

    lambda_d: torch.Tensor  # [r]
    lambda_b: torch.Tensor  # [out]

    def delta_weight(self, projection: VeraProjection, in_features: int) -> torch.Tensor:
        """ΔW [out, in]: the shared projection sliced to this layer's shape, as PEFT does."""
        out_features = self.lambda_b.shape[0]
        b = projection.b[:out_features].float() * self.lambda_b.float()[:, None]
        a = projection.a[:, :in_features].float() * self.lambda_d.float()[:, None]
        return b @ a


@dataclass(frozen=True)
class LoraWeights:
    modules: dict[str, LoraModule]

    peft_type = "LORA"

    @property
    def uses_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def rank(self) -> int:
        return max(int(m.a.shape[0]) for m in self.modules.values())


@dataclass(frozen=True)
class VeraWeights:
    projection: VeraProjection
    modules: dict[str, VeraModule]

    peft_type = "VERA"

    @property
    def rank(self) -> int:
        return self.projection.rank


@dataclass(frozen=True)
class PromptWeights:
    """PEFT prompt tuning (a soft prompt): learned embeddings of virtual tokens, put before
    each prompt's own token embeddings. It changes no layer, so `modules` is empty."""

    embeddings: torch.Tensor  # [virtual tokens, hidden size]
    modules: dict[str, LoraModule] = field(default_factory=dict)

    peft_type = "PROMPT_TUNING"
    rank = 0  # no low-rank delta, no adapter slot

    @property
    def virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


AdapterWeights = LoraWeights | VeraWeights | PromptWeights


def virtual_tokens(weights: AdapterWeights | None) -> int:
    """How many virtual tokens an adapter puts before each prompt (0 but for soft prompts)."""
    return weights.virtual_tokens if isinstance(weights, PromptWeights) else 0


@dataclass(frozen=True)
class LoadedAdapter:
    """One immutable version of an adapter, as validated against the resident base."""

    adapter_id: str
    version: int
    path: str
    weights: AdapterWeights
    nbytes: int = field(default=0)

    @property
    def peft_type(self) -> str:
        return self.weights.peft_type

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights.modules))


def tensors_nbytes(weights: AdapterWeights) -> int:
    tensors: list[torch.Tensor] = []
    if isinstance(weights, PromptWeights):
        tensors.append(weights.embeddings)
    for module in weights.modules.values():
        if isinstance(module, LoraModule):
            tensors += [module.a, module.b]
            tensors += [] if module.magnitude is None else [module.magnitude]
        else:
            tensors += [module.lambda_d, module.lambda_b]
    return sum(t.numel() * t.element_size() for t in tensors)


def _inf_norm(matrix: torch.Tensor) -> float:
    """The largest row sum of absolute values, summed in float64 so the check cannot overflow."""
    return float(matrix.abs().sum(-1, dtype=torch.float64).max())


def delta_gain(weights: AdapterWeights) -> tuple[str, float]:
    """The module whose delta can amplify its input most, and an upper bound of that gain:
    the infinity norm of ΔW, bounded through its factors without forming ΔW."""
    if isinstance(weights, VeraWeights):
        shared = _inf_norm(weights.projection.b) * _inf_norm(weights.projection.a)
    gains: dict[str, float] = {}
    for name, module in weights.modules.items():
        if isinstance(module, LoraModule):
            gains[name] = abs(module.scaling) * _inf_norm(module.b) * _inf_norm(module.a)
        else:
            vectors = module.lambda_b.double().abs().max() * module.lambda_d.double().abs().max()
            gains[name] = float(vectors) * shared
    if not gains:
        return "", 0.0  # a soft prompt: no delta
    name = max(gains, key=gains.__getitem__)
    return name, gains[name]


def refuse_overflowing(adapter_id: str, weights: AdapterWeights) -> None:
    """Refuse an adapter whose effective weights (scaling included) could overflow the
    activations of any request it serves."""
    name, gain = delta_gain(weights)
    if not gain <= MAX_DELTA_GAIN:
        raise InvalidAdapter(
            adapter_id,
            f"{name}: its delta (scaling x weights) can amplify an input {gain:.3g} times, over "
            f"the limit of {MAX_DELTA_GAIN:.3g}; its activations would overflow float32. Check "
            "lora_alpha and the weights' magnitudes",
        )
