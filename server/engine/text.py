"""Incremental detokenization with stop sequences: text is released only once it is final.

Tokens are decoded through the engine's decode callable a few at a time, as vLLM's incremental
detokenizer does: each new token is decoded together with the tokens read just before it and
only the text it adds is kept, so the text equals decoding all the tokens at once (tokenizers
treat a text's first token specially, e.g. dropping its leading space) without decoding the
whole sequence every step. Text ending in a cut UTF-8 character waits for the rest of it, and
text that may be the start of a stop sequence waits until it is not."""

from __future__ import annotations

from collections.abc import Callable, Sequence

INCOMPLETE_CHAR = "\ufffd"  # what decoding yields for a UTF-8 character cut in half


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._tokens: list[int] = []
        self._prefix = 0  # tokens[prefix:read] were decoded last: the context of the next ones
        self._read = 0  # tokens before it are in self._text
        self._text = ""  # final text
        self._emitted = 0  # characters of it already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return newly final text. Sets `stopped` when a stop sequence appears."""
        self._tokens.append(token)
        self._read_new(final=False)
        hit = self._find_stop()
        if hit is not None:
            self.stopped = True
            return self._take(hit)
        return self._take(len(self._text) - self._holdback())

    def flush(self) -> str:
        """The rest of the text, once the sequence has ended."""
        self._read_new(final=True)
        return self._take(len(self._text))

    def _read_new(self, final: bool) -> None:
        context = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        if final or (len(text) > len(context) and not text.endswith(INCOMPLETE_CHAR)):
            self._text += text[len(context) :]
            self._prefix, self._read = self._read, len(self._tokens)

    def _take(self, end: int) -> str:
        piece = self._text[self._emitted : max(end, self._emitted)]
        self._emitted = max(end, self._emitted)
        return piece

    def _find_stop(self) -> int | None:
        """Where the earliest stop sequence starts; emitted text never starts one (held back)."""
        hits = [i for i in (self._text.find(s, self._emitted) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Characters to keep back: the longest unemitted tail that starts a stop sequence."""
        tail = self._text[max(self._emitted, len(self._text) - self._longest) :]
        for start in range(len(tail)):
            if any(s.startswith(tail[start:]) for s in self._stop):
                return len(tail) - start
        return 0
