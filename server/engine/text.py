"""Incremental detokenization with stop sequences: text is released only once it is final."""

from __future__ import annotations

from collections.abc import Callable, Sequence

INCOMPLETE_CHAR = "\ufffd"  # what decoding yields for a UTF-8 character cut in half


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._tokens: list[int] = []
        self._emitted = 0  # characters already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return newly final text. Sets `stopped` when a stop sequence appears."""
        self._tokens.append(token)
        text = self._decode(self._tokens)
        hit = self._find_stop(text)
        if hit is not None:
            self.stopped = True
            return self._take(text, hit)
        return self._take(text, len(text) - self._holdback(text))

    def flush(self) -> str:
        """The rest of the text, once the sequence has ended."""
        text = self._decode(self._tokens)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        piece = text[self._emitted : max(end, self._emitted)]
        self._emitted = max(end, self._emitted)
        return piece

    def _find_stop(self, text: str) -> int | None:
        longest = max((len(s) for s in self._stop), default=0)
        start = max(0, self._emitted - longest)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        """Characters to keep back: a partial UTF-8 character or the start of a stop sequence."""
        if text.endswith(INCOMPLETE_CHAR):
            return len(text) - len(text.rstrip(INCOMPLETE_CHAR))
        for size in range(min(len(text), max((len(s) for s in self._stop), default=0)), 0, -1):
            if any(s.startswith(text[-size:]) for s in self._stop):
                return size
        return 0
