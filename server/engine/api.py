"""The plain-data contract between the scheduler (which decides) and a backend (which executes).

The scheduler hands the engine a `StepPlan` each step; the engine runs it and returns one
`TokenEvent` per sequence that produced a token or finished. Nothing here imports torch or gRPC.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.adapters.types import AdapterInfo, AdapterRef, StoreEvents
from loraplex.server.errors import InvalidRequest

__all__ = [
    "AdapterAdmin",
    "AdapterInfo",
    "AdapterRef",
    "Engine",
    "FinishReason",
    "SamplingParams",
    "SequenceRequest",
    "StepPlan",
    "TokenEvent",
]

MAX_NEW_TOKENS_LIMIT = 1 << 16
# Temperatures below this sample as greedy does (vLLM's rule too): the distribution is then
# the argmax up to ties, and dividing logits by a smaller number only risks overflow.
GREEDY_BELOW_TEMPERATURE = 1e-5
# The error of a sequence whose logits are NaN or infinite: it ends alone, never served as OK.
NOT_FINITE_LOGITS = (
    "the model's logits for this request are not finite (NaN or infinity): its adapter or "
    "adapter_scale made the activations overflow; the request was ended"
)


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence matched
    EOS = "eos"  # the model emitted an end-of-sequence token
    CONTEXT = "context"  # the context window is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        """Whether the token is the (penalized) logits' argmax rather than a draw."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> None:
        """Raise InvalidRequest naming the first field with a value that cannot be served."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidRequest(
                "max_new_tokens",
                f"must be between 1 and {max_new_tokens_limit}, got {self.max_new_tokens}",
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(
                "temperature", f"must be a finite number >= 0, got {self.temperature}"
            )
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty}"
            )
        if any(not s for s in self.stop):
            raise InvalidRequest("stop", "stop sequences must not be empty strings")


@dataclass
class SequenceRequest:
    """A new sequence for the engine to prefill."""

    seq_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | None = None  # None: the base model


@dataclass
class StepPlan:
    """What the engine runs in one step: new prefills, decodes of running ones, and frees."""

    prefill: list[SequenceRequest] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    release: list[str] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One step's result for one sequence."""

    seq_id: str
    token_id: int | None  # None when the sequence ended without a new token
    text: str = ""  # newly decoded text (may be empty while a UTF-8 character is incomplete)
    logprob: float | None = None
    finish: FinishReason | None = None
    error: str | None = None  # with finish=ERROR: what went wrong, for the client
    deferred: bool = False  # not started: the engine cannot take it yet; plan it again later


class Engine(Protocol):
    """What every backend offers the scheduler.

    Threads: `encode`, `decode` and `resources` may be called from any thread; `step`,
    `release`, `running` and `close` only from the one loop thread that owns the engine.

    Errors: a request the engine cannot serve (its adapter, its length, logits that are not
    finite) ends its own row, as a TokenEvent with finish ERROR and the reason; the other
    rows of the step go on. `step` raises only when the step as a whole failed; the
    scheduler then ends that step's sequences and keeps serving.
    """

    max_context: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def step(self, plan: StepPlan) -> list[TokenEvent]: ...

    def release(self, seq_id: str) -> None: ...

    def running(self) -> list[str]: ...

    def resources(self) -> dict[str, int]:
        """What running sequences hold (sequences, cache rows, adapter holds...): all zero
        when idle, so that a soak run can spot leaks."""
        ...

    def close(self) -> None:
        """End every sequence and free what the engine holds; it serves nothing afterwards."""
        ...


class AdapterAdmin(Protocol):
    """Adapter management; the adapter store implements it.

    Threads: `load`, `acquire`, `pin` and `detach` run on the server's loop thread, between
    steps; `list`, `release` and `wait_unused` from any thread. Nothing here waits for room:
    when every resident adapter is pinned or in use, loads raise AdapterCapacityExceeded
    and the scheduler retries them after a release.

    Errors: AdapterNotFound, InvalidAdapter, AdapterInUse, AdapterPinned,
    AdapterCapacityExceeded (loraplex.adapters.errors).
    """

    events: StoreEvents

    def list(self) -> list[AdapterInfo]: ...

    def load(self, adapter_id: str) -> AdapterInfo:
        """Load the adapter, or a newer copy of it (new version); running sequences keep theirs."""
        ...

    def detach(self, adapter_id: str, force: bool = False, if_unused: bool = False) -> None:
        """Make the adapter unknown to new requests (running ones keep their version); with
        `if_unused`, raise AdapterInUse instead while it is in use. A pinned adapter raises
        AdapterPinned (and stays loaded and pinned) unless `force`."""
        ...

    def wait_unused(self, adapter_id: str, timeout: float | None = None) -> None:
        """Wait until no sequence uses the adapter; AdapterInUse when `timeout` runs out."""
        ...

    def pin(self, adapter_id: str, pinned: bool = True) -> AdapterInfo: ...

    def acquire(self, adapter_id: str, scale: float = 1.0) -> AdapterRef:
        """Reference the current version for a new sequence, loading it lazily."""
        ...

    def release(self, ref: AdapterRef) -> None: ...

    def any_in_use(self) -> bool:
        """Whether any sequence holds an adapter: only then can waiting for room succeed."""
        ...
