"""The GGUF backend: a llama.cpp base with GGUF-LoRA adapters behind the Engine contract.

Sequences share one context, each in its own KV sequence slot. With loraplex's llama.cpp
patch every sequence names its own adapter slot, so a step runs each prompt alone and then
one decode call for every running sequence, whatever their adapters. Without the patch
llama.cpp applies one adapter set to a whole decode call, so a step groups its sequences by
(adapter version, scale) and runs one decode call per group, the group whose adapter set is
already on the context first (one switch fewer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex.adapters.errors import AdapterError, InvalidAdapter
from loraplex.server.engine import gguf_lora_slots, grammar
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan, TokenEvent
from loraplex.server.engine.gguf_adapters import AdapterHandles
from loraplex.server.engine.gguf_lora_slots import LoraSlots, PoolError
from loraplex.server.engine.gguf_runtime import (
    AdapterSet,
    LlamaRuntime,
    RuntimeConfig,
    TokenSlot,
    llama_library,
)
from loraplex.server.engine.rows import (
    ModelInfo,
    Row,
    advance_all,
    check_input,
    check_request,
    error_event,
)
from loraplex.server.errors import InvalidRequest

GroupKey = tuple[str, int, float] | None  # (adapter id, version, scale); None is the base
log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    seq_id: str
    slot: int
    request: SequenceRequest
    row: Row
    pending: list[int]  # tokens to feed on the next run: the prompt, then each new token
    pos: int = 0  # KV position of pending[0]
    adapters: AdapterSet = field(default=())  # the context's set for it (stock llama.cpp path)
    lora_slot: int = 0  # its per-sequence adapter slot (patched llama.cpp); 0: the base

    @property
    def group(self) -> GroupKey:
        ref = self.request.adapter
        return None if ref is None else (ref.adapter_id, ref.version, ref.scale)


@dataclass
class StepStats:
    """What the last step cost, for benchmarks and metrics."""

    decode_calls: int = 0
    adapter_switches: int = 0


class GGUFEngine:
    """Implements loraplex.server.engine.api.Engine on llama-cpp-python; one thread only."""

    def __init__(
        self,
        model_path: Path,
        config: RuntimeConfig | None = None,
        max_lora_rank: int = 64,
        per_sequence_lora: bool = True,
    ) -> None:
        """Adapter versions are served once their files are named to `adapters.add` (the
        adapter store's `prepare` hook does it). `per_sequence_lora=False` keeps stock
        llama.cpp's one adapter set per decode call even where the patched library could mix
        them (benchmarks compare the two)."""
        self._runtime = LlamaRuntime(Path(model_path), config or RuntimeConfig())
        self.max_context = self._runtime.n_ctx_per_seq
        runtime = self._runtime
        grammars = grammar.for_llama_vocab(
            runtime.vocab, runtime.vocab_size, runtime.is_end_of_generation
        )
        self._model = ModelInfo(self.max_context, runtime.vocab_size,
                                runtime.is_end_of_generation, self.decode,
                                torch.device("cpu"), grammars)  # fmt: skip
        self.adapters = AdapterHandles(self._runtime.model, self._before_free)
        self.lora_slots = self._slot_table(max_lora_rank) if per_sequence_lora else None
        self._free_slots = list(range(self._runtime.config.n_seq_max))
        self._sequences: dict[str, _Sequence] = {}
        self.last_step = StepStats()

    def _slot_table(self, max_lora_rank: int) -> LoraSlots | None:
        """Per-sequence adapters when llama.cpp has the patch; else one decode per adapter."""
        api = gguf_lora_slots.bind(llama_library())
        if api is None:
            log.warning(
                "this llama.cpp build lacks per-sequence LoRA (a stock llama-cpp-python): "
                "each step runs one decode call per adapter; scripts/setup.sh builds the "
                "patched one"
            )
            return None
        slots = self._runtime.config.n_seq_max + 1  # one per running sequence, and the base
        return LoraSlots(api, self._runtime.ctx, slots, max_lora_rank)

    def _before_free(self, handle: Any) -> None:
        self._runtime.detach(handle)
        if self.lora_slots is not None:
            self.lora_slots.forget(handle)

    # ---- Engine -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._runtime.tokenize(text)

    def decode(self, token_ids: list[int]) -> str:
        return b"".join(self._runtime.piece(t) for t in token_ids).decode("utf-8", "replace")

    def check_input(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        check_input(prompt_ids, sampling, self._model)

    def running(self) -> list[str]:
        return list(self._sequences)

    @property
    def quantization(self) -> str:
        """The GGUF file's quantization (Q4_K_M, ...), as GetServerInfo reports it."""
        return self._runtime.file_type()

    def resources(self) -> dict[str, int]:
        """What running sequences hold; all zero when idle, so a soak run can spot leaks."""
        return {
            "sequences": len(self._sequences),
            "kv_cache_slots": self._runtime.config.n_seq_max - len(self._free_slots),
            "adapter_holds": self.adapters.holds(),
        }

    def release(self, seq_id: str) -> None:
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return
        self._runtime.forget(seq.slot)
        if self.lora_slots is not None and seq.lora_slot:
            self.lora_slots.assign(seq.slot, 0, 0.0)
            self.lora_slots.release(seq.lora_slot)
        if seq.request.adapter is not None:
            self.adapters.release(seq.request.adapter)
        self._free_slots.append(self._fill_gap(seq.slot))

    def _fill_gap(self, slot: int) -> int:
        """Move the running sequence in the highest slot into the freed `slot`; returns the slot
        that is free now.

        llama.cpp runs one decode over sequences 3, 5 and 6 of a per-sequence KV cache as two
        ubatches ({3}, {5, 6}: each must hold consecutive sequence ids), and each ubatch reads
        every weight again. Keeping running sequences in slots 0..n-1 keeps a step in one."""
        last = max(self._sequences.values(), key=lambda s: s.slot, default=None)
        if last is None or last.slot < slot:
            return slot
        self._runtime.move(last.slot, slot)
        if self.lora_slots is not None and last.lora_slot:
            scale = 0.0 if last.request.adapter is None else last.request.adapter.scale
            self.lora_slots.assign(slot, last.lora_slot, scale)
            self.lora_slots.assign(last.slot, 0, 0.0)
        slot, last.slot = last.slot, slot
        return slot

    def step(self, plan: StepPlan) -> list[TokenEvent]:
        for seq_id in plan.release:
            self.release(seq_id)
        events: list[TokenEvent] = []
        runnable: list[_Sequence] = []
        for request in plan.prefill:
            try:
                runnable.append(self._start(request))
            except (InvalidRequest, AdapterError) as err:  # it ends alone, as on every backend
                events.append(error_event(request.seq_id, str(err)))
        for seq_id in plan.decode:
            if seq_id in self._sequences:
                runnable.append(self._sequences[seq_id])
            else:
                events.append(error_event(seq_id, f"decode: {seq_id!r} is not running"))
        self.last_step = StepStats()
        if self.lora_slots is not None:  # every token brings its own adapter
            return events + self._run(runnable, ())
        for group in self._ordered_groups(runnable):
            events.extend(self._run(group, group[0].adapters))
        return events

    # ---- admission checks ---------------------------------------------------------------

    def check(self, request: SequenceRequest) -> None:
        """Raise the typed error that `request` would meet in `step`, before it is queued."""
        check_request(request, self._model, self._sequences, self._runtime.config.n_seq_max)
        if request.adapter is not None:
            self.adapters.check(request.adapter)

    # ---- execution ----------------------------------------------------------------------

    def _start(self, request: SequenceRequest) -> _Sequence:
        self.check(request)
        seq = _Sequence(
            seq_id=request.seq_id,
            slot=self._take_free_slot(),
            request=request,
            row=Row.start(request, self._model),
            pending=list(request.prompt_ids),
        )
        self._sequences[request.seq_id] = seq
        ref = request.adapter
        if ref is None:
            return seq
        handle = self.adapters.acquire(ref)
        if self.lora_slots is None:
            seq.adapters = ((handle, ref.scale),)
            return seq
        try:
            seq.lora_slot = self.lora_slots.hold(handle)
        except PoolError as err:
            self.release(seq.seq_id)
            raise InvalidAdapter(ref.adapter_id, f"it fits no adapter slot: {err}") from None
        self.lora_slots.assign(seq.slot, seq.lora_slot, ref.scale)
        return seq

    def _take_free_slot(self) -> int:
        slot = min(self._free_slots)  # right after the running ones (see _fill_gap)
        self._free_slots.remove(slot)
        return slot

    def _run(self, seqs: list[_Sequence], decode_adapters: AdapterSet) -> list[TokenEvent]:
        """The prompts that share an adapter slot in one decode call per slot, then every
        sequence's single new token in one decode call with `decode_adapters`.

        Prompts on different slots do not share a call: the patch multiplies a mixed prefill
        through mul_mat_id, whose rounding then moved served rows away from their solo runs.
        Prompts on one slot take that slot's own matrices through ggml_mul_mat, the stock
        adapter path's kernels, so they round as a stock run does."""
        prompts: dict[int, list[_Sequence]] = {}
        decodes = []
        for seq in seqs:
            if len(seq.pending) > 1:
                prompts.setdefault(seq.lora_slot, []).append(seq)
            else:
                decodes.append(seq)
        events = []
        for group in prompts.values():
            events += self._run_batch(group, group[0].adapters)
        return events + self._run_batch(decodes, decode_adapters)

    def _run_batch(self, batch: list[_Sequence], adapters: AdapterSet) -> list[TokenEvent]:
        if not batch:
            return []
        # sorted now, as a sequence that ended earlier in the step moved another into its slot:
        # llama.cpp cuts a ubatch where the sequence ids are not consecutive
        batch.sort(key=lambda seq: seq.slot)
        rows = self._decode_batch(batch, adapters)  # views, valid until the next decode
        logits = [torch.from_numpy(row) for row in rows]
        events = advance_all([seq.row for seq in batch], logits, self._model)
        for seq in batch:
            seq.pos += len(seq.pending)
            seq.pending = seq.row.tokens[-1:]
            if seq.row.finish is not None:
                self.release(seq.seq_id)
        return events

    def _decode_batch(self, batch: list[_Sequence], adapters: AdapterSet) -> list[np.ndarray]:
        if self._runtime.set_adapters(adapters):
            self.last_step.adapter_switches += 1
        self.last_step.decode_calls += 1
        return self._runtime.decode([slot for seq in batch for slot in self._slots(seq)])

    def _ordered_groups(self, runnable: Iterable[_Sequence]) -> list[list[_Sequence]]:
        """Sequences grouped by adapter set; the set already on the context goes first."""
        groups: dict[GroupKey, list[_Sequence]] = {}
        for seq in runnable:
            groups.setdefault(seq.group, []).append(seq)
        current = self._runtime.current_adapters
        return sorted(groups.values(), key=lambda group: group[0].adapters != current)

    @staticmethod
    def _slots(seq: _Sequence) -> list[TokenSlot]:
        last = len(seq.pending) - 1
        return [
            TokenSlot(token, seq.pos + i, seq.slot, i == last)
            for i, token in enumerate(seq.pending)
        ]

    def close(self) -> None:
        for seq_id in list(self._sequences):
            self.release(seq_id)
        self.adapters.close()
        self._runtime.close()
