"""A model-free Engine and AdapterAdmin for scheduler and service tests.

Tokens are a pure function of (prompt, adapter, position), so a test can compute what any
request must receive no matter how it was batched. A character is one token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from loraplex.adapters.errors import (
    AdapterCapacityExceeded,
    AdapterInUse,
    AdapterNotFound,
    AdapterPinned,
    InvalidAdapter,
)
from loraplex.adapters.types import StoreEvents
from loraplex.server.engine.api import (
    AdapterInfo,
    AdapterRef,
    FinishReason,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.errors import InvalidRequest

VOCAB = "abcdefghijklmnopqrstuvwxyz "
EOS_ID = 1000


def expected_token(prompt_ids: list[int], adapter: AdapterRef | None, position: int) -> int:
    """The token a sequence gets at `position`; depends on adapter id and version."""
    salt = 0 if adapter is None else sum(map(ord, adapter.adapter_id)) * 7 + adapter.version
    return (sum(prompt_ids) + salt + 31 * position) % len(VOCAB)


@dataclass
class _Seq:
    request: SequenceRequest
    produced: int = 0


@dataclass
class FakeEngine:
    max_context: int = 128
    eos_after: int | None = None  # emit EOS after this many tokens, if set
    fail_next_step: bool = False
    gate: threading.Event | None = None  # when set, each step waits for it to open
    step_s: float = 0.0  # each step takes this long, leaving the loop free between steps
    plans: list[StepPlan] = field(default_factory=list)
    seqs: dict[str, _Seq] = field(default_factory=dict)
    encode_calls: int = 0

    def encode(self, text: str) -> list[int]:
        self.encode_calls += 1
        return [VOCAB.index(c) if c in VOCAB else len(VOCAB) for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(VOCAB[t] if 0 <= t < len(VOCAB) else "?" for t in token_ids)

    def check_input(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if sampling.output_format is not None:
            raise InvalidRequest("output_format", "the fake engine has no grammars")

    def running(self) -> list[str]:
        return list(self.seqs)

    def resources(self) -> dict[str, int]:
        return {"sequences": len(self.seqs)}

    def close(self) -> None:
        self.seqs.clear()

    def release(self, seq_id: str) -> None:
        self.seqs.pop(seq_id, None)

    def step(self, plan: StepPlan) -> list[TokenEvent]:
        if self.gate is not None:
            self.gate.wait()
        time.sleep(self.step_s)
        self.plans.append(plan)
        for seq_id in plan.release:
            self.release(seq_id)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("simulated backend failure")
        for request in plan.prefill:
            assert request.seq_id not in self.seqs, "prefilled twice"
            self.seqs[request.seq_id] = _Seq(request)
        ids = [r.seq_id for r in plan.prefill] + plan.decode
        assert len(set(ids)) == len(ids), "a sequence appears twice in one step"
        return [self._advance(self.seqs[seq_id]) for seq_id in ids]

    def _advance(self, seq: _Seq) -> TokenEvent:
        req = seq.request
        if self.eos_after is not None and seq.produced >= self.eos_after:
            del self.seqs[req.seq_id]
            return TokenEvent(req.seq_id, None, finish=FinishReason.EOS)
        token = expected_token(req.prompt_ids, req.adapter, seq.produced)
        logprob = -seq.produced / 8 if req.sampling.logprobs else None  # known, for the tests
        seq.produced += 1
        finish = None
        if seq.produced >= req.sampling.max_new_tokens:
            finish = FinishReason.LENGTH
        elif len(req.prompt_ids) + seq.produced >= self.max_context:
            finish = FinishReason.CONTEXT
        if finish is not None:
            del self.seqs[req.seq_id]
        return TokenEvent(req.seq_id, token, self.decode([token]), logprob, finish)


@dataclass
class FakeAdapters:
    """An AdapterAdmin over a fixed set of ids; `broken` ids fail validation on load."""

    known: set[str]
    broken: set[str] = field(default_factory=set)
    versions: dict[str, int] = field(default_factory=dict)
    in_use: dict[tuple[str, int], int] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    max_resident: int | None = None  # evict the least recently loaded idle adapter past this
    events: StoreEvents | None = None
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def _info(self, adapter_id: str) -> AdapterInfo:
        version = self.versions.get(adapter_id, 0)
        users = sum(n for (a, _), n in self.in_use.items() if a == adapter_id)
        return AdapterInfo(
            adapter_id, version, "LORA", 4, ("q_proj",), 1024, version > 0,
            adapter_id in self.pinned, users, f"/adapters/{adapter_id}",
        )  # fmt: skip

    def _check(self, adapter_id: str) -> None:
        if adapter_id not in self.known:
            raise AdapterNotFound(adapter_id, "no such adapter under the adapter roots")
        if adapter_id in self.broken:
            raise InvalidAdapter(adapter_id, "lora_A shapes do not match the base model")

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(a) for a in sorted(self.versions)]

    def load(self, adapter_id: str) -> AdapterInfo:
        with self._lock:
            self._check(adapter_id)
            self.versions[adapter_id] = self.versions.get(adapter_id, 0) + 1
            self._evict(keep=adapter_id)
            return self._info(adapter_id)

    def unload(
        self, adapter_id: str, wait: bool = True, timeout: float | None = None, force: bool = False
    ) -> None:
        self.detach(adapter_id, force=force, if_unused=not wait)
        self.wait_unused(adapter_id, timeout)

    def _busy(self, adapter_id: str) -> bool:
        return any(n for (a, _), n in self.in_use.items() if a == adapter_id)

    def detach(self, adapter_id: str, force: bool = False, if_unused: bool = False) -> None:
        with self._lock:
            if adapter_id not in self.versions:
                raise AdapterNotFound(adapter_id, "not loaded")
            if adapter_id in self.pinned and not force:
                raise AdapterPinned(adapter_id)
            if self._busy(adapter_id) and if_unused:
                raise AdapterInUse(adapter_id, "running requests use it")
            del self.versions[adapter_id]
            self.pinned.discard(adapter_id)

    def wait_unused(self, adapter_id: str, timeout: float | None = None) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: not self._busy(adapter_id), timeout):
                raise AdapterInUse(adapter_id, "still in use when the unload timed out")

    def pin(self, adapter_id: str, pinned: bool = True) -> AdapterInfo:
        with self._lock:
            self._check(adapter_id)
            (self.pinned.add if pinned else self.pinned.discard)(adapter_id)
            return self._info(adapter_id)

    def acquire(self, adapter_id: str, scale: float = 1.0) -> AdapterRef:
        with self._lock:
            self._check(adapter_id)
            if adapter_id not in self.versions:
                self.versions[adapter_id] = 1
                self._evict(keep=adapter_id)
            ref = AdapterRef(adapter_id, self.versions[adapter_id], scale)
            key = (adapter_id, ref.version)
            self.in_use[key] = self.in_use.get(key, 0) + 1
            return ref

    def _evict(self, keep: str) -> None:
        """Drop idle, unpinned adapters past max_resident; AdapterCapacityExceeded (and `keep`
        unloaded again) when that is not enough."""
        for victim in list(self.versions):
            if self.max_resident is None or len(self.versions) <= self.max_resident:
                return
            idle = not self._info(victim).in_use and victim not in self.pinned
            if victim != keep and idle:
                del self.versions[victim]
        if self.max_resident is not None and len(self.versions) > self.max_resident:
            del self.versions[keep]
            raise AdapterCapacityExceeded(keep, "every resident adapter is pinned or in use")

    def any_in_use(self) -> bool:
        with self._lock:
            return any(self.in_use.values())

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            key = (ref.adapter_id, ref.version)
            self.in_use[key] -= 1
            self._lock.notify_all()
