"""Which experts may serve each application: the subset planner (paper §IV, problems 16 and 19).

Everything here is a pure function over plain data: no I/O, no clock other than the elapsed time
reported with each result, no asyncio. The live coordinator gathers telemetry, calls
:func:`plan_fleet` (or :func:`plan_all`) and publishes what comes back.

Subsets of the N ≤ 64 experts are bitmasks (bit ``n`` set ⇔ expert ``n`` is in the set); Python
``int`` at the API, ``np.uint64`` inside the vectorised kernels.

Loss. A :class:`LossModel` maps subsets to a loss L(S) (nats per token, lower is better) and caches
what it computed. :class:`LossTable` is the paper's eq. 13-15 on calibration data,
L(S) = mean_i −log(Σ_{n∈S} g_{i,n} p_{i,n} / Σ_{n∈S} g_{i,n}), with the inside clipped at
:data:`PROB_FLOOR`. :meth:`LossTable.prior` is the stand-in when there is no calibration data.
The real L is only approximately monotone (Theorem 2 assumes a gate retrained per subset).

Constraints (DESIGN: the INTERSECTION of the latency and energy sets, not the paper's union):
S is feasible iff S ≠ ∅, max_{n∈S} latency_s[n] ≤ the latency budget (seconds per generated token)
and Σ_{n∈S} energy_j[n] ≤ max_energy_j (joules per generated token). The joint plan (problem 16)
uses the smallest application budget; per-application plans use their own budget and the shared
energy budget. Experts that violate a budget on their own can be in no feasible set and are
dropped before any search, so after that only the energy budget can bind.

Methods (all return a :class:`PlanResult`):

``smo``        Algorithm 2 as DESIGN reads it: best-first search down the subset lattice from the
               full set, ε-optimal when L is monotone; a 1-opt polish when it is not (see
               :func:`smo`).
``exact``      branch and bound with a valid lower bound and vectorised enumeration of small
               subtrees; optimal for any L (see :func:`exact`).
``exhaustive`` every subset, vectorised; refuses more than 20 candidate experts.
``greedy``     add the expert with the best loss reduction per joule while feasible.
``random``     the paper's "Rand." baseline: a random maximal feasible subset.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypedDict

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
EXACT_ENUMERATE_BELOW: Final = 14
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


# --------------------------------------------------------------------------------------------
# loss models


class LossModel(ABC):
    """A loss oracle over subsets of ``n_experts`` experts, with a cache and an evaluation count.

    Subclasses implement :meth:`_compute` (vectorised over a 0/1 membership matrix) and, when L is
    not monotone, :meth:`node_bound` for the ``exact`` method. ``monotone`` tells the solvers
    whether L(S) ≥ L(S') for S ⊆ S' is guaranteed (it decides what ``smo`` may claim).
    """

    monotone: ClassVar[bool] = False

    def __init__(self, n_experts: int) -> None:
        if not 1 <= n_experts <= MAX_EXPERTS:
            raise PlannerError(f"need 1 to {MAX_EXPERTS} experts, got {n_experts}")
        self._n = n_experts
        self._cache: dict[int, float] = {}
        self._evaluations = 0

    @property
    def n_experts(self) -> int:
        return self._n

    @property
    def evaluations(self) -> int:
        """How many subset losses were computed so far (cache hits are not counted)."""
        return self._evaluations

    def clear_cache(self) -> None:
        """Forget cached losses (the evaluation count keeps running)."""
        self._cache.clear()

    def losses(self, masks: Iterable[int]) -> FloatArray:
        """L of each bitmask, computing the uncached ones in one vectorised call."""
        keys = [int(m) for m in masks]
        out = np.empty(len(keys), dtype=np.float64)
        missing: list[int] = []
        missing_pos: list[int] = []
        cache = self._cache
        for pos, key in enumerate(keys):
            hit = cache.get(key)
            if hit is None:
                missing.append(key)
                missing_pos.append(pos)
            else:
                out[pos] = hit
        if missing:
            if max(missing) >> self._n or min(missing) < 0:
                raise PlannerError(f"subset mask outside {self._n} experts")
            fresh: dict[int, float] = {}
            for key in missing:  # duplicates inside one call are computed once
                fresh.setdefault(key, 0.0)
            uniq = list(fresh)
            vals = self.evaluate_bits(mask_bits(uniq, self._n))
            for key, val in zip(uniq, vals.tolist(), strict=True):
                cache[key] = val
            for pos, key in zip(missing_pos, missing, strict=True):
                out[pos] = cache[key]
        return out

    def loss(self, mask: int) -> float:
        """L of one bitmask (cached)."""
        return float(self.losses((mask,))[0])

    def evaluate_bits(self, bits: FloatArray) -> FloatArray:
        """L of each row of a 0/1 membership matrix, uncached but counted, in bounded chunks."""
        k = bits.shape[0]
        self._evaluations += k
        if k == 0:
            return np.empty(0, dtype=np.float64)
        step = max(1, _CHUNK_ELEMENTS // max(1, self._row_cost()))
        if k <= step:
            return self._compute(bits)
        return np.concatenate([self._compute(bits[i : i + step]) for i in range(0, k, step)])

    def _row_cost(self) -> int:
        """Temporary elements one subset costs in :meth:`_compute` (sets the chunk size)."""
        return self._n

    @abstractmethod
    def _compute(self, bits: FloatArray) -> FloatArray:
        """L of each row of ``bits`` (k × n_experts, 0/1)."""

    def node_bound(
        self,
        include: int,
        allowed: int,
        energy_j: FloatArray,
        capacity_j: float,
        stop_at: float = math.inf,
    ) -> tuple[float, int]:
        """A lower bound on L(T) over non-empty T with include ⊆ T ⊆ allowed and
        Σ_{n∈T∖include} energy_j[n] ≤ capacity_j, and a suggested expert to branch on (−1: none).

        An implementation may return as soon as its bound reaches ``stop_at`` (the caller prunes
        then). The default, valid only for monotone L, is L(allowed).
        """
        if not self.monotone:
            raise PlannerError(f"{type(self).__name__} is not monotone and defines no lower bound")
        del include, energy_j, capacity_j, stop_at
        return self.loss(allowed), -1


class LossTable(LossModel):
    """The paper's loss on calibration data (eq. 13-15).

    ``gates[i, n] > 0`` is the gate value of expert n on calibration sample (token) i and
    ``target_probs[i, n] ∈ [0, 1]`` the probability expert n gave the reference token.
    L(S) = mean_i −log(max(PROB_FLOOR, Σ_{n∈S} g_{i,n} p_{i,n} / Σ_{n∈S} g_{i,n})); L(∅) is the
    floor's loss. Not monotone in general.
    """

    monotone: ClassVar[bool] = False

    def __init__(self, gates: npt.ArrayLike, target_probs: npt.ArrayLike) -> None:
        g = np.array(gates, dtype=np.float64)
        p = np.array(target_probs, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] < 1 or g.shape[1] < 1:
            raise PlannerError(f"gates must be a non-empty samples×N matrix, got shape {g.shape}")
        if p.shape != g.shape:
            raise PlannerError(f"target_probs shape {p.shape} differs from gates shape {g.shape}")
        if not (np.isfinite(g).all() and np.isfinite(p).all()):
            raise PlannerError("gates and target_probs must be finite")
        if not (g > 0.0).all():
            raise PlannerError("gates must be positive")
        if not ((p >= 0.0) & (p <= 1.0)).all():
            raise PlannerError("target_probs must lie in [0, 1]")
        super().__init__(g.shape[1])
        self._g = g
        self._p = p
        self._gp = g * p
        self._gT = np.ascontiguousarray(g.T)
        self._gpT = np.ascontiguousarray(self._gp.T)
        # −log p per sample and expert, clipped like the mixture: the bound's per-expert cost.
        self._cost = -np.log(np.maximum(p, PROB_FLOOR))
        # Experts of each sample by descending p, for the bound's best-prefix mixture.
        self._order = np.argsort(-p, axis=1, kind="stable")
        self._gp_sorted = np.take_along_axis(self._gp, self._order, axis=1)
        self._g_sorted = np.take_along_axis(g, self._order, axis=1)
        self._floor_loss = -math.log(PROB_FLOOR)

    @property
    def n_samples(self) -> int:
        return int(self._g.shape[0])

    @staticmethod
    def prior(n_experts: int, weights: Sequence[float] | None = None) -> PriorLoss:
        """The loss to plan with before any calibration data exists (see :class:`PriorLoss`)."""
        return PriorLoss(n_experts, weights)

    def select(self, columns: Sequence[int]) -> LossTable:
        """The table restricted to the given expert columns, in that order (a fresh cache)."""
        cols = list(columns)
        return LossTable(self._g[:, cols], self._p[:, cols])

    def _row_cost(self) -> int:
        return 2 * self.n_samples

    def _compute(self, bits: FloatArray) -> FloatArray:
        num = bits @ self._gpT
        den = bits @ self._gT
        mix = np.divide(num, den, out=np.zeros_like(num), where=den > 0.0)
        out: FloatArray = np.mean(-np.log(np.maximum(mix, PROB_FLOOR)), axis=1)
        return out

    def node_bound(
        self,
        include: int,
        allowed: int,
        energy_j: FloatArray,
        capacity_j: float,
        stop_at: float = math.inf,
    ) -> tuple[float, int]:
        """Valid for any L of this form, monotone or not.

        Write T = I ∪ A (I = include, A ⊆ U = allowed ∖ include), ℓ_i = −log mix_I,i and
        gain_i(A) = ℓ_i + log mix_T,i, so L(T) ≥ mean_i ℓ_i − mean_i max(0, gain_i(A)). Bounds on
        the gain, tried from cheap to dear until the bound reaches ``stop_at``:

        1. gain_i ≤ Γ_i = log(m*_i / mix_I,i)⁺, m*_i the best mixture any A ⊆ U reaches on sample i
           alone (a prefix of U sorted by p_{i,n}: fractional programming).
        2. (I ≠ ∅) tangent of log at mix_I: gain_i ≤ (mix_T − mix_I)/mix_I
           ≤ Σ_{n∈A} y_n (p_n − mix_I)⁺ / (mix_I b), with x = g·p, y = g, a = Σ_I x, b = Σ_I y.
        3. (I ≠ ∅) gain_i = log(1 + X_A/a) − log(1 + Y_A/b) ≤ Σ_{n∈A} [log(1 + x_n/a) − κ y_n]: the
           first term is subadditive (concave), the second lies below its chord over
           Y_A ∈ [0, Y_U], κ = log(1 + Y_U/b)/Y_U.
        4. (I = ∅) facility location: gain_i ≤ max_{n∈A} (ℓ_i + log p_{i,n})⁺, subadditive in A.

        Each per-expert sum is capped by Γ_i per sample, averaged, and maximised over the energy
        left by a fractional knapsack. The branching suggestion is the last knapsack's best
        gain-per-joule expert.
        """
        inc = members(include)
        und = members(allowed & ~include)
        n_s = self.n_samples
        if inc:
            a = self._gp[:, inc].sum(axis=1)
            b = self._g[:, inc].sum(axis=1)
            mix_inc = a / b
            ell = -np.log(np.maximum(mix_inc, PROB_FLOOR))
        else:
            a = np.zeros(n_s)
            b = np.zeros(n_s)
            mix_inc = a
            ell = np.full(n_s, self._floor_loss)
        base = float(ell.mean())
        if not und:
            return base, -1
        # 1. m*_i: the best prefix of U by descending p_{i,n}, or I alone.
        in_und = np.zeros(self.n_experts, dtype=np.float64)
        in_und[und] = 1.0
        in_sorted = in_und[self._order]
        cum_x = np.cumsum(self._gp_sorted * in_sorted, axis=1)
        cum_x += a[:, None]
        cum_y = np.cumsum(self._g_sorted * in_sorted, axis=1)
        cum_y += b[:, None]
        ratio = np.divide(cum_x, cum_y, out=np.zeros_like(cum_x), where=cum_y > 0.0)
        best_mix = np.maximum(ratio.max(axis=1), mix_inc)
        cap = np.maximum(ell + np.log(np.maximum(best_mix, PROB_FLOOR)), 0.0)
        gain = float(cap.mean())
        e_und = energy_j[und]
        best = 0
        if inc:
            if base - gain >= stop_at:
                return base - gain, -1
            # 2. tangent
            p_und = self._p[:, und]
            y_und = self._g[:, und]
            scale = mix_inc * b
            tangent = np.divide(
                y_und * np.maximum(p_und - mix_inc[:, None], 0.0),
                scale[:, None],
                out=np.full_like(p_und, np.inf),
                where=scale[:, None] > 0.0,
            )
            knap, best = _fractional_knapsack(
                np.minimum(tangent, cap[:, None]).mean(axis=0), e_und, capacity_j
            )
            gain = min(gain, knap)
            if base - gain >= stop_at:
                return base - gain, und[best]
            # 3. chord
            x_und = self._gp[:, und]
            y_all = y_und.sum(axis=1)
            kappa = np.log1p(y_all / b) / y_all
            xa = np.divide(
                x_und, a[:, None], out=np.full_like(x_und, np.inf), where=a[:, None] > 0.0
            )
            chord = np.log1p(xa) - kappa[:, None] * y_und
            knap, best = _fractional_knapsack(
                np.minimum(np.maximum(chord, 0.0), cap[:, None]).mean(axis=0), e_und, capacity_j
            )
        else:
            # 4. facility location
            gamma = np.maximum(ell[:, None] - self._cost[:, und], 0.0)
            knap, best = _fractional_knapsack(
                np.minimum(gamma, cap[:, None]).mean(axis=0), e_und, capacity_j
            )
        return base - min(gain, knap), und[best]


class PriorLoss(LossModel):
    """A monotone loss to plan with when no calibration data exists.

    Each expert n is taken to give the right token with prior probability
    q_n = ½ · w_n / max(w) (w: positive gate priors, default all equal), independently; a set's
    loss is −log P(at least one member is right) = −log(1 − Π_{n∈S}(1 − q_n)), clipped at
    :data:`PROB_FLOOR`. It strictly decreases when S grows, so ``smo`` is exact on it; with equal
    weights the planner keeps as many experts as the budgets allow.
    """

    monotone: ClassVar[bool] = True

    def __init__(self, n_experts: int, weights: Sequence[float] | None = None) -> None:
        super().__init__(n_experts)
        w = np.ones(n_experts) if weights is None else np.array(weights, dtype=np.float64)
        if w.shape != (n_experts,):
            raise PlannerError(f"prior weights must have {n_experts} entries, got {w.shape}")
        if not (np.isfinite(w).all() and (w > 0.0).all()):
            raise PlannerError("prior weights must be finite and positive")
        self._w = w
        q = 0.5 * w / w.max()
        # a_n = −log(1 − q_n) > 0; a set's loss depends only on a(S) = Σ_{n∈S} a_n.
        self._a = -np.log1p(-q)

    def select(self, columns: Sequence[int]) -> PriorLoss:
        """The prior restricted to the given experts, in that order (a fresh cache)."""
        cols = list(columns)
        return PriorLoss(len(cols), self._w[cols].tolist())

    def _of_a(self, a: FloatArray) -> FloatArray:
        out: FloatArray = -np.log(np.maximum(-np.expm1(-a), PROB_FLOOR))
        return out

    def _compute(self, bits: FloatArray) -> FloatArray:
        return self._of_a(bits @ self._a)

    def node_bound(
        self,
        include: int,
        allowed: int,
        energy_j: FloatArray,
        capacity_j: float,
        stop_at: float = math.inf,
    ) -> tuple[float, int]:
        """a(T) ≤ a(I) + min(a(U), fractional knapsack of a over U), and L falls as a grows."""
        inc = members(include)
        und = members(allowed & ~include)
        del stop_at
        a_inc = float(self._a[inc].sum())
        if not und:
            return float(self._of_a(np.array([a_inc]))[0]), -1
        a_und = self._a[und]
        knap, best = _fractional_knapsack(a_und, energy_j[und], capacity_j)
        a_max = a_inc + min(float(a_und.sum()), knap)
        return float(self._of_a(np.array([a_max]))[0]), und[best]


# --------------------------------------------------------------------------------------------
# the problem and the result


@dataclass(frozen=True, eq=False)
class Problem:
    """One planning instance. Units: seconds and joules per generated token.

    Use :meth:`create` to build one from plain sequences; the constructor validates too.
    """

    names: tuple[str, ...]
    latency_s: FloatArray
    energy_j: FloatArray
    applications: Mapping[str, float]
    max_energy_j: float
    loss: LossModel
    energy_cap_j: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        n = len(names)
        if not 1 <= n <= MAX_EXPERTS:
            raise PlannerError(f"need 1 to {MAX_EXPERTS} experts, got {n}")
        if any(not isinstance(x, str) or not x for x in names):
            raise PlannerError("expert names must be non-empty strings")
        if len(set(names)) != n:
            raise PlannerError("expert names must be unique")
        lat = np.array(self.latency_s, dtype=np.float64).reshape(-1)
        en = np.array(self.energy_j, dtype=np.float64).reshape(-1)
        for label, arr in (("latency_s", lat), ("energy_j", en)):
            if arr.shape != (n,):
                raise PlannerError(f"{label} must have {n} entries, got {arr.shape[0]}")
            if not (np.isfinite(arr).all() and (arr >= 0.0).all()):
                raise PlannerError(f"{label} must be finite and non-negative")
        apps = {str(k): float(v) for k, v in self.applications.items()}
        for app, budget in apps.items():
            if math.isnan(budget) or budget < 0.0:
                raise PlannerError(f"application {app!r}: max_latency_s must be >= 0")
        max_e = float(self.max_energy_j)
        if math.isnan(max_e) or max_e < 0.0:
            raise PlannerError("max_energy_j must be >= 0")
        if self.loss.n_experts != n:
            raise PlannerError(f"loss model covers {self.loss.n_experts} experts, problem has {n}")
        lat.setflags(write=False)
        en.setflags(write=False)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "latency_s", lat)
        object.__setattr__(self, "energy_j", en)
        object.__setattr__(self, "applications", apps)
        object.__setattr__(self, "max_energy_j", max_e)
        object.__setattr__(self, "energy_cap_j", max_e + _ENERGY_RTOL * max(1.0, max_e))

    @classmethod
    def create(
        cls,
        names: Sequence[str],
        latency_s: Sequence[float],
        energy_j: Sequence[float],
        applications: Mapping[str, float],
        max_energy_j: float,
        loss: LossModel | None = None,
    ) -> Problem:
        """Build from plain sequences; ``loss=None`` plans with :meth:`LossTable.prior`."""
        return cls(
            names=tuple(names),
            latency_s=np.array(latency_s, dtype=np.float64),
            energy_j=np.array(energy_j, dtype=np.float64),
            applications=dict(applications),
            max_energy_j=float(max_energy_j),
            loss=LossTable.prior(len(names)) if loss is None else loss,
        )

    @property
    def n_experts(self) -> int:
        return len(self.names)

    @property
    def joint_latency_s(self) -> float:
        """The joint plan's latency budget: every application's at once (inf without any)."""
        return min(self.applications.values(), default=math.inf)

    def candidates(self, max_latency_s: float) -> int:
        """Experts that meet both budgets on their own; no feasible set has any other."""
        ok = (self.latency_s <= max_latency_s) & (self.energy_j <= self.energy_cap_j)
        return mask_of(np.flatnonzero(ok).tolist())

    def latency_of(self, mask: int) -> float:
        idx = members(mask)
        return float(self.latency_s[idx].max()) if idx else 0.0

    def energy_of(self, mask: int) -> float:
        return float(self.energy_j[members(mask)].sum())

    def feasible(self, mask: int, max_latency_s: float) -> bool:
        return (
            mask != 0
            and self.latency_of(mask) <= max_latency_s
            and self.energy_of(mask) <= self.energy_cap_j
        )

    def names_of(self, mask: int) -> tuple[str, ...]:
        return tuple(self.names[n] for n in members(mask))


@dataclass(frozen=True)
class PlanResult:
    """What a method chose under one latency budget.

    ``subset`` is None (and ``loss``, ``latency_s``, ``energy_j`` too) when nothing is feasible.
    ``evaluations``: distinct subsets whose loss this run used; ``computed``: how many of those
    the loss model had to compute (the rest came from its cache). ``nodes``: SMO expansions or
    B&B nodes. ``optimal``: the method proved (ε-)optimality; for ``smo`` only claimed when the loss
    model is monotone. ``bound``: a lower bound on the optimal loss when known. ``capped``: a
    node/expansion cap stopped the search and the result is the best found so far.
    """

    method: str
    max_latency_s: float
    subset: tuple[str, ...] | None
    mask: int
    loss: float | None
    feasible: bool
    latency_s: float | None
    energy_j: float | None
    evaluations: int
    computed: int
    nodes: int
    optimal: bool
    capped: bool
    bound: float | None
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (an infinite budget becomes None)."""
        return {
            "method": self.method,
            "max_latency_s": self.max_latency_s if math.isfinite(self.max_latency_s) else None,
            "subset": None if self.subset is None else list(self.subset),
            "mask": self.mask,
            "loss": self.loss,
            "feasible": self.feasible,
            "latency_s": self.latency_s,
            "energy_j": self.energy_j,
            "evaluations": self.evaluations,
            "computed": self.computed,
            "nodes": self.nodes,
            "optimal": self.optimal,
            "capped": self.capped,
            "bound": self.bound,
            "elapsed_s": self.elapsed_s,
        }


class PlanSet(TypedDict):
    """The joint plan (problem 16) and one plan per application under its own latency budget."""

    joint: PlanResult
    per_application: dict[str, PlanResult]


class _Run:
    """Book-keeping shared by the solvers: budget, evaluation tracking, the result."""

    def __init__(self, problem: Problem, method: str, max_latency_s: float | None) -> None:
        self.problem = problem
        self.method = method
        self.model = problem.loss
        self.budget_s = problem.joint_latency_s if max_latency_s is None else float(max_latency_s)
        if math.isnan(self.budget_s):
            raise PlannerError("max_latency_s must be a number")
        self.cap_j = problem.energy_cap_j
        self.energy = problem.energy_j
        self.candidates = problem.candidates(self.budget_s)
        self.seen: set[int] = set()
        self.uncached_evaluations = 0
        self._computed0 = self.model.evaluations
        self._t0 = time.perf_counter()

    def losses(self, masks: Sequence[int]) -> FloatArray:
        self.seen.update(masks)
        return self.model.losses(masks)

    def loss(self, mask: int) -> float:
        return float(self.losses((mask,))[0])

    def energy_of(self, mask: int) -> float:
        return self.problem.energy_of(mask)

    def feasible(self, mask: int) -> bool:
        return self.problem.feasible(mask, self.budget_s)

    def result(
        self,
        mask: int,
        *,
        loss: float | None = None,
        nodes: int = 0,
        optimal: bool,
        capped: bool = False,
        bound: float | None = None,
    ) -> PlanResult:
        ok = mask != 0 and self.feasible(mask)
        if mask != 0 and not ok:
            logger.warning("%s produced an infeasible set %#x; reporting none", self.method, mask)
        if ok and loss is None:
            loss = self.loss(mask)
        elapsed = time.perf_counter() - self._t0
        if capped:
            logger.info(
                "%s stopped at its cap after %d nodes (budget %.4g s): result may be suboptimal",
                self.method,
                nodes,
                self.budget_s,
            )
        return PlanResult(
            method=self.method,
            max_latency_s=self.budget_s,
            subset=self.problem.names_of(mask) if ok else None,
            mask=mask if ok else 0,
            loss=loss if ok else None,
            feasible=ok,
            latency_s=self.problem.latency_of(mask) if ok else None,
            energy_j=self.energy_of(mask) if ok else None,
            evaluations=len(self.seen) + self.uncached_evaluations,
            computed=self.model.evaluations - self._computed0,
            nodes=nodes,
            optimal=optimal,
            capped=capped,
            bound=bound if ok else None,
            elapsed_s=elapsed,
        )


# --------------------------------------------------------------------------------------------
# methods


def smo(
    problem: Problem,
    max_latency_s: float | None = None,
    *,
    epsilon: float = DEFAULT_EPSILON,
    max_expansions: int = DEFAULT_MAX_EXPANSIONS,
) -> PlanResult:
    """Subset Monotonic Optimization (paper Algorithm 2, realised as DESIGN says).

    Best-first search down the subset lattice. The frontier starts at the full set of candidate
    experts and is ordered by L; popping a set S expands it into S ∖ {n} for every member n whose
    removal can help (energy > 0), skipping sets seen before. Under monotone L a set's loss is a
    lower bound for all its subsets, so a child that is feasible is never expanded (it is a
    candidate incumbent), a child with L ≥ incumbent − ε is pruned, and the search stops when the
    best frontier loss reaches incumbent − ε: the incumbent is then ε-optimal. Every popped set is
    also projected onto the feasible region (the paper's π_G): remove members in increasing order
    of loss increase per joule until the energy fits, then re-add what still fits. The root is
    projected greedily one removal at a time, which gives a strong first incumbent.

    After ``max_expansions`` pops the incumbent is returned with ``capped=True``. If L is not
    monotone (a real :class:`LossTable`: a member with a large gate and a poor distribution can
    make a set worse) the search result is finished by a 1-opt descent (best single removal or
    addition while the loss falls); it is feasible but only a heuristic, claims no optimality and
    no bound; compare with :func:`exact`.
    """
    if epsilon < 0.0:
        raise PlannerError("epsilon must be >= 0")
    if max_expansions < 0:
        raise PlannerError("max_expansions must be >= 0")
    run = _Run(problem, "smo", max_latency_s)
    monotone = run.model.monotone
    root = run.candidates
    if root == 0:
        return run.result(0, optimal=True)
    root_loss = run.loss(root)
    if run.feasible(root):
        if monotone:
            return run.result(root, loss=root_loss, optimal=True, bound=root_loss)
        mask, loss = _polish(run, root, root_loss)
        return run.result(mask, loss=loss, optimal=False)

    # Only the energy budget can bind below the root (every candidate meets the latency budget),
    # so feasibility is tracked by each set's energy.
    energy = run.energy
    cap_j = run.cap_j
    inc_mask, inc_loss = _project_greedy(run, root, root_loss)
    heap: list[tuple[float, int, float]] = [(root_loss, root, run.energy_of(root))]
    seen = {root}
    expansions = 0
    capped = False
    while heap:
        if heap[0][0] >= inc_loss - epsilon:
            break
        if expansions >= max_expansions:
            capped = True
            break
        s_loss, s, s_energy = heapq.heappop(heap)
        expansions += 1
        removable = [n for n in members(s) if energy[n] > 0.0]
        children = [s & ~(1 << n) for n in removable]
        child_losses = run.losses(children)
        for n, child, c_loss in zip(removable, children, child_losses.tolist(), strict=True):
            if child in seen:
                continue
            seen.add(child)
            if c_loss >= inc_loss - epsilon or child == 0:
                continue  # no subset of it can beat the incumbent by more than ε
            c_energy = s_energy - float(energy[n])
            if c_energy <= cap_j:
                inc_mask, inc_loss = child, c_loss
            else:
                heapq.heappush(heap, (c_loss, child, c_energy))
        proj = _project_once(run, s, s_loss, s_energy, removable, child_losses)
        if proj:
            p_loss = run.loss(proj)
            if p_loss < inc_loss:
                inc_mask, inc_loss = proj, p_loss
    frontier = heap[0][0] if heap else math.inf
    bound = min(frontier, inc_loss) if monotone else None
    if not monotone:
        inc_mask, inc_loss = _polish(run, inc_mask, inc_loss)
    return run.result(
        inc_mask,
        loss=inc_loss,
        nodes=expansions,
        optimal=monotone and not capped,
        capped=capped,
        bound=bound,
    )


def _polish(run: _Run, mask: int, loss: float) -> tuple[int, float]:
    """1-opt descent for a non-monotone loss: apply the best single removal or feasible addition
    while it lowers the loss (at most 2 · candidates rounds, each one vectorised batch)."""
    cand = members(run.candidates)
    energy = run.energy
    for _ in range(2 * len(cand)):
        inside = members(mask)
        e_mask = run.energy_of(mask)
        moves = [mask & ~(1 << n) for n in inside] if len(inside) > 1 else []
        moves += [
            mask | (1 << n)
            for n in cand
            if not mask >> n & 1 and e_mask + float(energy[n]) <= run.cap_j
        ]
        if not moves:
            break
        vals = run.losses(moves)
        k = int(np.argmin(vals))
        if not vals[k] < loss - _EXACT_TOL:
            break
        mask, loss = moves[k], float(vals[k])
    return mask, loss


def _refill(run: _Run, kept: int, kept_energy: float, removed: list[int]) -> int:
    """Re-add removed experts, most valuable (last removed) first, while the energy fits."""
    energy_left = run.cap_j - kept_energy
    for n in reversed(removed):
        e_n = float(run.energy[n])
        if e_n <= energy_left:
            kept |= 1 << n
            energy_left -= e_n
    return kept


def _removal_order(
    removable: Sequence[int], s_loss: float, child_losses: FloatArray, energy: FloatArray
) -> list[int]:
    """Members in increasing order of loss increase per joule saved when removed."""
    e = energy[list(removable)]
    delta = child_losses - s_loss
    ratio = delta / e  # removable members have e > 0
    return [removable[k] for k in np.argsort(ratio, kind="stable").tolist()]


def _project_once(
    run: _Run,
    s: int,
    s_loss: float,
    s_energy: float,
    removable: Sequence[int],
    child_losses: FloatArray,
) -> int:
    """One-shot projection of S onto the energy budget from its children's losses."""
    if not removable:
        return 0
    kept, kept_energy = s, s_energy
    removed: list[int] = []
    for n in _removal_order(removable, s_loss, child_losses, run.energy):
        if kept_energy <= run.cap_j:
            break
        kept &= ~(1 << n)
        removed.append(n)
        kept_energy -= float(run.energy[n])
    if kept == 0 or kept_energy > run.cap_j:
        return 0
    return _refill(run, kept, kept_energy, removed)


def _project_greedy(run: _Run, s: int, s_loss: float) -> tuple[int, float]:
    """Greedy projection: remove the cheapest-loss-per-joule member until feasible, re-fill.

    After the candidate filter every singleton is feasible, so this always ends feasible.
    """
    kept, kept_loss, kept_energy = s, s_loss, run.energy_of(s)
    removed: list[int] = []
    while kept_energy > run.cap_j:
        removable = [n for n in members(kept) if run.energy[n] > 0.0]
        children = [kept & ~(1 << n) for n in removable]
        child_losses = run.losses(children)
        n = _removal_order(removable, kept_loss, child_losses, run.energy)[0]
        kept_loss = float(child_losses[removable.index(n)])
        kept &= ~(1 << n)
        kept_energy -= float(run.energy[n])
        removed.append(n)
    refilled = _refill(run, kept, kept_energy, removed)
    if refilled != kept:
        r_loss = run.loss(refilled)
        if r_loss < kept_loss:
            return refilled, r_loss
    return kept, kept_loss


def exact(
    problem: Problem,
    max_latency_s: float | None = None,
    *,
    max_nodes: int | None = None,
    enumerate_below: int = EXACT_ENUMERATE_BELOW,
) -> PlanResult:
    """Optimal for any loss model that provides a valid :meth:`LossModel.node_bound`.

    Depth-first branch and bound over include/exclude decisions. A node fixes a set I of
    included experts and an allowed set A ⊇ I; it stands for every T with I ⊆ T ⊆ A. Children:
    include the expert the bound suggests (best gain per joule; explored first) or exclude it.
    Every include child's I is evaluated as a candidate, so every feasible set is either
    evaluated or ruled out. Pruning: experts that no longer fit the energy left are dropped from
    A, and a node whose lower bound reaches the incumbent is cut. A node with at most
    ``enumerate_below`` undecided experts is finished by vectorised enumeration of its subsets
    instead: a bound costs as much as hundreds of vectorised evaluations. The incumbent starts
    from :func:`greedy`. With ``max_nodes`` the search may stop early (``capped=True``).

    Cost: the bounds are per-sample relaxations (each calibration sample may pick its own best
    experts), so they bite only deep in the tree; in the worst case the work is that of
    :func:`exhaustive` over the candidate experts, i.e. 2^k evaluations for k candidates. The
    candidate filter (latency budget, per-expert energy) is what keeps k small in practice.
    """
    if enumerate_below < 0:
        raise PlannerError("enumerate_below must be >= 0")
    run = _Run(problem, "exact", max_latency_s)
    cand = run.candidates
    if cand == 0:
        return run.result(0, optimal=True)
    inc_mask, inc_loss = _greedy_search(run)
    energy = run.energy
    static_order: list[int] | None = None
    stack: list[tuple[int, int, float]] = [(0, cand, 0.0)]
    nodes = 0
    capped = False
    while stack:
        if max_nodes is not None and nodes >= max_nodes:
            capped = True
            break
        inc, allowed, e_inc = stack.pop()
        nodes += 1
        left = run.cap_j - e_inc
        und = [n for n in members(allowed & ~inc) if energy[n] <= left]
        if not und:
            continue
        allowed = inc | mask_of(und)
        branch = -1
        if len(und) > min(enumerate_below, _EXACT_ENUMERATE_NOW):
            bound, branch = run.model.node_bound(
                inc, allowed, energy, left, stop_at=inc_loss - _EXACT_TOL
            )
            if bound >= inc_loss - _EXACT_TOL:
                continue
        if len(und) <= enumerate_below:
            e_mask, e_loss = _enumerate(run, inc, und)
            if e_mask and e_loss < inc_loss:
                inc_mask, inc_loss = e_mask, e_loss
            continue
        if branch not in und:
            if static_order is None:
                singles = run.losses([1 << n for n in members(cand)])
                static_order = [members(cand)[k] for k in np.argsort(singles, kind="stable")]
            branch = next(n for n in static_order if n in und)
        stack.append((inc, allowed & ~(1 << branch), e_inc))
        child = inc | (1 << branch)
        c_loss = run.loss(child)
        if c_loss < inc_loss:
            inc_mask, inc_loss = child, c_loss
        stack.append((child, allowed, e_inc + float(energy[branch])))
    return run.result(
        inc_mask,
        loss=inc_loss,
        nodes=nodes,
        optimal=not capped,
        capped=capped,
        bound=None if capped else inc_loss,
    )


def exhaustive(
    problem: Problem,
    max_latency_s: float | None = None,
    *,
    max_experts: int = EXHAUSTIVE_MAX_EXPERTS,
) -> PlanResult:
    """Every non-empty subset of the candidate experts, vectorised in chunks.

    Raises :class:`PlannerError` when more than ``max_experts`` experts meet the budgets on their
    own. Losses are computed (uncached) only for feasible subsets; ties go to the first found.
    """
    run = _Run(problem, "exhaustive", max_latency_s)
    idx = members(run.candidates)
    k = len(idx)
    if k > max_experts:
        raise PlannerError(
            f"exhaustive search over 2^{k} subsets refused: {k} candidate experts "
            f"(of {problem.n_experts}) exceed the limit of {max_experts}; use smo or exact"
        )
    if k == 0:
        return run.result(0, optimal=True)
    best_mask, best_loss = _enumerate(run, 0, idx)
    return run.result(
        best_mask,
        loss=best_loss,
        nodes=(1 << k) - 1,
        optimal=True,
        bound=best_loss,
    )


def _enumerate(run: _Run, include: int, free: Sequence[int]) -> tuple[int, float]:
    """Best feasible I ∪ A over every A ⊆ free (vectorised in chunks, uncached); (0, inf) if none.

    Latency is not checked: callers pass only experts that meet the latency budget.
    """
    k = len(free)
    n = run.problem.n_experts
    free_idx = np.array(free, dtype=np.intp)
    e_free = run.energy[free_idx]
    e_inc = run.energy_of(include)
    inc_bits = mask_bits([include], n)[0]
    best_loss = math.inf
    best_mask = 0
    chunk = 1 << 15
    total = 1 << k
    for start in range(0 if include else 1, total, chunk):
        local = np.arange(start, min(total, start + chunk), dtype=np.uint64)
        local_bits = mask_bits(local, k)
        ok = e_inc + local_bits @ e_free <= run.cap_j
        if not ok.any():
            continue
        bits = np.repeat(inc_bits[None, :], int(ok.sum()), axis=0)
        bits[:, free_idx] = local_bits[ok]
        vals = run.model.evaluate_bits(bits)
        run.uncached_evaluations += len(vals)
        j = int(np.argmin(vals))
        if vals[j] < best_loss:
            best_loss = float(vals[j])
            best_mask = mask_of(np.flatnonzero(bits[j]).tolist())
    return best_mask, best_loss


def _greedy_search(run: _Run) -> tuple[int, float]:
    """Greedy forward selection; returns (mask, loss), mask 0 when nothing is feasible."""
    cand = members(run.candidates)
    energy = run.energy
    s, s_loss, e_s = 0, math.inf, 0.0
    while True:
        options = [n for n in cand if not s >> n & 1 and e_s + energy[n] <= run.cap_j]
        if not options:
            break
        vals = run.losses([s | (1 << n) for n in options])
        if s == 0:
            # The empty set has no loss to reduce: take the best singleton (ties: less energy).
            k = int(np.lexsort((energy[options], vals))[0])
        else:
            reduction = s_loss - vals
            if not (reduction > 0.0).any():
                break
            e = energy[options]
            safe = np.where(e > 0.0, e, 1.0)
            score = np.where(e > 0.0, reduction / safe, np.inf)
            score = np.where(reduction > 0.0, score, -np.inf)
            k = int(np.lexsort((-reduction, -score))[0])
        n = options[k]
        s |= 1 << n
        s_loss = float(vals[k])
        e_s += float(energy[n])
    return s, s_loss


def greedy(problem: Problem, max_latency_s: float | None = None) -> PlanResult:
    """Start empty; add the expert with the largest loss reduction per joule (zero-energy experts
    first) while the set stays feasible and the loss falls. The first pick, from the empty set
    which has no loss, is the singleton with the lowest loss (ties: less energy)."""
    run = _Run(problem, "greedy", max_latency_s)
    mask, loss = _greedy_search(run)
    return run.result(mask, loss=loss if mask else None, optimal=False)


def random_subset(
    problem: Problem, max_latency_s: float | None = None, *, seed: int | None = None
) -> PlanResult:
    """The paper's "Rand." baseline: a random maximal feasible subset.

    Shuffle the candidate experts with ``numpy.random.default_rng(seed)`` and add each one whose
    addition keeps the set feasible. Maximal sets are the fair baseline for a (nearly) monotone
    loss; a uniformly random feasible subset would mostly be a needlessly small one.
    """
    run = _Run(problem, "random", max_latency_s)
    rng = np.random.default_rng(seed)
    s, e_s = 0, 0.0
    for n in rng.permutation(members(run.candidates)).tolist():
        if e_s + run.energy[n] <= run.cap_j:
            s |= 1 << n
            e_s += float(run.energy[n])
    return run.result(s, optimal=False)


# --------------------------------------------------------------------------------------------
# entry points


def solve(
    problem: Problem,
    method: Method = "smo",
    max_latency_s: float | None = None,
    *,
    seed: int | None = None,
    epsilon: float = DEFAULT_EPSILON,
    max_expansions: int = DEFAULT_MAX_EXPANSIONS,
    max_nodes: int | None = None,
) -> PlanResult:
    """Run one method under one latency budget (None: the joint budget, all applications)."""
    if method == "smo":
        return smo(problem, max_latency_s, epsilon=epsilon, max_expansions=max_expansions)
    if method == "exact":
        return exact(problem, max_latency_s, max_nodes=max_nodes)
    if method == "exhaustive":
        return exhaustive(problem, max_latency_s)
    if method == "greedy":
        return greedy(problem, max_latency_s)
    if method == "random":
        return random_subset(problem, max_latency_s, seed=seed)
    raise PlannerError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def plan_all(
    problem: Problem,
    method: Method = "smo",
    seed: int | None = None,
    epsilon: float = DEFAULT_EPSILON,
    *,
    max_expansions: int = DEFAULT_MAX_EXPANSIONS,
    max_nodes: int | None = None,
) -> PlanSet:
    """The joint plan (every application's budget at once, problem 16) and one plan per
    application under its own latency budget and the shared energy budget."""

    def one(budget: float | None) -> PlanResult:
        return solve(
            problem,
            method,
            budget,
            seed=seed,
            epsilon=epsilon,
            max_expansions=max_expansions,
            max_nodes=max_nodes,
        )

    return PlanSet(
        joint=one(None),
        per_application={app: one(budget) for app, budget in problem.applications.items()},
    )


def plan_fleet(
    names: Sequence[str],
    latency_s: Sequence[float],
    energy_j: Sequence[float],
    app_budgets_s: Mapping[str, float],
    max_energy_j: float,
    loss: LossModel | None = None,
    *,
    method: Method = "smo",
    seed: int | None = None,
    epsilon: float = DEFAULT_EPSILON,
    max_expansions: int = DEFAULT_MAX_EXPANSIONS,
) -> dict[str, PlanResult]:
    """Per-application plans from live telemetry, for the coordinator.

    ``latency_s`` and ``energy_j`` are per generated token, in the order of ``names``; ``loss``
    must cover the same experts in the same order (:meth:`LossTable.select` re-orders a table);
    None plans with :meth:`LossTable.prior`. Pass the same ``loss`` object on every replan to
    reuse its cache.
    """
    problem = Problem.create(names, latency_s, energy_j, app_budgets_s, max_energy_j, loss)
    return {
        app: solve(
            problem, method, budget, seed=seed, epsilon=epsilon, max_expansions=max_expansions
        )
        for app, budget in problem.applications.items()
    }
