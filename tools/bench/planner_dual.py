"""Part of ``moe2 bench planner``: how tight can a relaxation that couples the calibration
samples get, on unstructured ("uniform") instances?

``exact``'s bounds are per-sample relaxations (each sample may pick its own best experts). The
natural way to couple the samples is through the one set they share: every relaxation that
keeps only "sample i's set has the same memberships as everyone's" as a linear constraint --
an LP over the sets, a Lagrangian over copies of the set per sample, the convex closure of each
sample's loss -- is at most as tight as this one, solved here exactly as a linear program:

    min  mean_i Σ_T π_{i,T} · (−log mix_{i,T})
    s.t. Σ_T π_{i,T} = 1,   Σ_T π_{i,T} · 1_T = z  (every sample i),   z ∈ conv(feasible sets)

(π ≥ 0 over the non-empty subsets T of the candidates that contain the node's fixed experts).
Every variable is listed, so it runs on small instances only (2^N sets × 256 samples). The
rows put its value next to the true optimum of the same node and to ``exact``'s bound there
(:meth:`LossTable.node_bound`): if even the exact LP stays far below the optimum near the root,
no bound of this kind lets branch and bound prune there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe2.coordinator.planner import LossTable
from moe2.coordinator.planner.base import PROB_FLOOR, mask_of, members
from moe2.tools.bench.planner import random_problem

#: instance sizes the LP is solved for (2^N · 256 columns)
DUAL_SIZES = (8, 10)


def marginal_relaxation(n_experts: int, seed: int, include: tuple[int, ...] = ()) -> dict[str, Any]:
    """The LP above on one uniform instance, under its loosest latency budget, at the node that
    fixes ``include`` in the set (the others undecided); with the node's true optimum and
    ``exact``'s bound there."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    problem = random_problem(n_experts, seed, specialist=False)
    table = problem.loss
    if not isinstance(table, LossTable):
        raise TypeError("random_problem gives a LossTable")
    gates, probs = table.matrices()
    cand = members(problem.candidates(max(problem.applications.values())))
    k, n_s = len(cand), gates.shape[0]
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
    optimum = float(loss.mean(axis=1)[feasible].min())
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
    inc = mask_of(include)
    left_j = problem.energy_cap_j - float(problem.energy_j[list(include)].sum())
    bound, _branch = table.node_bound(inc, mask_of(cand), problem.energy_j, left_j)
    return {"n": n_experts, "candidates": k, "include": list(include), "optimum": optimum,
            "relaxation": float(res.fun), "exact_bound": bound}


def relaxation_rows(seed: int = 0, sizes: tuple[int, ...] = DUAL_SIZES) -> list[dict[str, Any]]:
    """Per size: the root and the three nodes that fix one expert (see the module doc)."""
    rows = []
    for n in sizes:
        instance_seed = seed * 1_000_003 + 7919 * n
        for include in ((), (0,), (1,), (2,)):
            rows.append(marginal_relaxation(n, instance_seed, include))
    return rows
