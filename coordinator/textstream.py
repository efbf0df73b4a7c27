"""Token ids -> streamed text, with stop strings.

Pieces are the bytes llama.cpp renders for each id (published by agents on their vocab topic).
Text is decoded incrementally, so a multi-byte UTF-8 character split over byte-fallback tokens
is emitted once complete. When stop strings are set, the last ``max(len(stop)) - 1`` characters
are held back until they can no longer start a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, pieces: Sequence[bytes], stop: Sequence[str] = ()) -> None:
        self._pieces = pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # everything decoded so far (up to a stop string)
        self._emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Append a token; return the newly emitted text ('' when held back)."""
        return self.push_bytes(self._pieces[token] if 0 <= token < len(self._pieces) else b"")

    def push_bytes(self, piece: bytes) -> str:
        """Append bytes (a token's text, or text fused across tokenizers)."""
        if self.stopped:
            return ""
        self.text += self._decoder.decode(piece)
        if self._stop:
            for s in self._stop:
                at = self.text.find(s, max(0, self._emitted - len(s)))
                if at >= 0:
                    self.text = self.text[:at]
                    self.stopped = True
                    return self._emit(len(self.text))
            return self._emit(max(self._emitted, len(self.text) - self._hold))
        return self._emit(len(self.text))

    def flush(self) -> str:
        """End of generation: emit whatever was held back."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self._emitted : upto]
        self._emitted = max(self._emitted, upto)
        return out

