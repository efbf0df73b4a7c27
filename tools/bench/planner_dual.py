"""Part of ``moe2 bench planner``: how tight can a relaxation that couples the calibration
samples get, on unstructured ("uniform") instances?

``exact``'s bounds are per-sample relaxations (each sample may pick its own best experts). The
natural way to couple the samples is through the one set they share: give each sample its own
copy of the set -- a distribution π_i over sets -- and require only that every copy has the same
memberships z, a point of the feasible sets' convex hull. Solved exactly as a linear program:

    min  mean_i Σ_T π_{i,T} · (−log mix_{i,T})
    s.t. Σ_T π_{i,T} = 1,   Σ_T π_{i,T} · 1_T = z  (every sample i),   z ∈ conv(feasible sets)

over the non-empty subsets T that contain the node's fixed experts, in two versions:
``relaxation`` lets each copy ignore the energy budget (T any subset: this LP equals the
Lagrangian dual over uncapped copies and the convex closure of each sample's loss, and bounds
every separable convex under-estimator), ``relaxation_capped`` keeps the budget in each copy (T
feasible only: tighter, and what a Lagrangian over capped copies reaches). Every set is a column
(2^N · 256), so only small instances; and each sample's part of the capped version is a
knapsack-constrained minimisation as hard as the planner's own problem, so neither is a bound
``exact`` could compute at N = 32. The rows put both next to the node's true optimum and to
``exact``'s bound there (:meth:`LossTable.node_bound`): they say how far any bound of this
kind is from pruning near the root.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from moe2.coordinator.planner import LossTable
from moe2.coordinator.planner.base import PROB_FLOOR, mask_of, members
from moe2.tools.bench.planner import random_problem

#: instance sizes the LP is solved for (2^N · 256 columns)
DUAL_SIZES = (8, 10)


def marginal_relaxation(n_experts: int, seed: int, include: tuple[int, ...] = ()) -> dict[str, Any]:
    """Both LPs above on one uniform instance, under its loosest latency budget, at the node
    that fixes ``include`` in the set (the others undecided); with the node's true optimum and
    ``exact``'s bound there."""
    problem = random_problem(n_experts, seed, specialist=False)
    table = problem.loss
    if not isinstance(table, LossTable):
        raise TypeError("random_problem gives a LossTable")
    gates, probs = table.matrices()
    cand = members(problem.candidates(max(problem.applications.values())))
    k = len(cand)
    sets = ((np.arange(1, 1 << k)[:, None] >> np.arange(k)) & 1).astype(np.float64)
    if not set(include) <= set(cand):
        raise ValueError(f"experts {include} are not all candidates under the loosest budget")
    fixed = [cand.index(n) for n in include]
    sets = sets[sets[:, fixed].all(axis=1)] if fixed else sets
    energy = problem.energy_j[cand]
    feasible = sets @ energy <= problem.energy_cap_j
    num = sets @ (gates * probs)[:, cand].T
    den = sets @ gates[:, cand].T
    loss = -np.log(np.maximum(num / den, PROB_FLOOR))  # sets × samples
    if not feasible.any():
        raise ValueError(f"experts {include} together exceed the energy budget")
    optimum = float(loss.mean(axis=1)[feasible].min())
    inc = mask_of(include)
    left_j = problem.energy_cap_j - float(problem.energy_j[list(include)].sum())
    bound, _branch = table.node_bound(inc, mask_of(cand), problem.energy_j, left_j)
    return {"n": n_experts, "candidates": k, "include": list(include), "optimum": optimum,
            "relaxation": _coupled_lp(sets, loss, feasible),
            "relaxation_capped": _coupled_lp(sets[feasible], loss[feasible],
                                             np.ones(int(feasible.sum()), dtype=bool)),
            "exact_bound": bound}


def _coupled_lp(sets: npt.NDArray[np.float64], loss: npt.NDArray[np.float64],
                feasible: npt.NDArray[np.bool_]) -> float:
    """The LP of the module doc: each sample a distribution over the rows of ``sets`` (columns
    i·M + t), their memberships equal to a mixture of the ``feasible`` rows."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    k, n_s = sets.shape[1], loss.shape[1]
    n_sets, n_feasible = len(sets), int(feasible.sum())
    pi_cols = n_s * n_sets
    cost = np.concatenate([loss.T.reshape(-1) / n_s, np.zeros(n_feasible)])
    one_each = sp.hstack([sp.kron(sp.eye(n_s), np.ones((1, n_sets))),
                          sp.csr_matrix((n_s, n_feasible))])
    same_marginals = sp.hstack([sp.kron(sp.eye(n_s), sp.csr_matrix(sets.T)),
                                -sp.kron(np.ones((n_s, 1)), sp.csr_matrix(sets[feasible].T))])
    hull = sp.hstack([sp.csr_matrix((1, pi_cols)), sp.csr_matrix(np.ones((1, n_feasible)))])
    res = linprog(cost, A_eq=sp.vstack([one_each, same_marginals, hull]).tocsr(),
                  b_eq=np.concatenate([np.ones(n_s), np.zeros(n_s * k), np.ones(1)]),
                  bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"the relaxation LP did not solve: {res.message}")
    return float(res.fun)


def relaxation_rows(seed: int = 0, sizes: tuple[int, ...] = DUAL_SIZES) -> list[dict[str, Any]]:
    """Per size: the root and the three nodes that fix one expert (see the module doc)."""
    rows = []
    for n in sizes:
        instance_seed = seed * 1_000_003 + 7919 * n
        for include in ((), (0,), (1,), (2,)):
            rows.append(marginal_relaxation(n, instance_seed, include))
    return rows
