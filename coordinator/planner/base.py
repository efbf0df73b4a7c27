"""The planner's vocabulary: methods, bounds and constants, errors, bitmask helpers."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
MaskArray = npt.NDArray[np.uint64]

Method = Literal["smo", "exact", "exhaustive", "greedy", "random"]
METHODS: Final[tuple[Method, ...]] = ("smo", "exact", "exhaustive", "greedy", "random")

#: Mixture probabilities are clipped here before the log, so every loss is finite (≤ 27.7 nats).
PROB_FLOOR: Final = 1e-12
#: Bitmasks are 64-bit.
MAX_EXPERTS: Final = 64
#: Default SMO tolerance ε, in loss units (nats per token).
DEFAULT_EPSILON: Final = 1e-6
#: Default cap on SMO expansions (popped lattice nodes); past it SMO returns its incumbent.
DEFAULT_MAX_EXPANSIONS: Final = 1000
#: ``exhaustive`` refuses more candidate experts than this (2^20 subsets).
EXHAUSTIVE_MAX_EXPERTS: Final = 20

# Energy sums are compared with a relative slack so that the same set is feasible whichever
# way (vectorised or scalar) its energy was summed.
_ENERGY_RTOL: Final = 1e-9
# Upper bound on elements of one temporary (subsets × samples) array in the loss kernels.
_CHUNK_ELEMENTS: Final = 1 << 22
# Exact B&B prunes a node whose bound is within this of the incumbent.
_EXACT_TOL: Final = 1e-12
#: ``exact`` finishes a node by vectorised enumeration when this few experts are undecided.
EXACT_ENUMERATE_BELOW: Final = 16
# ... and does not compute a bound first when even fewer are.
_EXACT_ENUMERATE_NOW: Final = 4


class PlannerError(ValueError):
    """Bad planner input, or a request the chosen method refuses (e.g. exhaustive over N > 20)."""


# --------------------------------------------------------------------------------------------
# bitmask helpers


def members(mask: int) -> list[int]:
    """Indices of the set bits of ``mask``, ascending."""
    out: list[int] = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def mask_of(indices: Iterable[int]) -> int:
    """The bitmask with exactly the bits ``indices`` set."""
    mask = 0
    for n in indices:
        mask |= 1 << int(n)
    return mask


def mask_bits(masks: Sequence[int] | MaskArray, n_experts: int) -> FloatArray:
    """(len(masks) × n_experts) 0/1 float matrix of the given bitmasks."""
    arr = np.asarray(masks, dtype=np.uint64).reshape(-1)
    shifts = np.arange(n_experts, dtype=np.uint64)
    bits: FloatArray = ((arr[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.float64)
    return bits


def _fractional_knapsack(
    values: FloatArray, weights: FloatArray, capacity: float
) -> tuple[float, int]:
    """Best value of a fractional knapsack, and the position of the best value-per-weight item.

    Items of zero weight are always taken whole; items of non-positive value never. Used as an
    upper bound on a subadditive gain under the energy budget.
    """
    useful = values > 0.0
    v = np.where(useful, values, 0.0)
    w = np.where(useful, weights, 0.0)
    safe = np.where(w > 0.0, w, 1.0)
    ratio = np.where(w > 0.0, v / safe, np.inf)
    ratio = np.where(useful, ratio, -1.0)
    # Highest ratio first; among equal ratios (e.g. zero-weight items) the larger value first.
    order = np.lexsort((-v, -ratio))
    v_sorted = v[order]
    w_sorted = w[order]
    cum_w = np.cumsum(w_sorted)
    whole = int(np.searchsorted(cum_w, capacity, side="right"))
    total = float(v_sorted[:whole].sum())
    if whole < len(order) and w_sorted[whole] > 0.0:
        left = capacity - (float(cum_w[whole - 1]) if whole else 0.0)
        total += float(v_sorted[whole]) * max(0.0, left) / float(w_sorted[whole])
    return total, int(order[0])


