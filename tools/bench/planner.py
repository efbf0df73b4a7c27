"""Planner benchmark on random instances (wired to ``moe2 bench planner``); pure, prints nothing.

Instances come from :func:`random_problem`: calibration data shaped like a trained gate over
specialist experts (each sample belongs to one expert's domain, where that expert is likely right
and gets most of the gate), so L is nearly but not exactly monotone, plus random latencies and
energies with budgets that exclude some experts by latency and force a choice by energy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moe2.coordinator.planner import (
    EXHAUSTIVE_MAX_EXPERTS,
    LossTable,
    PlanResult,
    Problem,
    exact,
    exhaustive,
    smo,
)

EXACT_MAX_EXPERTS = 32
# Unstructured calibration (far from monotone) is where SMO can lose; exact stays cheap there
# only for small fleets.
UNSTRUCTURED_MAX_EXPERTS = 24
_GAP_TOL = 1e-9


def random_problem(
    n_experts: int,
    seed: int = 0,
    *,
    n_samples: int = 256,
    n_applications: int = 3,
    energy_fraction: float = 0.4,
    specialist: bool = True,
) -> Problem:
    """A random planning instance with a calibration :class:`LossTable`.

    ``specialist=True``: sample i has a domain expert d_i; p_{i,d_i} ~ Beta(6, 1.5), other experts
    p ~ Beta(1.2, 6); gates are a softmax of N(0, 1) logits with +3 on the domain expert.
    ``specialist=False``: p ~ U(0, 1) and gates ~ U(0.05, 1), unstructured and far from monotone.
    Latency ~ U(0.01, 0.2) s/token, energy ~ U(0.2, 3) J/token; application budgets are latency
    quantiles 0.6…1.0 and the energy budget is ``energy_fraction`` of the fleet's total.
    """
    rng = np.random.default_rng(seed)
    n, s = n_experts, n_samples
    if specialist:
        domain = rng.integers(0, n, size=s)
        rows = np.arange(s)
        probs = rng.beta(1.2, 6.0, size=(s, n))
        probs[rows, domain] = rng.beta(6.0, 1.5, size=s)
        logits = rng.normal(0.0, 1.0, size=(s, n))
        logits[rows, domain] += 2.0 + np.log(n)
        gates = np.exp(logits - logits.max(axis=1, keepdims=True))
        gates /= gates.sum(axis=1, keepdims=True)
    else:
        probs = rng.uniform(0.0, 1.0, size=(s, n))
        gates = rng.uniform(0.05, 1.0, size=(s, n))
    latency = rng.uniform(0.01, 0.2, size=n)
    energy = rng.uniform(0.2, 3.0, size=n)
    quantiles = np.linspace(0.6, 1.0, n_applications) if n_applications > 1 else np.array([0.8])
    apps = {f"app{k}": float(np.quantile(latency, q)) for k, q in enumerate(quantiles.tolist())}
    return Problem.create(
        [f"e{k:02d}" for k in range(n)],
        latency.tolist(),
        energy.tolist(),
        apps,
        energy_fraction * float(energy.sum()),
        LossTable(gates, probs),
    )


def _timed(
    solver: Callable[[Problem], PlanResult], problems: Sequence[Problem]
) -> tuple[dict[str, Any], list[PlanResult]]:
    seconds: list[float] = []
    results: list[PlanResult] = []
    for problem in problems:
        problem.loss.clear_cache()
        t0 = time.perf_counter()
        res = solver(problem)
        seconds.append(time.perf_counter() - t0)
        results.append(res)
    summary = {
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "evaluations": statistics.median([r.evaluations for r in results]),
        "nodes": statistics.median([r.nodes for r in results]),
        "capped": sum(r.capped for r in results),
        "feasible": sum(r.feasible for r in results),
    }
    return summary, results


def _gap(smo_results: Sequence[PlanResult], exact_results: Sequence[PlanResult]) -> dict[str, Any]:
    gaps = [
        s.loss - e.loss
        for s, e in zip(smo_results, exact_results, strict=True)
        if s.loss is not None and e.loss is not None
    ]
    return {
        "mean": statistics.fmean(gaps) if gaps else None,
        "max": max(gaps) if gaps else None,
        "instances": len(gaps),
        "smo_suboptimal": sum(g > _GAP_TOL for g in gaps),
    }


def run_planner_bench(
    sizes: Sequence[int] = (8, 16, 24, 32, 48, 64), seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
    """Time ``smo`` (all sizes), ``exact`` (N ≤ 32) and ``exhaustive`` (N ≤ 20) on random
    specialist instances (joint budget), with median seconds, evaluations, nodes and 2^N per
    size. ``gap`` is the smo-vs-exact loss gap (smo − exact, ≥ 0) on those instances, whose loss
    is nearly but not exactly monotone; ``gap_unstructured`` the same on unstructured
    calibration (N ≤ 24), far from monotone."""
    rows: list[dict[str, Any]] = []
    for n in sizes:
        problems = [random_problem(n, seed * 1_000_003 + 7919 * n + r) for r in range(repeats)]
        smo_summary, smo_results = _timed(smo, problems)
        row: dict[str, Any] = {"n": n, "subsets": 2**n, "smo": smo_summary}
        row["exact"] = None
        row["gap"] = None
        row["gap_unstructured"] = None
        if n <= EXACT_MAX_EXPERTS:
            exact_summary, exact_results = _timed(exact, problems)
            row["exact"] = exact_summary
            row["gap"] = _gap(smo_results, exact_results)
        if n <= UNSTRUCTURED_MAX_EXPERTS:
            rough = [
                random_problem(n, seed * 1_000_003 + 7919 * n + r, specialist=False)
                for r in range(repeats)
            ]
            row["gap_unstructured"] = _gap(_timed(smo, rough)[1], _timed(exact, rough)[1])
        if n <= EXHAUSTIVE_MAX_EXPERTS:
            row["exhaustive"], _ = _timed(exhaustive, problems)
        else:
            row["exhaustive"] = None
        rows.append(row)
    return {"seed": seed, "repeats": repeats, "sizes": rows}


def run_planner_bench_cli(*, quick: bool = False, out_dir: str | None = None,
                          seed: int = 0) -> dict[str, Any]:
    """``moe2 bench planner``: the full size ladder, or a quick one."""
    del out_dir  # nothing is written
    sizes = (8, 16, 24) if quick else (8, 16, 24, 32, 48, 64)
    return run_planner_bench(sizes=sizes, seed=seed, repeats=2 if quick else 3)
