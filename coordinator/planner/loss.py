"""Loss models L(S): the calibration table of paper eq. 13-15 and the prior without data."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, NamedTuple

import numpy as np
import numpy.typing as npt

from moe2.coordinator.planner.base import (
    _CHUNK_ELEMENTS,
    MAX_EXPERTS,
    PROB_FLOOR,
    FloatArray,
    PlannerError,
    _fractional_knapsack,
    mask_bits,
    mask_of,
    members,
)

#: ``LossTable.best_extension`` enumerates this many experts in one table (2^8 rows); the
#: others in an outer loop over that table (measured: a few hundred rows keep the table in the
#: cache; 0.65 us a subset at 256 samples against 14 us for the matrix-product evaluation).
_TABLE_EXPERTS = 8
# Batches up to this many subsets are evaluated without BLAS (see LossTable._compute).
_SMALL_BATCH = 256
# An enumeration with a deadline checks it every this many subsets.
_CHECK_EVERY = 1 << 13


class Extension(NamedTuple):
    """What :meth:`LossModel.best_extension` found: the best feasible set and its loss
    (``0, inf`` when none), how many subsets it evaluated, and whether it saw them all (False:
    ``expired`` stopped it; the best is then only the best of those seen)."""

    mask: int
    loss: float
    evaluated: int
    complete: bool

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

    def best_extension(
        self,
        include: int,
        free: Sequence[int],
        energy_j: FloatArray,
        capacity_j: float,
        expired: Callable[[], bool] | None = None,
    ) -> Extension:
        """The best I ∪ A over every A ⊆ ``free`` with Σ_{n∈A} energy_j[n] ≤ ``capacity_j``
        (the empty set excluded), by vectorised enumeration in chunks, uncached; ties go to the
        first found. ``expired`` is asked between chunks and ends the enumeration early."""
        k = len(free)
        free_idx = np.array(free, dtype=np.intp)
        e_free = energy_j[free_idx]
        inc_bits = mask_bits([include], self._n)[0]
        best_loss, best_mask, evaluated = math.inf, 0, 0
        chunk = _CHECK_EVERY
        total = 1 << k
        for start in range(0 if include else 1, total, chunk):
            if expired is not None and start > 1 and expired():
                return Extension(best_mask, best_loss, evaluated, False)
            local = np.arange(start, min(total, start + chunk), dtype=np.uint64)
            local_bits = mask_bits(local, k)
            ok = local_bits @ e_free <= capacity_j
            if not ok.any():
                continue
            bits = np.repeat(inc_bits[None, :], int(ok.sum()), axis=0)
            bits[:, free_idx] = local_bits[ok]
            vals = self.evaluate_bits(bits)
            evaluated += len(vals)
            j = int(np.argmin(vals))
            if vals[j] < best_loss:
                best_loss = float(vals[j])
                best_mask = mask_of(np.flatnonzero(bits[j]).tolist())
        return Extension(best_mask, best_loss, evaluated, True)


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

    def matrices(self) -> tuple[FloatArray, FloatArray]:
        """Copies of the gate values and target probabilities (samples × experts)."""
        return self._g.copy(), self._p.copy()

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
        if bits.shape[0] <= _SMALL_BATCH:
            # no BLAS: its worker threads turn a 64-row product into milliseconds on a busy
            # 2-core box (measured 0.06 ms with one thread, 0.4-4.7 ms with two)
            num = np.einsum("kn,ns->ks", bits, self._gpT)
            den = np.einsum("kn,ns->ks", bits, self._gT)
        else:
            num = bits @ self._gpT
            den = bits @ self._gT
        mix = np.divide(num, den, out=np.zeros_like(num), where=den > 0.0)
        out: FloatArray = np.mean(-np.log(np.maximum(mix, PROB_FLOOR)), axis=1)
        return out

    def best_extension(
        self,
        include: int,
        free: Sequence[int],
        energy_j: FloatArray,
        capacity_j: float,
        expired: Callable[[], bool] | None = None,
    ) -> Extension:
        """:meth:`LossModel.best_extension` without matrix products: the numerators and
        denominators of every subset of the first :data:`_TABLE_EXPERTS` free experts are one
        table of subset sums (built by doubling), sorted by energy, so the sets that fit the
        energy left by each subset of the other free experts (an outer loop) are a prefix of
        it; a subset then costs two additions, a division and a log per sample."""
        k = len(free)
        inc = members(include)
        a = self._gpT[inc].sum(axis=0)
        b = self._gT[inc].sum(axis=0)
        kl = min(k, _TABLE_EXPERTS)
        low, high = list(free[:kl]), list(free[kl:])
        low_e = _subset_sums(energy_j[low][:, None])[:, 0]
        order = np.argsort(low_e, kind="stable")
        low_e = low_e[order]
        low_x = _subset_sums(self._gpT[low])[order]
        low_y = _subset_sums(self._gT[low])[order]
        high_x = _subset_sums(self._gpT[high])
        high_y = _subset_sums(self._gT[high])
        high_e = _subset_sums(energy_j[high][:, None])[:, 0]
        # the empty set (I = ∅, no expert from either part) is no candidate
        empty_pos = int(np.flatnonzero(order == 0)[0]) if not inc else -1
        n_s = self.n_samples
        best_loss, best_code, evaluated, complete = math.inf, (0, 0), 0, True
        since_check = 0
        counts = np.searchsorted(low_e, capacity_j - high_e, side="right").tolist()
        num_buf = np.empty_like(low_x)
        den_buf = np.empty_like(low_y)
        high_x += a
        high_y += b
        for h, cnt in enumerate(counts):
            if cnt == 0:
                continue
            if expired is not None and since_check >= _CHECK_EVERY:
                since_check = 0
                if expired():
                    complete = False
                    break
            num = np.add(low_x[:cnt], high_x[h], out=num_buf[:cnt])
            den = np.add(low_y[:cnt], high_y[h], out=den_buf[:cnt])
            with np.errstate(divide="ignore", invalid="ignore"):
                np.divide(num, den, out=num)
            np.maximum(num, PROB_FLOOR, out=num)
            np.log(num, out=num)
            vals = num.sum(axis=1)
            vals /= -n_s
            evaluated += cnt
            since_check += cnt
            if h == 0 and 0 <= empty_pos < cnt:
                vals[empty_pos] = math.inf
                evaluated -= 1
            j = int(np.argmin(vals))
            if vals[j] < best_loss:
                best_loss, best_code = float(vals[j]), (int(order[j]), h)
        self._evaluations += evaluated
        if not math.isfinite(best_loss):
            return Extension(0, math.inf, evaluated, complete)
        lo, hi = best_code
        mask = include | mask_of(n for j, n in enumerate(low) if lo >> j & 1)
        mask |= mask_of(n for j, n in enumerate(high) if hi >> j & 1)
        return Extension(mask, best_loss, evaluated, complete)

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


def _subset_sums(rows: FloatArray) -> FloatArray:
    """Row j of the result is Σ_{i: bit i of j set} rows[i] (2^len(rows) rows, by doubling)."""
    k = rows.shape[0]
    out = np.zeros((1 << k, rows.shape[1]), dtype=np.float64)
    size = 1
    for i in range(k):
        np.add(out[:size], rows[i], out=out[size : 2 * size])
        size *= 2
    return out


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


