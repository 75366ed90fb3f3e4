"""The llama-cpp-python baseline: one `Llama` holding at most one LoRA, built anew whenever the
next request wants another adapter, serving one request at a time.

This is what llama-cpp-python offers out of the box (`Llama(model_path, lora_path=...)`): an
adapter is fixed when the model is constructed, so switching adapters means reloading. It
implements loraplex.server.engine.api.Engine so the load benchmark can put it behind the same
gRPC server, scheduler and client-side timing as loraplex. Greedy decoding only.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.bench.plain_llama import plain_llama
from loraplex.server.engine.api import (
    AdapterRef,
    FinishReason,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.errors import InvalidRequest

AdapterFiles = Callable[[AdapterRef], Path]  # adapter version -> its GGUF-LoRA file


@dataclass
class _Current:
    request: SequenceRequest
    tokens: Generator[int, Any, None]
    count: int = 0


class LlamaReloadEngine:
    def __init__(self, model_path: Path, adapter_files: AdapterFiles, n_ctx: int = 2048,
                 n_threads: int | None = None) -> None:  # fmt: skip
        self.model_path, self.adapter_files = model_path, adapter_files
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self.reloads = 0
        self._lora: Path | None = None
        self._llama = self._load(None)
        # encode runs on the server's request threads while step() may be rebuilding _llama,
        # so text goes through a vocabulary-only model that is never closed.
        self._vocab = plain_llama(str(model_path), vocab_only=True, verbose=False)
        self.max_context = n_ctx
        self._waiting: list[SequenceRequest] = []
        self._current: _Current | None = None

    def _load(self, lora: Path | None) -> Any:
        self._lora = lora
        return plain_llama(
            str(self.model_path), lora_path=str(lora) if lora else None, n_ctx=self.n_ctx,
            n_threads=self.n_threads, verbose=False,
        )  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return list(self._vocab.tokenize(text.encode(), add_bos=True, special=True))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(self._vocab.detokenize(token_ids)).decode("utf-8", errors="replace")

    def check_input(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if sampling.output_format is not None:
            raise InvalidRequest("output_format", "this baseline does not constrain its outputs")

    def running(self) -> list[str]:
        current = [self._current.request.seq_id] if self._current else []
        return current + [r.seq_id for r in self._waiting]

    def resources(self) -> dict[str, int]:
        return {"sequences": len(self.running())}

    def close(self) -> None:
        self._waiting, self._current = [], None
        self._llama.close()

    def release(self, seq_id: str) -> None:
        self._waiting = [r for r in self._waiting if r.seq_id != seq_id]
        if self._current and self._current.request.seq_id == seq_id:
            self._current = None

    def step(self, plan: StepPlan) -> list[TokenEvent]:
        for seq_id in plan.release:
            self.release(seq_id)
        self._waiting += plan.prefill
        if self._current is None:
            if not self._waiting:
                return []
            self._current = self._start(self._waiting.pop(0))
        return [self._next_token(self._current)]

    def _start(self, request: SequenceRequest) -> _Current:
        lora = self.adapter_files(request.adapter) if request.adapter else None
        if lora != self._lora:
            self._llama.close()
            self._llama = self._load(lora)
            self.reloads += 1
        tokens = self._llama.generate(request.prompt_ids, top_k=1, temp=0.0, reset=True)
        return _Current(request, tokens)

    def _next_token(self, current: _Current) -> TokenEvent:
        token = next(current.tokens)
        current.count += 1
        finish = None
        if self._is_end_of_generation(token):
            finish = FinishReason.EOS
        elif current.count >= current.request.sampling.max_new_tokens:
            finish = FinishReason.LENGTH
        if finish is not None:
            self._current = None
        return TokenEvent(current.request.seq_id, token, self.decode([token]), finish=finish)

    def _is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab._model.vocab, token))
