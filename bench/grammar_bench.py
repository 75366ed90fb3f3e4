"""`loraplex bench grammar`: the structured-output libraries side by side on the default
model's tokenizer (Gemma 3, 262k tokens), to choose the one the server uses.

    loraplex bench grammar [--repeats 5]

For each library installed (llguidance, xgrammar), each output format (the json-extract
adapter's schema, a nested schema, any JSON object, a regex) and each repeat:
- the tokenizer set-up, once per server start;
- compiling the format and making a matcher for it, as a new request with that format pays
  it (xgrammar compiles eagerly; llguidance in its matcher, lazily as tokens come);
- walking one valid output token by token as the tokenizer splits it: the mask for the next
  token (checked to allow that token), then accepting it. This is the per-token cost that
  lies on the serving loop;
- setting the disallowed tokens' logits to -inf on one row (the library's own kernel, and
  loraplex's unpacking), with the mask met halfway through the json-extract output.
Medians over the repeats; every figure is in the JSON line at the end.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from loraplex.adapters.trainer.tasks import JSON_EXTRACT_SCHEMA
from loraplex.server.engine.grammar import apply_bitmask

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "order": {"type": "integer"},
        "status": {"enum": ["open", "shipped", "closed"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
            },
        },
        "note": {"type": ["string", "null"]},
    },
    "required": ["order", "status", "items"],
}
# name: (kind, spec, a valid output)
FORMATS: dict[str, tuple[str, Any, str]] = {
    "json-extract schema": (
        "json_schema", JSON_EXTRACT_SCHEMA,
        '{"name": "Lars Berg", "age": 77, "city": "Cairo", "job": "chemist"}',
    ),
    "nested schema": (
        "json_schema", NESTED_SCHEMA,
        '{"order": 1042, "status": "shipped", "items": [{"sku": "A-17", "qty": 2}, '
        '{"sku": "B-3", "qty": 1}], "note": null}',
    ),
    "json object": ("json_object", None, '{"city": "Oslo", "tags": ["a", "b"], "n": 3.5}'),
    "regex": ("regex", r"\d{4}-\d{2}-\d{2}", "2026-12-05"),
}  # fmt: skip


class Library(ABC):
    """One structured-output library behind the calls the bench times."""

    name = ""

    @abstractmethod
    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        """Build the library's tables for this tokenizer."""

    @abstractmethod
    def compile(self, kind: str, spec: Any) -> Any:
        """The compiled form of one output format."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher for a compiled format."""

    @abstractmethod
    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        """Write the next token's mask into row 0 of `bitmask`."""

    @abstractmethod
    def accept(self, matcher: Any, token: int) -> bool:
        """Advance the matcher past `token`; whether it was allowed."""

    @abstractmethod
    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the masked-out logits to -inf, in place."""


class LLGuidance(Library):
    name = "llguidance"

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, kind: str, spec: Any) -> Any:
        import llguidance

        if kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        else:
            schema = spec if spec is not None else {"type": "object"}
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        import llguidance.torch

        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar(Library):
    name = "xgrammar"

    def setup(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind == "json_object":
            return self.compiler.compile_builtin_json_grammar()
        return self.compiler.compile_json_schema(json.dumps(spec))

    def matcher(self, compiled: Any) -> Any:
        import xgrammar

        return xgrammar.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask)


LIBRARIES: dict[str, Callable[[], Library]] = {"llguidance": LLGuidance, "xgrammar": XGrammar}


def allowed(bitmask: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)


def walk(
    library: Library, matcher: Any, tokens: list[int], bitmask: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Seconds per token to mask and accept `tokens` in order (raises if one is refused), and
    the mask met halfway."""
    halfway = bitmask
    started = time.perf_counter()
    for i, token in enumerate(tokens):
        library.fill(matcher, bitmask)
        if i == len(tokens) // 2:
            halfway = bitmask.clone()
        if not allowed(bitmask, token) or not library.accept(matcher, token):
            raise AssertionError(f"{library.name} refused token {token} of a valid output")
    return (time.perf_counter() - started) / len(tokens), halfway


def new_matcher(library: Library, kind: str, spec: Any) -> Any:
    return library.matcher(library.compile(kind, spec))


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def measure(library: Library, tokenizer: Any, vocab: int, repeats: int) -> dict[str, Any]:
    setup_s, _ = timed(lambda: library.setup(tokenizer, vocab))
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    formats: dict[str, dict[str, float]] = {}
    masks = []
    for name, (kind, spec, output) in FORMATS.items():
        tokens = tokenizer.encode(output, add_special_tokens=False)
        compile_s, per_token_s = [], []
        for _ in range(repeats):
            seconds, matcher = timed(functools.partial(new_matcher, library, kind, spec))
            compile_s.append(seconds)
            per_token, halfway = walk(library, matcher, tokens, bitmask)
            per_token_s.append(per_token)
        masks.append(halfway)
        formats[name] = {
            "compile_ms": 1e3 * statistics.median(compile_s),
            "mask_accept_us_per_token": 1e6 * statistics.median(per_token_s),
        }
    return {"setup_s": setup_s, "formats": formats, "apply_us": apply_us(library, masks[0])}


def apply_us(library: Library, bitmask: torch.Tensor) -> dict[str, float]:
    """Microseconds to mask one row of float32 logits, by the library and by loraplex."""
    logits = torch.randn(1, bitmask.shape[1] * 32)
    results = {}
    for who, apply in (("library", library.apply), ("loraplex", _loraplex_apply)):
        apply(logits.clone(), bitmask)  # warm-up (torch.compile'd kernels compile here)
        runs = []
        for _ in range(20):
            row = logits.clone()
            seconds, _ = timed(functools.partial(apply, row, bitmask))
            runs.append(seconds)
        results[who] = 1e6 * statistics.median(runs)
    return results


def _loraplex_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    logits[0] = apply_bitmask(logits[0], bitmask[0])


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loraplex bench grammar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from transformers import AutoTokenizer

    from loraplex.server.config import default_cache_dir
    from loraplex.server.models import DEFAULT_MODEL, hf_checkpoint, resolve

    checkpoint = hf_checkpoint(resolve(DEFAULT_MODEL, default_cache_dir()), default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = len(tokenizer)
    results: dict[str, Any] = {"vocab": vocab}
    for name, make in LIBRARIES.items():
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed (pip install {name}); left out")
            continue
        results[name] = measure(make(), tokenizer, vocab, args.repeats)
    report(results)
    return results


def report(results: dict[str, Any]) -> None:
    print(f"vocabulary: {results['vocab']} tokens")
    print(f"{'library':<11} {'format':<20} {'compile ms':>11} {'mask+accept us/token':>21}")
    for name in LIBRARIES:
        if name not in results:
            continue
        r = results[name]
        for fmt, f in r["formats"].items():
            print(f"{name:<11} {fmt:<20} {f['compile_ms']:>11.2f} "
                  f"{f['mask_accept_us_per_token']:>21.1f}")  # fmt: skip
        applied = r["apply_us"]
        print(f"{name:<11} set-up {r['setup_s']:.2f} s; masking a row: library "
              f"{applied['library']:.0f} us, loraplex {applied['loraplex']:.0f} us")  # fmt: skip
    print(json.dumps(results))
