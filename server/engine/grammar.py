"""Structured output through llguidance: each request's output format compiled once for the
model's vocabulary, and a matcher per row that says which tokens may come next.

llguidance was chosen over xgrammar by `loraplex bench grammar` (docs/measurements.md): on
Gemma 3's 262k-token vocabulary it builds its tokenizer tables and compiles a schema faster,
masks a token at a comparable cost, reads a llama.cpp vocabulary directly (the GGUF backend
has no transformers tokenizer), and needs no GPU compiler stack (xgrammar pulls in triton).

Thread rules: `check` on any thread (front ends call it before submitting, so that a bad
format is refused at once and the loop never compiles); `matcher` and everything on a
`Matcher` on the loop thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import llguidance
import llguidance.torch
import numpy as np
import torch

from loraplex.server.engine.api import OutputFormat
from loraplex.server.errors import InvalidRequest

ANY_JSON_OBJECT = '{"type": "object"}'
# Whitespace between JSON tokens is bounded, so that a model cannot loop on it until
# max_tokens (pretty-printing at depth 7 with 4 spaces still fits). A schema's "x-guidance"
# key may set its own "whitespace_pattern" (llguidance applies it over these defaults).
JSON_OPTIONS: Any = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}
COMPILED_CACHE_SIZE = 256  # formats kept compiled; clients usually reuse a few schemas


class Grammars:
    """Output formats compiled for one vocabulary; the tokenizer tables are built at first
    use (about a second for a 262k vocabulary), on the thread that checks the first format."""

    def __init__(self, make_tokenizer: Callable[[], llguidance.LLTokenizer], vocab: int) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.vocab = vocab  # the width of the model's logits
        self._compiled: OrderedDict[OutputFormat, str] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def check(self, fmt: OutputFormat) -> str:
        """The grammar for `fmt`; InvalidRequest naming what is wrong with it."""
        with self._lock:
            if fmt in self._compiled:
                self._compiled.move_to_end(fmt)
                return self._compiled[fmt]
        grammar = self._compile(fmt)
        with self._lock:
            self._compiled[fmt] = grammar
            while len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return grammar

    def _compile(self, fmt: OutputFormat) -> str:
        try:
            grammar = grammar_text(fmt)
        except ValueError as err:
            raise InvalidRequest("output_format", f"{fmt.kind}: {err}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer())
        if problem and not problem.startswith("WARNING"):
            raise InvalidRequest("output_format", f"{fmt.kind}: {problem}")
        return grammar

    def matcher(self, fmt: OutputFormat) -> Matcher:
        return Matcher(llguidance.LLMatcher(self.tokenizer(), self.check(fmt), log_level=0),
                       self.vocab)  # fmt: skip


def for_hf_tokenizer(tokenizer: Any, vocab: int, eos_ids: Iterable[int]) -> Grammars:
    """Grammars over a transformers (fast) tokenizer's vocabulary."""
    eos = sorted(eos_ids)

    def make() -> llguidance.LLTokenizer:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)

    return Grammars(make, vocab)


def for_llama_vocab(llama_vocab: Any, vocab: int, is_eos: Callable[[int], bool]) -> Grammars:
    """Grammars over a llama.cpp model's vocabulary (a `llama_vocab_p`)."""

    def make() -> llguidance.LLTokenizer:
        import llguidance.llamacpp

        eos = [t for t in range(vocab) if is_eos(t)]
        return llguidance.llamacpp.lltokenizer_from_vocab(llama_vocab, vocab, eos)

    return Grammars(make, vocab)


def grammar_text(fmt: OutputFormat) -> str:
    """llguidance's grammar for a format; ValueError when the spec is not even well formed."""
    if fmt.kind in ("json_object", "json_schema"):
        schema = ANY_JSON_OBJECT if fmt.kind == "json_object" else fmt.spec
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if fmt.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(fmt.spec)
    if fmt.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(fmt.spec)
    raise ValueError(f"unknown kind {fmt.kind!r}")


class Matcher:
    """One row's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._matcher = matcher
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        self.vocab = vocab

    def allowed(self) -> torch.Tensor:
        """The tokens that may come next, one bit each (see `apply_bitmask`)."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        return self._bitmask[0]

    def accept(self, token: int) -> None:
        """Advance past `token`; RuntimeError when the grammar refuses it."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the output format refused token {token}: "
                               f"{self._matcher.get_error()}")  # fmt: skip

    @property
    def finished(self) -> bool:
        """Whether nothing but the end of the output may follow."""
        return bool(self._matcher.is_stopped())


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` (one row) with every token whose bit is 0 in `bitmask` (int32 words, token t
    at bit t % 32 of word t // 32) set to -inf; tokens past the mask are disallowed."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little").view(np.bool_)
    allowed = torch.from_numpy(bits[: logits.numel()])
    if allowed.numel() < logits.numel():
        allowed = torch.cat([allowed, allowed.new_zeros(logits.numel() - allowed.numel())])
    # torch.where is one pass; masked_fill would first invert the mask
    return torch.where(allowed.to(logits.device), logits, float("-inf"))
