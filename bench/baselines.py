"""What loraplex is measured against, as engines behind the same gRPC server and scheduler, so a
load benchmark sends them the same trace through the same client-side timing.

`PeftStaticEngine` serves with transformers + PEFT in static batches: a batch starts with the
requests waiting when the previous batch ended (at most `batch_rows`), runs PEFT's own forward
(`set_adapter` when one adapter owns the batch, else its mixed-batch `adapter_names`) until
its longest request ends, and takes no newcomer meanwhile. With `batch_rows=1` it is the naive
server loop: set_adapter, then one request's generation at a time. Greedy decoding only.

One PeftModel holds adapters of one PEFT type only, so a batch takes the waiting requests of
the first one's type (and base rows), and a batch of another type first unloads every adapter
and wraps the base anew, as a PEFT server serving LoRA and VeRA would have to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from loraplex.adapters.peft_format import BaseSpec
from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import (
    FinishReason,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf_model import LINEAR_TYPES, quantization_kwargs
from loraplex.server.errors import InvalidRequest

BASE = "__base__"  # PEFT's adapter name for rows without an adapter in a mixed batch


@dataclass
class _Row:
    request: SequenceRequest
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    names: list[str]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, positions so far]: 0 on left padding


class PeftStaticEngine:
    """Implements loraplex.server.engine.api.Engine with PEFT's own forward passes."""

    def __init__(self, checkpoint: Path, store: AdapterStore, batch_rows: int) -> None:
        config = EngineConfig(checkpoint=checkpoint, quantization="nf4")
        kwargs = quantization_kwargs(config, torch.device("cpu"))
        self.base = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.max_context = int(self.base.config.max_position_embeddings)
        self.store, self.batch_rows = store, batch_rows
        self.model: Any = None  # the PeftModel, made with the first adapter
        self.model_type: str | None = None  # the PEFT type of its adapters
        self.eos = {
            self.tokenizer.eos_token_id,
            *_as_list(self.base.generation_config.eos_token_id),
        }
        self._waiting: list[SequenceRequest] = []
        self._batch: _Batch | None = None
        store.attach_base(base_spec(self.base))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def check_input(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if sampling.output_format is not None:
            raise InvalidRequest("output_format", "this baseline does not constrain its outputs")

    def running(self) -> list[str]:
        rows = self._batch.rows if self._batch else []
        return [r.seq_id for r in self._waiting] + [r.request.seq_id for r in rows if not r.done]

    def resources(self) -> dict[str, int]:
        return {"sequences": len(self.running())}

    def close(self) -> None:
        self._waiting, self._batch = [], None

    def release(self, seq_id: str) -> None:
        self._waiting = [r for r in self._waiting if r.seq_id != seq_id]
        for row in self._batch.rows if self._batch else []:
            row.done = row.done or row.request.seq_id == seq_id

    def step(self, plan: StepPlan) -> list[TokenEvent]:
        for seq_id in plan.release:
            self.release(seq_id)
        self._waiting += plan.prefill
        if self._batch is None or all(row.done for row in self._batch.rows):
            self._batch = None
            if not self._waiting:
                return []
            return self._start([_Row(r) for r in self._take_batch()])
        return self._next_token(self._batch)

    def _take_batch(self) -> list[SequenceRequest]:
        """Up to batch_rows waiting requests, in order, of one PEFT type (or none)."""
        kind = next(filter(None, map(self._peft_type, self._waiting)), None)
        taken: list[SequenceRequest] = []
        left: list[SequenceRequest] = []
        for request in self._waiting:
            fits = len(taken) < self.batch_rows and self._peft_type(request) in (None, kind)
            (taken if fits else left).append(request)
        self._waiting = left
        return taken

    def _peft_type(self, request: SequenceRequest) -> str | None:
        return None if request.adapter is None else self.store.get(request.adapter).peft_type

    def _start(self, rows: list[_Row]) -> list[TokenEvent]:
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = [[0] * (width - len(r.request.prompt_ids)) + r.request.prompt_ids for r in rows]
        mask = [[0] * (width - len(r.request.prompt_ids)) + [1] * len(r.request.prompt_ids)
                for r in rows]  # fmt: skip
        names = [self._adapter_name(r.request) for r in rows]
        self._batch = _Batch(rows, names, DynamicCache(), torch.tensor(mask))
        return self._forward(self._batch, torch.tensor(ids))

    def _next_token(self, batch: _Batch) -> list[TokenEvent]:
        last = [[r.tokens[-1] if r.tokens else 0] for r in batch.rows]
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=torch.long)], 1)
        return self._forward(batch, torch.tensor(last))

    def _forward(self, batch: _Batch, ids: torch.Tensor) -> list[TokenEvent]:
        positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        with torch.inference_mode(), self._adapters(batch.names) as extra:
            out = self._model_or_base()(
                input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                past_key_values=batch.cache, use_cache=True, logits_to_keep=1, **extra,
            )  # fmt: skip
        picks = out.logits[:, -1].argmax(-1).tolist()
        return [self._advance(row, token) for row, token in zip(batch.rows, picks, strict=True)
                if not row.done]  # fmt: skip

    def _advance(self, row: _Row, token: int) -> TokenEvent:
        row.tokens.append(token)
        finish = None
        if token in self.eos:
            finish = FinishReason.EOS
        elif len(row.tokens) >= row.request.sampling.max_new_tokens:
            finish = FinishReason.LENGTH
        row.done = finish is not None
        return TokenEvent(row.request.seq_id, token, self.decode([token]), finish=finish)

    # ---- adapters: loaded into the PeftModel on first use, by id and version ------------

    def _adapter_name(self, request: SequenceRequest) -> str:
        ref = request.adapter
        if ref is None:
            return BASE
        name = f"{ref.adapter_id}.v{ref.version}".replace(".", "_")
        adapter = self.store.get(ref)
        path = adapter.path
        if self.model is not None and adapter.peft_type != self.model_type:
            self.base = self.model.unload()  # every adapter out; the plain base back
            self.model = None
        self.model_type = adapter.peft_type
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        elif name not in self.model.peft_config:
            self.model.load_adapter(path, adapter_name=name)
        return name

    def _model_or_base(self) -> Any:
        return self.model if self.model is not None else self.base

    @contextlib.contextmanager
    def _adapters(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """set_adapter when one adapter owns the batch; PEFT's mixed batch otherwise."""
        if self.model is None:
            yield {}
        elif len(set(names)) > 1:
            yield {"adapter_names": names}
        elif names[0] == BASE:
            with self.model.disable_adapter():
                yield {}
        else:
            self.model.set_adapter(names[0])
            yield {}


def base_spec(model: torch.nn.Module) -> BaseSpec:
    """The adaptable linear layers, as the hf engine names them, for adapter validation."""
    shapes = {
        name: (int(m.in_features), int(m.out_features))
        for name, m in model.named_modules()
        if type(m).__name__ in LINEAR_TYPES and ".layers." in f".{name}"
    }
    model_type = str(getattr(model.config, "model_type", "unknown"))
    return BaseSpec(model_type, shapes, max_rank=1024)


def _as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else [value]
