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

``smo`` and ``exact`` take a time limit (``time_limit_s``; :func:`plan_all` shares one among all
its plans): past it they return the best feasible set found with a proven lower bound on the
optimum (``PlanResult.bound``) and the ``gap`` between the two.
``exhaustive`` every subset, vectorised; refuses more than 20 candidate experts.
``greedy``     add the expert with the best loss reduction per joule while feasible.
``random``     the paper's "Rand." baseline: a random maximal feasible subset.
"""

from __future__ import annotations

from moe2.coordinator.planner.base import (
    DEFAULT_EPSILON,
    DEFAULT_MAX_EXPANSIONS,
    EXACT_ENUMERATE_BELOW,
    EXHAUSTIVE_MAX_EXPERTS,
    MAX_EXPERTS,
    METHODS,
    PROB_FLOOR,
    FloatArray,
    MaskArray,
    Method,
    PlannerError,
    mask_bits,
    mask_of,
    members,
)
from moe2.coordinator.planner.loss import (
    Extension,
    LossModel,
    LossTable,
    PriorLoss,
)
from moe2.coordinator.planner.problem import (
    PlanResult,
    PlanSet,
    Problem,
)
from moe2.coordinator.planner.search import (
    exact,
    exhaustive,
    greedy,
    plan_all,
    plan_fleet,
    random_subset,
    smo,
    solve,
)

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_MAX_EXPANSIONS",
    "EXACT_ENUMERATE_BELOW",
    "EXHAUSTIVE_MAX_EXPERTS",
    "MAX_EXPERTS",
    "METHODS",
    "PROB_FLOOR",
    "Extension",
    "FloatArray",
    "LossModel",
    "LossTable",
    "MaskArray",
    "Method",
    "PlanResult",
    "PlanSet",
    "PlannerError",
    "PriorLoss",
    "Problem",
    "exact",
    "exhaustive",
    "greedy",
    "mask_bits",
    "mask_of",
    "members",
    "plan_all",
    "plan_fleet",
    "random_subset",
    "smo",
    "solve",
]
