"""Fusion across tokenizers: experts of different vocabulary families in one answer.

Within a family (same token texts on every id) the exact mixture over ids applies
(:mod:`.fusion`). Across families ids mean nothing to each other, so the coordinator fuses
*texts*, in the spirit of UniTE's top-k union (Yao et al. 2024, "Determine-Then-Ensemble"):

1. each family's members are mixed exactly over its ids (gate weights renormalised within the
   family): ``q_f(id)``, a token outside every member's top-k getting its share of the rest
   mass spread uniformly (as :func:`.fusion.mix` does);
2. the candidates are the texts of every family's top tokens, continued past the bytes that
   family still holds pending (its agent had no token for them yet, see
   :mod:`moe2.agent.textmode`), and the end of the answer (any family's end-of-generation
   tokens);
3. a candidate text ``c`` scores ``sum_f W_f s_f(c)`` (``W_f`` the family's gate weight):
   ``s_f(c)`` is ``q_f`` of the family's own token for exactly its pending bytes + ``c`` when it
   has one (the exact path's number: fusing two experts of one vocabulary this way picks the
   very tokens the exact path picks); otherwise the mass of its top tokens that begin with ``c``
   (it would go on past ``c``: ``c`` is a fair first step) or, failing that, half the mass of
   its best top token that ``c`` begins with (it would need more tokens for ``c``, and how
   likely it is to write the rest is unknown: 1/2 is its expectation under a uniform prior, and
   keeps ``c`` below the family's own token -- with credit 1, as in UniTE, a family sure of
   "1" would back "11" as much as "1" and a low-weight family's proposal would win the tie);
   otherwise 0;
4. greedy takes the best score; sampling draws from the scores (temperature, top-p).

A token with no text (``<unk>``, a control token that renders as nothing) is never a candidate:
other tokenizers cannot follow it. The exact path may take one; on one vocabulary this is the
only way the two paths can differ (tested).

Every family's agents then follow the chosen bytes in their own tokens (a hint names the
family's token when ``c`` is exactly one). The cost per step grows with the candidates (at most
the families' top-k together), not with any vocabulary: a dictionary lookup per (candidate,
family) and a bisection in each family's sorted candidate texts.

What it costs in quality: where a family splits a word differently, it votes through prefix
credit, which is an estimate (UniTE's sub-token rule); a family whose top-k has nothing
consistent with a candidate abstains on it. Measured on the mixed-tokenizer reproduction in
``BENCHMARKS.md``.
"""

from __future__ import annotations

import bisect
import codecs
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from moe2.coordinator.fusion import ExpertDist, draw

#: the end of the answer, as a candidate
END = None


@dataclass(frozen=True)
class FamilyVocabView:
    """What the coordinator needs of one family's vocabulary: texts, ids by text, end ids."""

    pieces: Sequence[bytes]
    by_piece: Mapping[bytes, tuple[int, ...]]
    eog: frozenset[int]

    @staticmethod
    def build(pieces: Sequence[bytes], eog: frozenset[int]) -> FamilyVocabView:
        by: dict[bytes, list[int]] = {}
        for i, p in enumerate(pieces):
            if p:
                by.setdefault(p, []).append(i)
        return FamilyVocabView(pieces, {p: tuple(v) for p, v in by.items()}, eog)


@dataclass(frozen=True)
class FamilyStep:
    """One family this step: its gate weight, its members' distributions with their weights
    within the family, and the bytes it holds pending."""

    family: str
    weight: float
    members: Sequence[tuple[float, ExpertDist]]
    pending: bytes
    vocab: FamilyVocabView


#: the share of a family's token's mass a longer candidate beginning with it gets
PREFIX_CREDIT = 0.5

#: candidates a family proposes at most (its top tokens by fused probability), whatever the
#: members sent: the per-step cost follows k, never the vocabulary
MAX_CANDIDATES = 64


@dataclass
class _Family:
    step: FamilyStep
    ids: npt.NDArray[np.int64]  # the ids some member returned (sorted), or every id
    q: npt.NDArray[np.float64]  # q_f over ``ids``
    fill: float  # q_f of an id no member returned
    texts: list[bytes]  # sorted continuations of its top ids
    mass: list[float]  # q_f of each text (the best id with that text)
    top: list[int]  # its top ids, best first
    end_mass: float
    q_by_id: dict[int, float] | None  # q_f of the returned ids (None: ``ids`` is every id)
    mass_by_text: dict[bytes, float]  # texts -> mass

    def q_of(self, token: int) -> float:
        if self.q_by_id is None:
            return float(self.q[token]) if 0 <= token < self.q.shape[0] else 0.0
        return self.q_by_id.get(token, self.fill)


def family_mixture(step: FamilyStep) -> _Family:
    """``q_f`` over the ids the members returned (every id when one sent the full
    vocabulary), the fill for any other id, and the family's candidate texts."""
    n = max(1, len(step.vocab.pieces))
    total_w = sum(w for w, _ in step.members) or 1.0
    if any(d.ids is None for _w, d in step.members):
        union = np.arange(n, dtype=np.int64)
    else:
        union = np.unique(np.concatenate([d.ids.astype(np.int64) for _w, d in step.members
                                          if d.ids is not None]))
    acc = np.zeros(union.shape[0], dtype=np.float64)
    fill = 0.0
    k_max = 0
    for weight, d in step.members:
        w = weight / total_w
        if d.ids is None:
            acc += w * d.probs.astype(np.float64)[: union.shape[0]]
            k_max = max(k_max, MAX_CANDIDATES)
            continue
        k = int(d.ids.shape[0])
        k_max = max(k_max, k)
        f = d.rest_mass / max(1, n - k)
        fill += w * f
        row = np.full(union.shape[0], f, dtype=np.float64)
        row[np.searchsorted(union, d.ids.astype(np.int64))] = d.probs.astype(np.float64)
        acc += w * row
    top_n = min(acc.shape[0], max(1, min(k_max, MAX_CANDIDATES)))
    top_pos = np.argpartition(-acc, top_n - 1)[:top_n]
    top_pos = top_pos[np.argsort(-acc[top_pos], kind="stable")]
    eog = step.vocab.eog
    end_mass = 0.0
    if not step.pending and eog:
        is_end = np.isin(union, np.fromiter(eog, dtype=np.int64, count=len(eog)))
        # each end token once: those some member returned, the others at the fill
        end_mass = float(acc[is_end].sum()) + fill * (len(eog) - int(is_end.sum()))
    texts: dict[bytes, float] = {}
    cut = len(step.pending)
    top: list[int] = []
    for pos in top_pos.tolist():
        i = int(union[pos])
        top.append(i)
        piece = step.vocab.pieces[i] if 0 <= i < n else b""
        if i in eog or len(piece) <= cut or not piece.startswith(step.pending):
            continue
        u = piece[cut:]
        texts[u] = max(texts.get(u, 0.0), float(acc[pos]))
    order = sorted(texts)
    full = any(d.ids is None for _w, d in step.members)
    q_by_id = None if full else dict(zip(union.tolist(), acc.tolist(), strict=True))
    return _Family(step, union, acc, fill, order, [texts[t] for t in order], top, end_mass,
                   q_by_id, texts)


def _score(fam: _Family, c: bytes) -> float:
    """``s_f(c)``: see the module doc."""
    exact = fam.step.vocab.by_piece.get(fam.step.pending + c)
    if exact:
        return max(fam.q_of(i) for i in exact)
    lo = bisect.bisect_right(fam.texts, c)  # texts that begin with c (and are longer)
    hi = bisect.bisect_left(fam.texts, c + b"\xff" * 129, lo)
    if hi > lo:
        return float(sum(fam.mass[lo:hi]))
    best = 0.0
    texts = fam.mass_by_text
    for n in range(len(c) - 1, 0, -1):  # the family's tokens that c begins with
        m = texts.get(c[:n])
        if m is not None and m > best:
            best = m
    return PREFIX_CREDIT * best


@dataclass(frozen=True)
class Candidate:
    text: bytes | None  # None: the end of the answer
    score: float
    order: tuple[int, int]  # (family index, token id) of its first proposer: the tie-break


@dataclass(frozen=True)
class CrossChoice:
    """The step's outcome: the bytes emitted (``end``: none, the answer ends) and, per family,
    its token whose text is exactly its pending bytes + those bytes (when it has one)."""

    text: bytes
    end: bool
    hints: Mapping[str, int] = field(default_factory=dict)
    candidates: Sequence[Candidate] = ()


def candidates(steps: Sequence[FamilyStep]) -> tuple[list[Candidate], list[_Family]]:
    fams = [family_mixture(s) for s in steps]
    total_w = sum(s.weight for s in steps) or 1.0
    seen: dict[bytes, tuple[int, int]] = {}
    for fi, f in enumerate(fams):
        cut = len(f.step.pending)
        for i in f.top:
            piece = f.step.vocab.pieces[i] if 0 <= i < len(f.step.vocab.pieces) else b""
            if i in f.step.vocab.eog or not piece.startswith(f.step.pending) or \
                    len(piece) <= cut:
                continue
            seen.setdefault(piece[cut:], (fi, i))
    out = [Candidate(c, sum(s.weight / total_w * _score(f, c)
                            for s, f in zip(steps, fams, strict=True)), order)
           for c, order in seen.items()]
    end = sum(s.weight / total_w * f.end_mass for s, f in zip(steps, fams, strict=True))
    if end > 0.0:
        first_eog = min((min(f.step.vocab.eog) if f.step.vocab.eog else 0) for f in fams)
        out.append(Candidate(END, end, (-1, first_eog)))
    return out, fams


def utf8_continues(tail: bytes, text: bytes) -> bool:
    """Whether ``text`` after ``tail`` (the incomplete character the answer ends with, if any)
    keeps the answer valid UTF-8: what the phone reads is then exactly the bytes the agents
    hold, never a replacement character."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(tail + text, final=False)
    except UnicodeDecodeError:
        return False
    return True


def choose(steps: Sequence[FamilyStep], temperature: float, top_p: float,
           rng: np.random.Generator, utf8_tail: bytes | None = b"") -> CrossChoice:
    """One step of cross-family fusion (see the module doc); ``utf8_tail``: candidates that
    would make the answer invalid UTF-8 after it are not taken (``None``: no such filter, as
    on the exact path -- right when one family follows every step by its own tokens)."""
    cands, fams = candidates(steps)
    cands = [c for c in cands if c.score > 0.0 and math.isfinite(c.score)]
    # the end too: an answer that ends in the middle of a character shows the phone a
    # replacement character the agents never held
    valid = [c for c in cands if utf8_tail is None or (
        not utf8_tail if c.text is END else utf8_continues(utf8_tail, c.text))]
    # no valid candidate (no family's top tokens finish the character): better a replacement
    # character on the phone than no answer
    cands = valid or cands
    if not cands:
        raise ValueError("no candidate has any mass")
    if not temperature > 1e-6:
        best = max(cands, key=lambda c: (c.score, -c.order[0], -c.order[1]))
    else:
        best = cands[draw(np.asarray([c.score for c in cands], dtype=np.float64), temperature,
                          top_p, rng)]
    if best.text is END:
        return CrossChoice(b"", True, {}, cands)
    hints: dict[str, int] = {}
    for f in fams:
        exact = f.step.vocab.by_piece.get(f.step.pending + best.text)
        if exact:
            hints[f.step.family] = max(exact, key=f.q_of)
    return CrossChoice(best.text, False, hints, cands)
