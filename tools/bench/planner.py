"""Planner benchmark on random instances (wired to ``moe2 bench planner``); prints nothing.

Instances come from :func:`random_problem` in two kinds: ``specialist`` calibration data shaped
like a trained gate over specialist experts (each sample belongs to one expert's domain, where
that expert is likely right and gets most of the gate), so L is nearly but not exactly
monotone; and ``uniform`` (gate values and target probabilities uniformly random), with no
structure for a bound to use. Both with random latencies and energies and budgets that exclude
some experts by latency and force a choice by energy.

Besides the methods' times, evaluations and gaps in this process, the bench runs the command
an operator runs, ``moe2 plan --method exact --time-limit 1 --json``, as a subprocess on
problem files of N = 16 ... 64 experts of both kinds and reports its wall time (start-up
included) and the gaps it returned.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe2.coordinator.planner import (
    EXHAUSTIVE_MAX_EXPERTS,
    LossTable,
    PlanResult,
    Problem,
    exact,
    exhaustive,
    plan_all,
    smo,
)
from moe2.tools.fleet.harness import moe2_argv

KINDS = ("specialist", "uniform")
EXACT_MAX_EXPERTS = 32
#: ``exact`` runs under this limit in the bench (seconds per instance and budget, and for all
#: budgets of an instance together): where it stops, the bench reports its proven gap
EXACT_TIME_LIMIT_S = 10.0
#: the operator's command is run with this limit; the target is to return within 1.5 s
CLI_TIME_LIMIT_S = 1.0
CLI_SIZES = (16, 24, 32, 48, 64)
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
    gaps = [r.gap for r in results if r.gap is not None]
    summary = {
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "evaluations": statistics.median([r.evaluations for r in results]),
        "nodes": statistics.median([r.nodes for r in results]),
        "capped": sum(r.capped for r in results),
        "timed_out": sum(r.timed_out for r in results),
        "optimal": sum(r.optimal for r in results),
        "feasible": sum(r.feasible for r in results),
        "max_proven_gap": max(gaps) if gaps else None,
    }
    return summary, results


def _gap(smo_results: Sequence[PlanResult], exact_results: Sequence[PlanResult]) -> dict[str, Any]:
    """smo's loss minus exact's where exact proved its set optimal (so ≥ 0)."""
    gaps = [
        s.loss - e.loss
        for s, e in zip(smo_results, exact_results, strict=True)
        if s.loss is not None and e.loss is not None and e.optimal
    ]
    return {
        "mean": statistics.fmean(gaps) if gaps else None,
        "max": max(gaps) if gaps else None,
        "instances": len(gaps),
        "smo_suboptimal": sum(g > _GAP_TOL for g in gaps),
    }


def _plan_all_summary(problems: Sequence[Problem], limit_s: float) -> dict[str, Any]:
    """``exact`` over every budget of each instance (the joint plan and each application's, as
    ``moe2 plan`` does), under one time limit per instance."""
    seconds: list[float] = []
    proven = 0
    gaps: list[float] = []
    for problem in problems:
        problem.loss.clear_cache()
        t0 = time.perf_counter()
        plans = plan_all(problem, "exact", time_limit_s=limit_s)
        seconds.append(time.perf_counter() - t0)
        results = [plans["joint"], *plans["per_application"].values()]
        proven += all(r.optimal for r in results)
        gaps.extend(r.gap for r in results if r.gap is not None)
    return {
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "all_plans_optimal": proven,
        "instances": len(problems),
        "max_proven_gap": max(gaps) if gaps else None,
        "time_limit_s": limit_s,
    }


def problem_document(problem: Problem) -> dict[str, Any]:
    """``problem`` as a ``moe2 plan --problem`` file (see :mod:`moe2.cli.plan`)."""
    table = problem.loss
    if not isinstance(table, LossTable):
        raise TypeError("only calibration-table problems can be written")
    gates, probs = table.matrices()
    return {
        "experts": [
            {"name": name, "latency_s": float(lat), "energy_j": float(en)}
            for name, lat, en in zip(problem.names, problem.latency_s, problem.energy_j,
                                     strict=True)
        ],
        "applications": [{"name": a, "max_latency_s": b} for a, b in problem.applications.items()],
        "max_energy_j": problem.max_energy_j,
        "calibration": {"gates": gates.tolist(), "target_probs": probs.tolist()},
    }


def _cli_check(sizes: Sequence[int], seed: int, repeats: int) -> list[dict[str, Any]]:
    """Wall time of ``moe2 plan --method exact --time-limit 1 --json`` (start-up included) on
    problem files of each size and kind, and whether every plan came back with a consistent
    gap (0 <= gap = loss - bound)."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moe2-bench-planner-") as tmp:
        for kind in KINDS:
            for n in sizes:
                problem = random_problem(n, seed * 1_000_003 + 7919 * n,
                                         specialist=kind == "specialist")
                path = Path(tmp) / f"{kind}-{n}.json"
                path.write_text(json.dumps(problem_document(problem)), encoding="utf-8")
                walls: list[float] = []
                consistent = True
                timed_out = 0
                gaps: list[float] = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    proc = subprocess.run(
                        [*moe2_argv(), "plan", "--problem", str(path), "--method", "exact",
                         "--time-limit", str(CLI_TIME_LIMIT_S), "--json"],
                        capture_output=True, text=True, check=False, timeout=120)
                    walls.append(time.perf_counter() - t0)
                    if proc.returncode != 0:
                        raise RuntimeError(f"moe2 plan failed: {proc.stderr.strip()}")
                    out = json.loads(proc.stdout.strip().splitlines()[-1])
                    for plan in (out, *out["per_application"].values()):
                        gap, bound, loss = plan["gap"], plan["bound"], plan["loss"]
                        consistent &= (gap is not None and bound is not None and
                                       gap >= 0.0 and abs(loss - bound - gap) < 1e-9)
                        timed_out += bool(plan["timed_out"])
                        if gap is not None:
                            gaps.append(gap)
                rows.append({"kind": kind, "n": n, "wall_s_max": max(walls),
                             "wall_s_median": statistics.median(walls),
                             "gaps_consistent": consistent, "plans_timed_out": timed_out,
                             "plans": repeats * (1 + len(problem.applications)),
                             "max_gap": max(gaps) if gaps else None})
    return rows


def run_planner_bench(
    sizes: Sequence[int] = (8, 16, 24, 32, 48, 64),
    seed: int = 0,
    repeats: int = 3,
    *,
    exact_time_limit_s: float = EXACT_TIME_LIMIT_S,
    cli_sizes: Sequence[int] = CLI_SIZES,
    cli_repeats: int = 3,
    relaxation_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Per instance kind and size: ``smo`` (every size) and ``exact`` (N ≤ 32, under
    ``exact_time_limit_s``) on the joint budget, with median seconds, evaluations, nodes, how
    often exact proved optimality and its largest proven gap where it did not; ``plan_all``:
    exact over all budgets as ``moe2 plan`` runs it (N ≤ 32, one limit per instance);
    ``exhaustive`` (N ≤ 20); ``smo_minus_exact``: smo's loss above exact's proven optimum.
    ``cli``: the operator's command under ``--time-limit 1`` (see :func:`_cli_check`);
    ``relaxation``: how close a relaxation coupling the samples gets (see
    :mod:`moe2.tools.bench.planner_dual`)."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        rows: list[dict[str, Any]] = []
        for n in sizes:
            problems = [random_problem(n, seed * 1_000_003 + 7919 * n + r,
                                       specialist=kind == "specialist") for r in range(repeats)]
            smo_summary, smo_results = _timed(smo, problems)
            row: dict[str, Any] = {"n": n, "subsets": 2**n, "smo": smo_summary, "exact": None,
                                   "plan_all_exact": None, "smo_minus_exact": None}
            if n <= EXACT_MAX_EXPERTS:
                exact_summary, exact_results = _timed(
                    lambda p: exact(p, time_limit_s=exact_time_limit_s), problems)
                row["exact"] = exact_summary
                row["smo_minus_exact"] = _gap(smo_results, exact_results)
                row["plan_all_exact"] = _plan_all_summary(problems, exact_time_limit_s)
            row["exhaustive"] = (_timed(exhaustive, problems)[0]
                                 if n <= EXHAUSTIVE_MAX_EXPERTS else None)
            rows.append(row)
        kinds[kind] = rows
    from moe2.tools.bench.planner_dual import DUAL_SIZES, relaxation_rows

    dual_sizes = tuple(DUAL_SIZES if relaxation_sizes is None else relaxation_sizes)
    return {"seed": seed, "repeats": repeats, "exact_time_limit_s": exact_time_limit_s,
            "kinds": kinds,
            # relaxations that couple the samples, vs the optimum (planner_dual.py)
            "relaxation": relaxation_rows(seed, dual_sizes),
            "cli": _cli_check(cli_sizes, seed, cli_repeats) if cli_sizes else [],
            "cli_time_limit_s": CLI_TIME_LIMIT_S}


def run_planner_bench_cli(*, quick: bool = False, out_dir: str | None = None,
                          seed: int = 0) -> dict[str, Any]:
    """``moe2 bench planner``: the full size ladder, or a quick one."""
    del out_dir  # nothing is written
    if quick:
        return run_planner_bench(sizes=(8, 16, 24), seed=seed, repeats=2,
                                 exact_time_limit_s=2.0, cli_sizes=(16, 64), cli_repeats=1)
    return run_planner_bench(seed=seed)
