"""The transformers ("hf") engine: one resident base, per-row adapters, continuous batching.

Each step runs at most two forward passes, each batched across adapters: one decode token
for every running sequence, and one prefill of the step's new sequences, whose cache rows
then join the running batch. Finished sequences leave at the end of the step.

The prefill packs its prompts back to back in a single row, not one padded row each: no
work goes into padding, and each prompt's adapter delta is two plain matmuls over its span
(figures in docs/measurements.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from transformers import PreTrainedModel

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.types import AdapterRef
from loraplex.adapters.weights import (
    LoadedAdapter,
    LoraWeights,
    PromptWeights,
    VeraWeights,
    virtual_tokens,
)
from loraplex.server.device import pick_device, torch_threads
from loraplex.server.engine import grammar, packed_attention
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan, TokenEvent
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf_model import LoadedBase, load_base, prepare_base
from loraplex.server.engine.kv_cache import (
    NO_TOKEN,
    BatchKVCache,
    packed_attention_mask,
    packed_positions,
)
from loraplex.server.engine.merge import MergeState, can_merge
from loraplex.server.engine.routing import RoutingContext
from loraplex.server.engine.rows import (
    ModelInfo,
    Row,
    advance_all,
    check_input,
    check_request,
    error_event,
)
from loraplex.server.engine.slots import AdapterSlots, SlotsBusy
from loraplex.server.errors import InvalidRequest

# adapter_mode=auto: one merge plus unmerge of an unquantized base is repaid after a few
# forwards of single ownership; waiting for 4 keeps batches whose make-up flickers from paying
# for merges they cannot repay. NF4 merges cost far more than they save and round the
# weights again (peft #2321), so quantized bases stay batched (docs/measurements.md, Merging).
AUTO_MERGE_AFTER_FORWARDS = 4


@dataclass(frozen=True)
class CpuThreads:
    """torch's intra-op threads for prefill and for decode forwards on the CPU.

    Decode forwards are hundreds of small parallel regions, prefills a few large matmuls, so
    a busy host may want fewer threads for decode. By default both use every thread: with
    the engine stepping on the server's only OpenMP thread pool (see serve.py), decode
    served faster on every core than on one fewer (docs/measurements.md).
    """

    prefill: int | None  # None: torch's setting
    decode: int | None  # None: as many as prefill

    def running(self, *, decode: bool) -> contextlib.AbstractContextManager[None]:
        """The forward's thread count, with what was set before put back afterwards."""
        prefill = self.prefill or torch.get_num_threads()
        return torch_threads((self.decode or prefill) if decode else prefill)


@dataclass
class _Sequence:
    row: Row
    adapter: LoadedAdapter | None
    slot: int

    @property
    def request(self) -> SequenceRequest:
        return self.row.request

    @property
    def tokens(self) -> list[int]:
        return self.row.tokens

    @property
    def ref(self) -> AdapterRef | None:
        return self.request.adapter

    @property
    def soft_prompt(self) -> torch.Tensor | None:
        """The adapter's virtual-token embeddings, if it is a soft prompt."""
        weights = self.adapter.weights if self.adapter else None
        return weights.embeddings if isinstance(weights, PromptWeights) else None

    @property
    def cached(self) -> int:
        """Positions this sequence holds in the cache: its virtual tokens, then its tokens."""
        return self.row.virtual + len(self.row.tokens)


class HFEngine:
    """Implements Engine (loraplex.server.engine.api) on a transformers model."""

    def __init__(self, base: LoadedBase, store: AdapterStore, config: EngineConfig,
                 routing: RoutingContext, device: torch.device) -> None:  # fmt: skip
        self.base, self.store, self.config = base, store, config
        self.model, self.tokenizer = base.model, base.tokenizer
        self.device, self.routing = device, routing
        model_config = base.model.config
        self.max_context = config.max_context or int(model_config.max_position_embeddings)
        self.max_batch_size = config.max_batch_size
        self.slots = AdapterSlots(base.layers, config.adapter_slots)
        self.merges = MergeState(base.layers)
        self._merge_allowed = all(can_merge(layer.base_layer) for layer in base.layers.values())
        self.adapter_mode = self._resolve_mode(config)
        self._owner: AdapterRef | None = None  # the adapter every active row used last forward
        self._owned_forwards = 0  # consecutive forwards it has owned the batch
        self.eos_ids = _eos_ids(base)
        vocab = int(model_config.vocab_size)
        grammars = grammar.for_hf_tokenizer(self.tokenizer, vocab, self.eos_ids)
        self.model_info = ModelInfo(self.max_context, vocab, self.eos_ids.__contains__,
                                    self.decode, device, grammars)  # fmt: skip
        self._layer_windows = _layer_windows(model_config)
        self._sequences: list[_Sequence] = []  # row order of self._cache
        self._cache = self._new_cache()
        cpu = device.type == "cpu"
        self.threads = CpuThreads(config.threads, config.decode_threads) if cpu else None
        store.attach_base(base.spec)

    @classmethod
    def from_config(cls, config: EngineConfig, store: AdapterStore | None = None) -> HFEngine:
        """Load the base once; `store` defaults to one over config.adapter_roots."""
        device = pick_device(None if config.device == "auto" else config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        routing = RoutingContext()
        base = load_base(config, device, routing)
        if store is None:
            store = AdapterStore(
                config.adapter_roots,
                max_resident=config.max_resident_adapters,
                max_resident_bytes=config.max_resident_bytes,
            )
        return cls(base, store, config, routing, device)

    @classmethod
    def around(
        cls, model: PreTrainedModel, tokenizer: Any, config: EngineConfig, store: AdapterStore
    ) -> HFEngine:
        """An engine over a model that is already loaded (a trainer's base, for rollouts): its
        modules become the engine's, over the same weight tensors, so no second copy of the
        base is made. `config.checkpoint` and `config.quantization` are not read."""
        if config.threads:
            torch.set_num_threads(config.threads)
        device = next(model.parameters()).device
        model.set_attn_implementation(packed_attention.register())
        routing = RoutingContext()
        return cls(prepare_base(model, tokenizer, config, routing), store, config, routing, device)

    # ---- Engine protocol ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def check_input(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        check_input(prompt_ids, sampling, self.model_info)

    def running(self) -> list[str]:
        return [s.request.seq_id for s in self._sequences]

    def resources(self) -> dict[str, int]:
        """What running sequences hold; all zero when idle, so a soak run can spot leaks."""
        return {
            "sequences": len(self._sequences),
            "kv_cache_rows": self._cache.rows,
            "adapter_slot_holds": self.slots.holds(),
        }

    def close(self) -> None:
        """Drop every sequence and its cache rows; the weights go with the process."""
        for seq_id in self.running():
            self.release(seq_id)

    def release(self, seq_id: str) -> None:
        """Drop a sequence (finished or cancelled) and its cache rows."""
        rows = [i for i, s in enumerate(self._sequences) if s.request.seq_id != seq_id]
        if len(rows) != len(self._sequences):
            self._keep(rows)

    def step(self, plan: StepPlan) -> list[TokenEvent]:
        for seq_id in plan.release:
            self.release(seq_id)
        events: list[TokenEvent] = []
        if plan.decode:
            with self._threads(decode=True):
                events += self._decode(set(plan.decode))
        if plan.prefill:
            with self._threads(decode=False):
                events += self._prefill(plan.prefill)
        self._keep([i for i, s in enumerate(self._sequences) if s.row.finish is None])
        return events

    def _threads(self, *, decode: bool) -> contextlib.AbstractContextManager[None]:
        return self.threads.running(decode=decode) if self.threads else contextlib.nullcontext()

    # ---- steps --------------------------------------------------------------------------

    def _decode(self, seq_ids: set[str]) -> list[TokenEvent]:
        active = [s.request.seq_id in seq_ids and s.row.finish is None for s in self._sequences]
        if not any(active):
            return []
        pairs = list(zip(self._sequences, active, strict=True))
        tokens = [[s.tokens[-1] if a else 0] for s, a in pairs]
        positions = [[s.cached - 1 if a else NO_TOKEN] for s, a in pairs]
        rows = [s for s, a in zip(self._sequences, active, strict=True) if a]
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        self._cache.begin(pos)
        masks = self._masks(lambda window: self._cache.attention_mask(pos, window, self.base.dtype))
        self._route(rows, self._sequences, active)
        logits = self._forward(self._cache, ids, pos, masks, 1)[:, -1]
        if not all(active):  # a mask copy of [rows, vocab] costs ~3% of a step; skip it if it can
            logits = logits[torch.tensor(active, device=logits.device)]
        return advance_all([s.row for s in rows], logits, self.model_info)

    def _prefill(self, requests: list[SequenceRequest]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        fresh: list[_Sequence] = []
        for request in requests:
            try:
                fresh.append(self._admit(request, fresh))
            except SlotsBusy:
                events.append(TokenEvent(request.seq_id, None, deferred=True))
            except (InvalidRequest, AdapterError) as err:
                events.append(error_event(request.seq_id, str(err)))
        if not fresh:
            return events
        lengths = [s.cached for s in fresh]
        ids = torch.tensor([[t for s in fresh for t in s.tokens]], device=self.device)
        embeds = self._soft_prompted(ids, fresh) if any(s.row.virtual for s in fresh) else None
        pos = packed_positions(lengths, self.device)
        last = torch.tensor(list(accumulate(lengths)), device=self.device) - 1
        masks = self._masks(
            lambda window: packed_attention_mask(lengths, window, self.base.dtype, self.device)
        )
        cache = self._new_cache()
        cache.add_rows(1)
        cache.begin(pos)
        try:
            self._route(fresh, fresh, [True] * len(fresh), packed=lengths)
            logits = self._forward(cache, ids, pos, masks, last, lengths, embeds)[0]
        except Exception:
            for s in fresh:
                self.slots.drop(s.slot)
            raise
        self._cache.extend(cache, lengths)
        self._sequences += fresh
        return events + advance_all([s.row for s in fresh], logits, self.model_info)

    def _admit(self, request: SequenceRequest, fresh: list[_Sequence]) -> _Sequence:
        """Validate a new request and give it an adapter slot (a soft prompt needs none)."""
        running = {s.request.seq_id for s in self._sequences + fresh}
        check_request(request, self.model_info, running, self.max_batch_size)
        adapter = self.store.get(request.adapter) if request.adapter else None
        weights = adapter.weights if adapter else None
        virtual = virtual_tokens(weights)
        if virtual and len(request.prompt_ids) + virtual >= self.max_context:
            raise InvalidRequest(
                "prompt_ids", f"{len(request.prompt_ids)} tokens and the adapter's {virtual} "
                f"virtual tokens do not fit {self.max_context}",
            )  # fmt: skip
        if isinstance(weights, LoraWeights) and weights.uses_dora:
            self.merges.unmerge()  # its gain is computed from the base's own weights
        slot = self.slots.hold(adapter) if adapter and weights and weights.modules else 0
        return _Sequence(Row.start(request, self.model_info, virtual), adapter, slot)

    def _soft_prompted(self, ids: torch.Tensor, fresh: list[_Sequence]) -> torch.Tensor:
        """The packed row's input embeddings with each soft prompt's virtual tokens before its
        prompt's tokens ([1, positions, hidden]), as PEFT's prompt tuning feeds them."""
        tokens = self.model.get_input_embeddings()(ids)[0]
        pieces, start = [], 0
        for seq in fresh:
            prompt = seq.soft_prompt
            if prompt is not None:
                pieces.append(prompt.to(tokens.device, tokens.dtype))
            pieces.append(tokens[start : start + len(seq.tokens)])
            start += len(seq.tokens)
        return torch.cat(pieces)[None]

    # ---- forward ------------------------------------------------------------------------

    def _forward(
        self, cache: BatchKVCache, ids: torch.Tensor, pos: torch.Tensor, masks: object,
        keep: int | torch.Tensor, packed_lengths: list[int] | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One forward through the routing just set; returns the logits of the columns that
        `keep` names (transformers' logits_to_keep) [rows, kept, vocab]. `packed_lengths`:
        the prompts of a packed row, which attention keeps apart (packed_attention.py).
        `embeds`, when soft prompts are in the row, replaces `ids` as the input."""
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        try:
            with torch.inference_mode():
                out = self.model(
                    **inputs,
                    position_ids=pos.clamp(min=0),
                    attention_mask=masks,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=keep,
                    packed_lengths=packed_lengths,
                )
        finally:
            self.routing.clear()
        cache.commit(pos.shape[1])
        return out.logits.float()

    def _masks(self, build: Callable[[int | None], torch.Tensor]) -> object:
        """The attention mask `build(window)`, or one per layer type for sliding models."""
        if self._layer_windows is None:
            return build(None)
        return {kind: build(window) for kind, window in self._layer_windows.items()}

    def _route(
        self, active: list[_Sequence], rows: list[_Sequence], mask: list[bool],
        packed: list[int] | None = None,
    ) -> None:  # fmt: skip
        """Merge one owning adapter, or set per-row slots for the batched deltas (per-prompt
        spans when the rows are prompts `packed` back to back, of these lengths)."""
        refs = {s.ref for s in active}
        owner = next(iter(refs)) if len(refs) == 1 else None
        self._owned_forwards = self._owned_forwards + 1 if owner == self._owner else 1
        self._owner = owner
        if owner is not None and self._should_merge() and _mergeable(active[0].adapter):
            owner_seq = active[0]
            assert owner_seq.adapter is not None
            self.merges.merge(owner, owner_seq.adapter)
            return
        self.merges.unmerge()
        slots = [s.slot if a else 0 for s, a in zip(rows, mask, strict=True)]
        scales = [s.ref.scale if s.ref else 1.0 for s in rows]
        rank = self.slots.rank(set(slots))
        if packed is not None:
            self.routing.set_packed(slots, scales, packed, rank, self.device)
        else:
            self.routing.set(slots, scales, rank, self.device, dtype=self.base.dtype)

    def _should_merge(self) -> bool:
        if self.adapter_mode == "auto":
            return self._owned_forwards >= AUTO_MERGE_AFTER_FORWARDS
        return self.adapter_mode == "merged"

    def _resolve_mode(self, config: EngineConfig) -> str:
        """auto: merge unquantized bases once one adapter has owned the batch a while (see
        AUTO_MERGE_AFTER_FORWARDS); quantized bases stay batched."""
        if config.adapter_mode == "merged" and not self._merge_allowed:
            raise InvalidRequest(
                "adapter_mode", "merged mode needs an nf4 (plain layout), bf16 or fp32 base"
            )
        if config.adapter_mode == "auto":
            unquantized = config.quantization in ("bf16", "fp32")
            return "auto" if unquantized else "batched"
        return config.adapter_mode

    # ---- batch bookkeeping --------------------------------------------------------------

    def _new_cache(self) -> BatchKVCache:
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return BatchKVCache(
            c.num_hidden_layers, c.num_key_value_heads, head_dim, self.device, self.base.dtype
        )

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._sequences):
            return
        kept = set(rows)
        for i, seq in enumerate(self._sequences):
            if i not in kept:
                self.slots.drop(seq.slot)
        order = self._cache.keep_rows(rows)
        self._sequences = [self._sequences[i] for i in order]


def _eos_ids(base: LoadedBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (base.model.generation_config, base.model.config, base.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return frozenset(ids)


def _layer_windows(model_config: object) -> dict[str, int | None] | None:
    """Per layer type, the attention window (None: full), for models with sliding layers."""
    kinds = set(getattr(model_config, "layer_types", None) or ())
    if "sliding_attention" not in kinds:
        return None
    window = int(getattr(model_config, "sliding_window"))  # noqa: B009
    return {kind: window if kind == "sliding_attention" else None for kind in kinds}


def _mergeable(adapter: LoadedAdapter | None) -> bool:
    """LoRA and VeRA merge into the weights; DoRA's gain also scales the base's output, and a
    soft prompt changes no weight."""
    weights = adapter.weights if adapter else None
    if isinstance(weights, LoraWeights):
        return not weights.uses_dora
    return isinstance(weights, VeraWeights)
