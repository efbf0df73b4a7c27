"""The subset planner: exact = exhaustive, smo = exhaustive on monotone losses, baselines, scale."""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moe2.coordinator.planner import (
    METHODS,
    LossModel,
    LossTable,
    PlannerError,
    PlanResult,
    PriorLoss,
    Problem,
    exact,
    exhaustive,
    greedy,
    mask_of,
    members,
    plan_all,
    plan_fleet,
    random_subset,
    smo,
    solve,
)
from moe2.tools.bench.planner import random_problem, run_planner_bench

TOL = 1e-9


class AdditiveLoss(LossModel):
    """L(S) = Σ_{n∉S} c_n with c_n > 0: strictly monotone, known in closed form."""

    monotone: ClassVar[bool] = True

    def __init__(self, costs: list[float]) -> None:
        super().__init__(len(costs))
        self._c = np.asarray(costs, dtype=np.float64)

    def _compute(self, bits: np.ndarray) -> np.ndarray:
        out: np.ndarray = (1.0 - bits) @ self._c
        return out


# ---------------------------------------------------------------------------------------------
# instance generation


@st.composite
def instances(draw: st.DrawFn, max_n: int = 14, loss_kind: str = "table") -> Problem:
    """Random small instances, infeasible ones included: budgets below every expert, on the
    boundary of a subset's energy, ties in latency and loss, zero energies."""
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_samples = draw(st.integers(1, 10))
    if loss_kind == "table":
        style = draw(st.sampled_from(["uniform", "specialist", "coarse"]))
        gates = rng.uniform(0.05, 1.0, size=(n_samples, n))
        probs = rng.uniform(0.0, 1.0, size=(n_samples, n))
        if style == "specialist":
            dom = rng.integers(0, n, size=n_samples)
            gates[np.arange(n_samples), dom] += 5.0
            probs[np.arange(n_samples), dom] = rng.uniform(0.6, 1.0, size=n_samples)
        elif style == "coarse":  # exact zeros, ones and ties
            probs = rng.choice([0.0, 0.5, 1.0], size=(n_samples, n))
            gates = rng.choice([0.5, 1.0, 2.0], size=(n_samples, n))
        loss: LossModel = LossTable(gates, probs)
    elif loss_kind == "additive":
        loss = AdditiveLoss(rng.uniform(0.01, 1.0, size=n).tolist())
    else:
        loss = PriorLoss(n, rng.uniform(0.1, 2.0, size=n).tolist())
    latency = (
        rng.choice([0.01, 0.02, 0.05, 0.1, 0.2], size=n)
        if draw(st.booleans())
        else (rng.uniform(0.01, 0.2, size=n))
    )
    energy = rng.uniform(0.1, 2.0, size=n)
    if draw(st.booleans()):
        energy[rng.random(n) < 0.2] = 0.0
    energy_kind = draw(st.sampled_from(["below", "fraction", "subset_sum", "ample"]))
    if energy_kind == "below":
        max_energy = 0.5 * float(energy[energy > 0].min()) if (energy > 0).any() else 0.0
    elif energy_kind == "fraction":
        max_energy = draw(st.floats(0.0, 1.0)) * float(energy.sum())
    elif energy_kind == "subset_sum":
        pick = rng.random(n) < 0.5
        max_energy = float(energy[pick].sum())
    else:
        max_energy = 10.0 * float(energy.sum()) + 1.0
    budgets = {
        f"app{k}": float(np.quantile(latency, q))
        for k, q in enumerate(draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3)))
    }
    if draw(st.booleans()):
        budgets["tight"] = 0.5 * float(latency.min())  # no expert is fast enough
    return Problem.create(
        [f"e{k}" for k in range(n)],
        latency.tolist(),
        energy.tolist(),
        budgets,
        max_energy,
        loss,
    )


def check_result(problem: Problem, res: PlanResult) -> None:
    """A result is consistent with the constraints and with the loss model."""
    if res.subset is None:
        assert not res.feasible
        assert res.loss is None
        assert res.mask == 0
        return
    assert res.feasible
    assert res.subset == problem.names_of(res.mask)
    assert problem.feasible(res.mask, res.max_latency_s)
    assert res.latency_s is not None
    assert res.latency_s <= res.max_latency_s
    assert res.energy_j is not None
    assert res.energy_j <= problem.max_energy_j * (1 + 1e-9) + 1e-9
    assert res.loss is not None
    assert res.loss == pytest.approx(problem.loss.loss(res.mask), abs=1e-12)


def budgets_of(problem: Problem) -> list[float | None]:
    return [None, *problem.applications.values()]


# ---------------------------------------------------------------------------------------------
# optimality


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_exact_equals_exhaustive(problem: Problem) -> None:
    event(f"experts: {'<= 6' if problem.n_experts <= 6 else '7-14'}")
    for budget in budgets_of(problem):
        ref = exhaustive(problem, budget)
        check_result(problem, ref)
        event(f"feasible: {ref.feasible}")
        # Pure branch and bound (every bound exercised) and the default hybrid.
        for enumerate_below in (0, 6):
            got = exact(problem, budget, enumerate_below=enumerate_below)
            check_result(problem, got)
            assert got.feasible == ref.feasible
            assert got.optimal
            if ref.loss is not None:
                assert got.loss is not None
                assert abs(got.loss - ref.loss) <= TOL


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(instances(loss_kind="additive"), instances(loss_kind="prior")))
def test_smo_equals_exhaustive_on_monotone_losses(problem: Problem) -> None:
    assert problem.loss.monotone
    for budget in budgets_of(problem):
        ref = exhaustive(problem, budget)
        got = smo(problem, budget, epsilon=0.0, max_expansions=10**6)
        check_result(problem, got)
        assert got.feasible == ref.feasible
        if ref.loss is not None:
            assert got.loss is not None
            assert not got.capped
            assert got.optimal
            assert abs(got.loss - ref.loss) <= TOL
            assert got.bound is not None
            assert got.bound <= got.loss + TOL
        # exact's default bound (L(allowed)) and the prior's knapsack bound are valid too
        got_exact = exact(problem, budget, enumerate_below=0)
        assert got_exact.feasible == ref.feasible
        if ref.loss is not None:
            assert got_exact.loss is not None
            assert abs(got_exact.loss - ref.loss) <= TOL


@settings(max_examples=100, deadline=None)
@given(instances(max_n=12))
def test_smo_gap_to_exact_is_non_negative(problem: Problem) -> None:
    """On a calibration table (not monotone) SMO is a feasible heuristic, never beating exact."""
    for budget in budgets_of(problem):
        s = smo(problem, budget)
        e = exact(problem, budget)
        check_result(problem, s)
        assert s.feasible == e.feasible
        if s.feasible:
            assert not s.optimal  # LossTable is not monotone: SMO claims nothing
        if e.loss is not None:
            assert s.loss is not None
            assert s.loss >= e.loss - TOL


def test_smo_is_exact_on_the_prior_with_equal_weights() -> None:
    # equal weights: the prior only counts experts, so the optimum is the most experts that fit
    problem = Problem.create(
        ["a", "b", "c", "d"], [0.1] * 4, [1.0, 2.0, 3.0, 4.0], {"x": 1.0}, 6.0, None
    )
    res = smo(problem, epsilon=0.0)
    assert res.subset == ("a", "b", "c")
    assert res.optimal


# ---------------------------------------------------------------------------------------------
# scale (no timing assertions)


def test_exact_solves_a_random_32_expert_instance() -> None:
    problem = random_problem(32, seed=11, n_samples=128)
    res = exact(problem)
    check_result(problem, res)
    assert res.feasible
    assert res.optimal
    assert res.loss is not None
    for other in (smo(problem), greedy(problem), random_subset(problem, seed=0)):
        assert other.loss is not None
        assert res.loss <= other.loss + TOL


def test_smo_solves_a_random_64_expert_instance() -> None:
    problem = random_problem(64, seed=5)
    res = smo(problem)
    check_result(problem, res)
    assert res.feasible
    assert res.nodes <= 1000
    g = greedy(problem)
    assert res.loss is not None
    assert g.loss is not None
    assert res.loss <= g.loss + TOL  # the root projection alone is at least as good here
    plans = plan_all(problem, "smo")
    for app, plan in plans["per_application"].items():
        assert plan.max_latency_s == problem.applications[app]
        check_result(problem, plan)


def test_smo_reports_a_cap() -> None:
    problem = random_problem(48, seed=2)
    res = smo(problem, max_expansions=3)
    check_result(problem, res)
    assert res.capped
    assert not res.optimal
    assert res.nodes == 3


def test_exact_reports_a_node_cap() -> None:
    problem = random_problem(20, seed=3, n_samples=32)
    res = exact(problem, max(problem.applications.values()), max_nodes=5, enumerate_below=0)
    check_result(problem, res)
    assert res.capped
    assert not res.optimal


# ---------------------------------------------------------------------------------------------
# baselines and infeasibility


@settings(max_examples=100, deadline=None)
@given(instances(), st.integers(0, 1000))
def test_greedy_and_random_are_feasible_or_none(problem: Problem, seed: int) -> None:
    for budget in budgets_of(problem):
        ref = exhaustive(problem, budget)
        g = greedy(problem, budget)
        r = random_subset(problem, budget, seed=seed)
        for res in (g, r):
            check_result(problem, res)
            assert res.feasible == ref.feasible
            assert not res.optimal
        # the random subset is maximal: no left-out candidate still fits
        if r.subset is not None:
            cand = problem.candidates(r.max_latency_s)
            for n in members(cand & ~r.mask):
                assert not problem.feasible(r.mask | (1 << n), r.max_latency_s)
        assert random_subset(problem, budget, seed=seed).mask == r.mask


def test_random_depends_on_the_seed() -> None:
    problem = random_problem(24, seed=1)
    masks = {random_subset(problem, seed=s).mask for s in range(10)}
    assert len(masks) > 1


@pytest.mark.parametrize("method", METHODS)
def test_energy_budget_below_every_expert_is_infeasible(method: str) -> None:
    problem = Problem.create(
        ["a", "b", "c"], [0.01, 0.02, 0.03], [1.0, 2.0, 0.5], {"x": 1.0, "y": 0.02}, 0.4
    )
    plans = plan_all(problem, method, seed=0)  # type: ignore[arg-type]
    for res in (plans["joint"], *plans["per_application"].values()):
        assert res.subset is None
        assert not res.feasible
        assert res.loss is None
        assert res.to_dict()["subset"] is None


@pytest.mark.parametrize("method", METHODS)
def test_latency_budget_below_every_expert_is_infeasible(method: str) -> None:
    problem = Problem.create(["a", "b"], [0.1, 0.2], [1.0, 1.0], {"fast": 0.05}, 10.0)
    res = solve(problem, method, seed=0)  # type: ignore[arg-type]
    assert res.subset is None
    assert not res.feasible


def test_intersection_not_union_of_constraints() -> None:
    # "b" meets the latency budget but not the energy budget, "c" the other way round; only "a"
    # meets both. The paper's union would admit all three.
    problem = Problem.create(
        ["a", "b", "c"],
        [0.01, 0.01, 0.5],
        [1.0, 5.0, 0.1],
        {"x": 0.1},
        1.5,
        AdditiveLoss([1, 1, 1]),
    )
    for method in METHODS:
        assert solve(problem, method, seed=0).subset == ("a",)  # type: ignore[arg-type]


def test_exhaustive_refuses_large_problems() -> None:
    problem = Problem.create([f"e{k}" for k in range(21)], [0.01] * 21, [1.0] * 21, {"x": 1.0}, 5.0)
    with pytest.raises(PlannerError, match=r"refused: 21 candidate experts"):
        exhaustive(problem)
    # experts that fail a budget on their own are not candidates
    small = Problem.create(
        [f"e{k}" for k in range(21)], [0.01] * 10 + [1.0] * 11, [1.0] * 21, {"x": 0.1}, 5.0
    )
    assert exhaustive(small).feasible


# ---------------------------------------------------------------------------------------------
# loss models and plumbing


def test_loss_table_matches_the_formula_and_caches() -> None:
    rng = np.random.default_rng(0)
    gates = rng.uniform(0.1, 1.0, size=(7, 4))
    probs = rng.uniform(0.0, 1.0, size=(7, 4))
    probs[0, :] = 0.0  # a sample no expert gets right: clipped, finite
    table = LossTable(gates, probs)
    for mask in range(1, 16):
        idx = members(mask)
        mix = (gates[:, idx] * probs[:, idx]).sum(1) / gates[:, idx].sum(1)
        want = float(np.mean(-np.log(np.maximum(mix, 1e-12))))
        assert table.loss(mask) == pytest.approx(want, rel=1e-12)
    assert table.evaluations == 15
    table.losses([1, 2, 3, 3, 5])
    assert table.evaluations == 15  # all cached
    table.clear_cache()
    table.losses([3, 3])
    assert table.evaluations == 16  # duplicates in one call are computed once
    assert math.isfinite(table.loss(1))
    sub = table.select([2, 0])
    assert sub.loss(0b01) == pytest.approx(table.loss(0b100))
    assert sub.loss(0b11) == pytest.approx(table.loss(0b101))


@pytest.mark.parametrize(
    ("gates", "probs", "match"),
    [
        ([[1.0, 0.0]], [[0.5, 0.5]], "positive"),
        ([[1.0, 1.0]], [[0.5, 1.5]], r"\[0, 1\]"),
        ([[1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]], "shape"),
        ([[1.0, float("nan")]], [[0.5, 0.5]], "finite"),
        ([], [], "non-empty"),
    ],
)
def test_loss_table_validates(
    gates: list[list[float]], probs: list[list[float]], match: str
) -> None:
    with pytest.raises(PlannerError, match=match):
        LossTable(gates, probs)


def test_prior_is_strictly_monotone() -> None:
    prior = LossTable.prior(6, [1.0, 2.0, 0.5, 3.0, 1.0, 0.1])
    assert prior.monotone
    for mask in range(1, 64):
        for n in range(6):
            if not mask >> n & 1:
                assert prior.loss(mask | (1 << n)) < prior.loss(mask)
    with pytest.raises(PlannerError):
        LossTable.prior(3, [1.0, 0.0, 1.0])
    assert prior.select([1, 3]).loss(0b11) == pytest.approx(prior.loss(0b1010))


def test_problem_validates() -> None:
    with pytest.raises(PlannerError, match="unique"):
        Problem.create(["a", "a"], [0.1, 0.1], [1.0, 1.0], {"x": 1.0}, 1.0)
    with pytest.raises(PlannerError, match="latency_s"):
        Problem.create(["a", "b"], [0.1], [1.0, 1.0], {"x": 1.0}, 1.0)
    with pytest.raises(PlannerError, match="energy_j"):
        Problem.create(["a"], [0.1], [-1.0], {"x": 1.0}, 1.0)
    with pytest.raises(PlannerError, match="covers"):
        Problem.create(["a"], [0.1], [1.0], {"x": 1.0}, 1.0, LossTable.prior(2))
    with pytest.raises(PlannerError, match="unknown method"):
        solve(Problem.create(["a"], [0.1], [1.0], {"x": 1.0}, 1.0), "magic")  # type: ignore[arg-type]


def test_plan_all_and_plan_fleet() -> None:
    problem = random_problem(12, seed=4)
    plans = plan_all(problem, "exact")
    assert plans["joint"].max_latency_s == min(problem.applications.values())
    assert set(plans["per_application"]) == set(problem.applications)
    for app, res in plans["per_application"].items():
        assert res.max_latency_s == problem.applications[app]
        # a looser budget never plans worse than the joint one
        if plans["joint"].loss is not None:
            assert res.loss is not None
            assert res.loss <= plans["joint"].loss + TOL
    json.dumps(plans["joint"].to_dict())

    fleet = plan_fleet(
        ["a", "b", "c"], [0.05, 0.1, 0.2], [1.0, 1.0, 1.0], {"chat": 0.1, "batch": 1.0}, 2.0
    )
    assert set(fleet) == {"chat", "batch"}
    assert fleet["chat"].subset == ("a", "b")
    assert fleet["batch"].subset is not None
    assert len(fleet["batch"].subset) == 2


def test_replanning_reuses_the_cache() -> None:
    problem = random_problem(20, seed=6)
    first = smo(problem)
    again = smo(problem)
    assert again.mask == first.mask
    assert again.evaluations == first.evaluations
    assert again.computed == 0
    assert first.computed > 0


def test_masks_round_trip() -> None:
    assert members(mask_of([0, 3, 63])) == [0, 3, 63]
    assert members(0) == []


def test_bench_reports_sizes_and_gap() -> None:
    report = run_planner_bench(sizes=(6, 10, 22), seed=1, repeats=2, exact_time_limit_s=60.0,
                               cli_sizes=(), relaxation_sizes=(6,))
    for kind in ("specialist", "uniform"):
        rows = {row["n"]: row for row in report["kinds"][kind]}
        assert set(rows) == {6, 10, 22}
        assert rows[10]["subsets"] == 1024
        assert rows[22]["exhaustive"] is None
        for row in rows.values():
            assert row["smo"]["median_s"] >= 0.0
            assert row["exact"]["evaluations"] >= 1
            gap = row["smo_minus_exact"]
            if gap["instances"]:
                assert gap["mean"] >= -TOL
                assert gap["max"] >= -TOL
            assert row["plan_all_exact"]["instances"] == 2
    # the coupled relaxation and exact's bound are lower bounds on each node's true optimum
    nodes = {tuple(r["include"]): r for r in report["relaxation"]}
    assert set(nodes) == {(), (0,), (1,), (2,)}
    for r in nodes.values():
        assert r["relaxation"] <= r["relaxation_capped"] + TOL  # fewer sets for each copy
        assert r["relaxation_capped"] <= r["optimum"] + TOL
        assert r["exact_bound"] <= r["optimum"] + TOL
        assert math.isfinite(r["relaxation"])
    json.dumps(report)


# ---------------------------------------------------------------------------------------------
# time limits (a fake clock: every reading advances it, so a limit expires after a known number
# of checks -- deterministic, no timing assertions)


class TickClock:
    """Each reading is ``step_s`` later than the one before."""

    def __init__(self, step_s: float = 1.0) -> None:
        self.now = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.integers(0, 40))
def test_a_time_limited_search_returns_a_valid_bound_and_gap(problem: Problem, ticks: int) -> None:
    """Stopped after any number of clock readings, exact and smo return a feasible set (or
    none when nothing is feasible) and a lower bound that the true optimum respects."""
    for budget in budgets_of(problem):
        ref = exhaustive(problem, budget)
        for solver in (exact, smo):
            got = solver(problem, budget, time_limit_s=ticks + 0.5, clock=TickClock())
            check_result(problem, got)
            assert got.feasible == ref.feasible
            if ref.loss is None:
                continue
            assert got.loss is not None
            assert got.loss >= ref.loss - TOL
            if got.bound is not None:
                assert got.bound <= ref.loss + TOL  # a proven lower bound
                assert got.gap == pytest.approx(got.loss - got.bound, abs=1e-12)
                assert got.gap >= 0.0
            if got.optimal:
                assert abs(got.loss - ref.loss) <= TOL
                assert got.gap == 0.0
        stopped = exact(problem, budget, time_limit_s=0.5, clock=TickClock())
        if ref.feasible and stopped.timed_out:
            assert not stopped.optimal


def test_exact_past_its_time_limit_on_a_large_unstructured_instance() -> None:
    problem = random_problem(64, seed=3, specialist=False)
    budget = max(problem.applications.values())
    res = exact(problem, budget, time_limit_s=20.0, clock=TickClock())
    check_result(problem, res)
    assert res.timed_out
    assert not res.optimal
    assert res.bound is not None
    assert res.gap is not None
    assert res.loss is not None
    assert res.bound <= res.loss
    assert res.gap == pytest.approx(res.loss - res.bound)
    g = greedy(problem, budget)
    assert g.loss is not None
    assert res.loss <= g.loss + TOL  # the incumbent starts from greedy
    d = res.to_dict()
    assert d["timed_out"] is True
    assert d["gap"] == res.gap
    json.dumps(d)


def test_a_finished_search_has_no_gap() -> None:
    problem = random_problem(12, seed=8, specialist=False)
    res = exact(problem, time_limit_s=1e9)
    assert res.optimal
    assert not res.timed_out
    assert res.gap == 0.0
    assert res.bound == res.loss


def test_smo_on_a_calibration_table_reports_the_root_bound() -> None:
    problem = random_problem(16, seed=2, specialist=False)
    res = smo(problem)
    ref = exact(problem)
    assert res.bound is not None
    assert ref.loss is not None
    assert res.bound <= ref.loss
    assert res.gap is not None
    assert res.gap >= 0.0


def test_plan_all_shares_one_time_limit_and_solves_equal_candidate_sets_once() -> None:
    problem = random_problem(40, seed=1, specialist=False)
    # the joint budget is the tightest application's: the same candidates, solved once
    tight = min(problem.applications, key=lambda a: problem.applications[a])
    clock = TickClock(0.001)
    plans = plan_all(problem, "exact", time_limit_s=0.5, clock=clock)
    joint, per_app = plans["joint"], plans["per_application"]
    assert joint.mask == per_app[tight].mask
    assert joint.nodes == per_app[tight].nodes
    assert set(per_app) == set(problem.applications)
    for app, res in per_app.items():
        assert res.max_latency_s == problem.applications[app]
        check_result(problem, res)
        assert res.gap is not None
        assert res.bound is not None
        assert res.loss is not None
        assert 0.0 <= res.gap == pytest.approx(res.loss - res.bound)
    # a looser budget starts from the tighter plans, so it never plans worse
    assert joint.loss is not None
    for res in per_app.values():
        assert res.loss is not None
        assert res.loss <= joint.loss + TOL
    with pytest.raises(PlannerError, match="time_limit_s"):
        exact(problem, time_limit_s=-1.0)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_n=12), st.integers(0, 2**32 - 1))
def test_table_enumeration_equals_the_matrix_evaluation(problem: Problem, seed: int) -> None:
    """LossTable.best_extension (tables of subset sums) finds what the generic enumeration
    (LossModel.best_extension over evaluate_bits) finds, for any include set and capacity."""
    table = problem.loss
    assert isinstance(table, LossTable)
    rng = np.random.default_rng(seed)
    n = problem.n_experts
    inside = rng.random(n) < 0.3
    include = mask_of(np.flatnonzero(inside).tolist())
    free = np.flatnonzero(~inside).tolist()
    capacity = float(rng.uniform(0.0, 1.2)) * float(problem.energy_j[free].sum() if free else 1)
    fast = table.best_extension(include, free, problem.energy_j, capacity)
    slow = LossModel.best_extension(table, include, free, problem.energy_j, capacity)
    assert fast.complete and slow.complete
    assert fast.evaluated == slow.evaluated
    if slow.mask == 0:
        assert fast.mask == 0
        return
    assert abs(fast.loss - slow.loss) <= TOL
    assert fast.loss == pytest.approx(table.loss(fast.mask), abs=1e-12)
    assert fast.mask & include == include
    assert float(problem.energy_j[members(fast.mask & ~include)].sum()) <= capacity + 1e-9


def test_a_proven_optimum_has_no_gap_whatever_its_bound_says() -> None:
    """The search's own bound may sit a float's breadth under the loss it proved optimal
    (hypothesis found 5.6e-17): the reported bound is then the loss and the gap exactly 0."""
    from moe2.coordinator.planner.problem import _Run

    problem = random_problem(8, seed=1, specialist=False)
    best = exhaustive(problem, None)
    assert best.loss is not None
    run = _Run(problem, "exact", None)
    res = run.result(best.mask, optimal=True, bound=best.loss - 5.551115123125783e-17)
    assert (res.bound, res.gap) == (res.loss, 0.0)
    stopped = run.result(best.mask, optimal=False, bound=best.loss - 0.25)
    assert stopped.gap == pytest.approx(0.25)
