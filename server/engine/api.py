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
    "OutputFormat",
    "SamplingParams",
    "SequenceRequest",
    "StepPlan",
    "TokenEvent",
]

MAX_NEW_TOKENS_LIMIT = 1 << 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range, either way
MAX_PENALTY = 2.0  # presence and frequency penalties, either way (OpenAI's range)
OUTPUT_FORMAT_KINDS = ("json_object", "json_schema", "regex", "lark")
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
class OutputFormat:
    """A structure every output of the request must have: `kind` is one of
    OUTPUT_FORMAT_KINDS; `spec` is the JSON schema (as JSON text), the regular expression, or
    the Lark grammar (empty for json_object: any JSON object)."""

    kind: str
    spec: str = ""


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
    min_p: float = 0.0  # 0 disables; tokens below min_p times the top token's probability go
    presence_penalty: float = 0.0  # subtracted once from each token the output already has
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # end the output (reason STOP) without their text
    ignore_eos: bool = False  # go on past end-of-sequence tokens
    top_logprobs: int = 0  # the most probable tokens and log-probabilities at each position
    output_format: OutputFormat | None = None

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
        self._validate_options()

    def _validate_options(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequest(name, f"must be in [-2, 2], got {value}")
        for token, bias in self.logit_bias:
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequest("logit_bias", f"token {token}: must be in [-100, 100]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        fmt = self.output_format
        if fmt is not None and fmt.kind not in OUTPUT_FORMAT_KINDS:
            raise InvalidRequest("output_format", f"unknown kind {fmt.kind!r}")


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
    top_logprobs: list[tuple[int, float]] | None = None  # most probable first
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

    def check_input(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        """Raise InvalidRequest for what this model cannot serve: a prompt too long or with
        token ids outside the vocabulary, options naming such ids, an output format that does
        not compile (compiled here once, then cached). Front ends call it before submitting,
        so that the error comes at once and the loop never compiles."""
        ...

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
