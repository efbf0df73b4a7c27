"""Text-mode sessions: an agent following an answer written by experts of other tokenizers.

When a coordinator fuses experts of different vocabulary families, the answer is *text*: every
step it sends each agent the bytes just emitted (``StepItem.append``). The agent keeps its own
tokenisation of prompt + answer, extended only at the end, byte-exact:

* **commit** -- the bytes are exactly one of its tokens (the coordinator names it: a hint), or
  they cannot be the start of any of its tokens any more: its own tokens for them are decoded
  (usually one, never the history), and
* **hold** -- the bytes can still be the start of one of its tokens: they wait as *pending*
  bytes, no decode; its next distribution is the last one *healed*: restricted to the tokens
  whose text begins with the pending bytes, renormalised (what it would say next if it had seen
  them). When most of that mass sits on tokens that are exactly the pending bytes, that token
  is committed at once (the expert thinks its word ends there).

Pure functions over a :class:`PieceIndex` (token texts sorted, prefix ranges by bisection) and
an injected tokenizer; the daemon runs them in its engine thread. Byte-exactness is checked on
every commit: tokens whose texts do not spell the bytes are replaced by single-byte tokens
(SentencePiece ``<0xNN>``, byte-level BPE's 256 byte tokens).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moe2.shared.utf8 import utf8_tail

#: a pending token that holds at least this share of the healed mass is committed at once
COMMIT_EXACT_MASS = 0.5

Tokenize = Callable[[str], list[int]]


class TextModeError(ValueError):
    """Bytes this vocabulary cannot spell (no byte tokens): the expert leaves the request."""


class PieceIndex:
    """Token texts of one vocabulary, sorted for prefix queries."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = pieces
        #: each id's text length (a heal compares them for every token the pending bytes
        #: begin: 53,021 of Qwen2's begin with b" ")
        self.lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        order = sorted((p, i) for i, p in enumerate(pieces) if p)
        self._sorted = [p for p, _ in order]
        self._ids = np.asarray([i for _, i in order], dtype=np.int64)
        self._by_piece: dict[bytes, list[int]] = {}
        for p, i in order:
            self._by_piece.setdefault(p, []).append(i)
        self.byte_ids: dict[int, int] = {}
        for b in range(256):
            ids = self._by_piece.get(bytes([b]))
            if ids:
                self.byte_ids[b] = ids[0]

    def _range(self, prefix: bytes) -> tuple[int, int]:
        lo = bisect.bisect_left(self._sorted, prefix)
        # every text starting with ``prefix`` sorts below prefix + 0xff * 129 (texts are at
        # most 128 bytes)
        hi = bisect.bisect_left(self._sorted, prefix + b"\xff" * 129, lo)
        return lo, hi

    def ids_with_prefix(self, prefix: bytes) -> npt.NDArray[np.int64]:
        """Ids of the tokens whose text begins with ``prefix`` (all non-empty ones for b"")."""
        lo, hi = self._range(prefix)
        return self._ids[lo:hi]

    def extendable(self, prefix: bytes) -> bool:
        """Some token's text begins with ``prefix`` and is longer."""
        lo, hi = self._range(prefix)
        # the texts in the range all begin with ``prefix``; a longer one sorts last
        return hi > lo and len(self._sorted[hi - 1]) > len(prefix)

    def exact(self, text: bytes) -> list[int]:
        return self._by_piece.get(text, [])

    def spell_bytes(self, data: bytes) -> list[int]:
        """Single-byte tokens for ``data`` (the fallback that is always byte-exact)."""
        try:
            return [self.byte_ids[b] for b in data]
        except KeyError as exc:
            raise TextModeError(f"this vocabulary has no token for byte 0x{exc.args[0]:02x}"
                                ) from None



def spell(data: bytes, index: PieceIndex, tokenize: Tokenize) -> list[int]:
    """This vocabulary's tokens for ``data`` in the middle of a text, byte-exact: the
    tokenizer's own tokens when their texts spell ``data`` exactly, else single-byte tokens."""
    if not data:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        toks = tokenize(text)
        if b"".join(index.pieces[t] for t in toks) == data:
            return toks
    return index.spell_bytes(data)


@dataclass(frozen=True)
class AppendPlan:
    """What a text-mode step does to a session: decode ``commit`` (its own tokens for bytes
    now settled), keep ``pending`` bytes for later."""

    commit: tuple[int, ...]
    pending: bytes


def plan_append(pending: bytes, append: bytes, hint: int | None, index: PieceIndex,
                tokenize: Tokenize) -> AppendPlan:
    """How a session that holds ``pending`` follows ``append`` (see the module doc).

    ``hint``: the token the coordinator chose whose text is exactly ``pending + append``. The
    bytes that cannot be settled yet -- an incomplete UTF-8 character, or the last token's text
    while a longer token could still start with it -- stay pending."""
    data = pending + append
    if hint is not None and 0 <= hint < len(index.pieces) and index.pieces[hint] == data:
        return AppendPlan((hint,), b"")
    if index.extendable(data):
        return AppendPlan((), data)
    cut = len(data) - utf8_tail(data)
    head, tail = data[:cut], data[cut:]
    toks = spell(head, index, tokenize)
    if toks and not tail:
        last = index.pieces[toks[-1]]
        if index.extendable(last):  # hold the last token: the next bytes may extend it
            return AppendPlan(tuple(toks[:-1]), last)
    if tail and not index.extendable(tail):
        return AppendPlan(tuple(toks) + tuple(index.spell_bytes(tail)), b"")
    return AppendPlan(tuple(toks), tail)


@dataclass(frozen=True)
class Healed:
    """A distribution conditioned on the pending bytes: the top ``ids`` (texts beginning with
    them, not equal to them), their probabilities, the rest of that mass, and the mass of the
    tokens that are exactly the pending bytes (``exact_mass``, best one ``exact_id``)."""

    ids: npt.NDArray[np.int32]
    probs: npt.NDArray[np.float64]
    rest: float
    exact_mass: float
    exact_id: int | None


def heal(logits: npt.NDArray[np.float32], pending: bytes, index: PieceIndex, k: int
         ) -> Healed:
    """The next-token distribution given that the next token's text begins with ``pending``
    (non-empty; temperature 1 over the true logits; ``k`` = 0: every such token). With no
    pending bytes the ordinary distribution applies (end tokens included)."""
    if not pending:
        raise ValueError("heal() needs pending bytes")
    cand = index.ids_with_prefix(pending)
    if cand.shape[0] == 0:
        raise TextModeError(f"no token begins with the pending bytes {pending!r}")
    x = logits[cand].astype(np.float64)
    x -= x.max()
    p = np.exp(x)
    p /= p.sum()
    exact = index.lengths[cand] == len(pending)
    exact_mass = float(p[exact].sum())
    exact_id = int(cand[exact][int(np.argmax(p[exact]))]) if exact.any() else None
    keep = ~exact
    ids, q = cand[keep], p[keep]
    total = float(q.sum())
    if total <= 0.0:
        return Healed(np.zeros(0, np.int32), np.zeros(0), 0.0, exact_mass, exact_id)
    q = q / total
    if 0 < k < q.shape[0]:
        top = np.argpartition(-q, k - 1)[:k]
        top = top[np.argsort(-q[top], kind="stable")]
    else:
        top = np.argsort(-q, kind="stable")
    probs = q[top]
    rest = float(max(0.0, 1.0 - probs.sum()))
    return Healed(ids[top].astype(np.int32), probs, rest, exact_mass, exact_id)
