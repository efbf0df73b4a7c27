"""UTF-8 at the byte level: answers travel as bytes between experts of different tokenizers
(a token may end in the middle of a character)."""

from __future__ import annotations


def utf8_tail(data: bytes) -> int:
    """How many trailing bytes of ``data`` are an incomplete UTF-8 character (0-3)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: look further back
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 \
            else 1
        return back if need > back else 0
    return 0
