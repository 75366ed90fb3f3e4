"""Streaming text of one sequence: token bytes to UTF-8 pieces, with stop sequences held back.

Token pieces can split a UTF-8 character, so bytes wait until they decode. Text that could be
the start of a stop sequence waits too, so a client never sees part of a stop string.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._bytes = b""  # an incomplete UTF-8 character
        self._held = ""  # decoded text not yet emitted (a possible stop-sequence prefix)
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        self._held += self._decodable(piece)
        match = self._first_stop()
        if match is not None:
            self.stopped = True
            text, self._held = self._held[:match], ""
            return text
        keep = self._stop_prefix_length()
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return text

    def flush(self) -> str:
        """Everything held back, when the sequence ends for a reason other than a stop."""
        text = self._held + self._bytes.decode("utf-8", errors="replace")
        self._held, self._bytes = "", b""
        return text

    def _decodable(self, piece: bytes) -> str:
        data = self._bytes + piece
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text = data[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._bytes = data[cut:]
            return text
        self._bytes = b""  # not UTF-8 at all: emit replacement characters rather than stall
        return data.decode("utf-8", errors="replace")

    def _first_stop(self) -> int | None:
        found = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the held text that starts some stop sequence."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:n]):
                    longest = n
                    break
        return longest
