"""Token-level fusion (paper Algorithm 3): Top-k of the plan, renormalised weights, mixture,
sampling. Pure functions over numpy arrays; no I/O.

**Mass outside an expert's top-k.** An agent returns its top ``dist_k`` tokens and the mass
``rest`` outside them. When experts return different ids, the fused distribution is computed over
the union U of returned ids; for a token in U that expert n did not return, its probability under
n is taken as ``rest_n / (V - k_n)`` -- the rest mass spread uniformly over the tokens it did not
return (the maximum-entropy choice, and the only one that needs nothing but what was sent). The
mixture is then renormalised over U for sampling. With ``dist_k = 0`` (full vocabulary) nothing is
approximated and F = sum_n w_n f_n exactly (eq. 3).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def top_k_weights(
    gates: Mapping[str, float], candidates: Sequence[str], k: int | None
) -> dict[str, float]:
    """Sort ``candidates`` by gating value, keep the Top-k with positive value, renormalise
    (eq. 2 / eq. 28). Ties keep the candidates' order. Empty when nobody has weight."""
    scored = [(gates.get(c, 0.0), i, c) for i, c in enumerate(candidates)]
    scored = [s for s in scored if s[0] > 0.0 and np.isfinite(s[0])]
    scored.sort(key=lambda s: (-s[0], s[1]))
    if k is not None and k > 0:
        scored = scored[:k]
    total = sum(s[0] for s in scored)
    if total <= 0.0:
        return {}
    return {c: g / total for g, _i, c in scored}


def renormalise(weights: Mapping[str, float], keep: Sequence[str]) -> dict[str, float]:
    """Weights of the experts still in the request after some were dropped."""
    total = sum(weights[c] for c in keep if c in weights)
    if total <= 0.0:
        return {}
    return {c: weights[c] / total for c in keep if c in weights}


@dataclass(frozen=True)
class ExpertDist:
    """One expert's next-token distribution as sent: ids (None = the full vocabulary in id
    order), their probabilities, and the mass outside them."""

    probs: npt.NDArray[np.floating]
    ids: npt.NDArray[np.integer] | None
    rest_mass: float = 0.0


@dataclass(frozen=True)
class Fused:
    ids: IntArray  # ascending
    probs: FloatArray  # over ``ids``, sums to 1

    def argmax(self) -> int:
        # Highest probability, ties to the lowest token id (deterministic greedy): argmax
        # takes the first maximum and the ids ascend.
        return int(self.ids[int(np.argmax(self.probs))])


@functools.lru_cache(maxsize=8)
def _all_ids(n_vocab: int) -> IntArray:
    """0..n_vocab-1, shared and read-only (a full-vocabulary mix needs it every token)."""
    ids = np.arange(n_vocab, dtype=np.int64)
    ids.setflags(write=False)
    return ids


def mix(dists: Sequence[tuple[float, ExpertDist]], n_vocab: int) -> Fused:
    """F = sum_n w_n f_n over the union of returned ids (see the module docstring)."""
    if not dists:
        raise ValueError("nothing to mix")
    if all(d.ids is None for _w, d in dists):
        # two passes a expert, one to normalise, two arrays: at 152k ids a step's mix is
        # ~0.5 ms (float64 temporaries per expert cost 3-9 ms, mostly page faults)
        acc = np.zeros(n_vocab, dtype=np.float64)
        scaled = np.empty(n_vocab, dtype=np.float64)
        for w, d in dists:
            n = min(n_vocab, d.probs.shape[0])
            np.multiply(d.probs[:n], w, out=scaled[:n], dtype=np.float64)
            acc[:n] += scaled[:n]
        acc /= acc.sum()
        return Fused(_all_ids(n_vocab), acc)
    union = np.unique(np.concatenate([
        np.arange(n_vocab, dtype=np.int64) if d.ids is None else d.ids.astype(np.int64)
        for _w, d in dists
    ]))
    acc = np.zeros(union.shape[0], dtype=np.float64)
    for w, d in dists:
        if d.ids is None:
            acc += w * d.probs.astype(np.float64)[union]
            continue
        k = d.ids.shape[0]
        fill = d.rest_mass / max(1, n_vocab - k)
        row = np.full(union.shape[0], fill, dtype=np.float64)
        pos = np.searchsorted(union, d.ids.astype(np.int64))
        row[pos] = d.probs.astype(np.float64)
        acc += w * row
    total = acc.sum()
    if total <= 0.0 or not np.isfinite(total):
        raise ValueError("fused distribution has no mass")
    return Fused(union, acc / total)


def sample(fused: Fused, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise p^(1/T), nucleus ``top_p`` (the most probable ids,
    ties to the lower id, until their mass reaches ``top_p``), one uniform draw from ``rng``
    through the cumulative distribution.

    Only the nucleus is sorted: it lies among the ids with p ≥ t for a threshold t lowered
    until their mass reaches ``top_p`` (a full-vocabulary sort is 15 ms at 152k ids)."""
    if not temperature > 1e-6:  # 0, tiny (p^(1/T) would overflow) or NaN: greedy
        return fused.argmax()
    return int(fused.ids[draw(fused.probs, temperature, top_p, rng)])


def draw(weights: FloatArray, temperature: float, top_p: float, rng: np.random.Generator
         ) -> int:
    """The position drawn from ``weights`` (any positive scale) sharpened to p^(1/T) and cut
    to the nucleus ``top_p``: the sampling rule of both fusion paths (see :func:`sample`)."""
    p = weights
    if temperature != 1.0:
        logp = np.log(np.maximum(p, 1e-300))
        logp /= temperature
        logp -= logp.max()
        p = np.exp(logp, out=logp)
    total = float(p.sum())
    if top_p < 1.0:
        order = _nucleus(p, top_p * total)
        cdf = np.cumsum(p[order])
        pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")),
                   order.shape[0] - 1)
        return int(order[pick])
    cdf = np.cumsum(p)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")),
               int(p.shape[0]) - 1)


def _nucleus(p: FloatArray, mass: float) -> IntArray:
    """Positions of the shortest prefix of p sorted by descending value (ties: lower position
    first) whose sum reaches ``mass``."""
    top = float(p.max())
    threshold = top
    while True:
        cand = np.flatnonzero(p >= threshold)
        if float(p[cand].sum()) >= mass or threshold <= 0.0:
            break
        threshold = threshold / 16.0 if threshold > 1e-300 else 0.0
    order = cand[np.argsort(-p[cand], kind="stable")]
    cut = int(np.searchsorted(np.cumsum(p[order]), mass) + 1)
    return order[:cut]
