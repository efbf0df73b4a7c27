"""The methods: SMO (Algorithm 2 as DESIGN reads it), exact branch and bound, exhaustive,
greedy and random, and the entry points that run them per application."""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from moe2.coordinator.planner.base import (
    _EXACT_ENUMERATE_NOW,
    _EXACT_TOL,
    DEFAULT_EPSILON,
    DEFAULT_MAX_EXPANSIONS,
    EXACT_ENUMERATE_BELOW,
    EXHAUSTIVE_MAX_EXPERTS,
    METHODS,
    FloatArray,
    Method,
    PlannerError,
    mask_of,
    members,
)
from moe2.coordinator.planner.loss import LossModel
from moe2.coordinator.planner.problem import Clock, PlanResult, PlanSet, Problem, _Run

# --------------------------------------------------------------------------------------------
# methods


def smo(
    problem: Problem,
    max_latency_s: float | None = None,
    *,
    epsilon: float = DEFAULT_EPSILON,
    max_expansions: int = DEFAULT_MAX_EXPANSIONS,
    time_limit_s: float | None = None,
    clock: Clock = time.perf_counter,
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

    After ``max_expansions`` pops the incumbent is returned with ``capped=True``; past
    ``time_limit_s`` seconds likewise with ``timed_out=True``. If L is not monotone (a real
    :class:`LossTable`: a member with a large gate and a poor distribution can make a set worse)
    the search result is finished by a 1-opt descent (best single removal or addition while the
    loss falls); it is feasible but only a heuristic and claims no optimality; its ``bound`` is
    then the loss model's bound over every candidate subset (:meth:`LossModel.node_bound` at
    the root, when the model has one): valid, but loose; :func:`exact` proves more.
    """
    if epsilon < 0.0:
        raise PlannerError("epsilon must be >= 0")
    if max_expansions < 0:
        raise PlannerError("max_expansions must be >= 0")
    run = _Run(problem, "smo", max_latency_s, time_limit_s=time_limit_s, clock=clock)
    monotone = run.model.monotone
    root = run.candidates
    if root == 0:
        return run.result(0, optimal=True)
    root_loss = run.loss(root)
    if run.feasible(root):
        if monotone:
            return run.result(root, loss=root_loss, optimal=True, bound=root_loss)
        mask, loss = _polish(run, root, root_loss)
        return run.result(mask, loss=loss, optimal=False, bound=_root_bound(run))

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
        if run.expired():
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
    if monotone:
        bound: float | None = min(frontier, inc_loss)
    else:
        inc_mask, inc_loss = _polish(run, inc_mask, inc_loss)
        bound = _root_bound(run)
    return run.result(
        inc_mask,
        loss=inc_loss,
        nodes=expansions,
        optimal=monotone and not capped and not run.timed_out,
        capped=capped,
        bound=bound,
    )


def _root_bound(run: _Run) -> float | None:
    """The loss model's lower bound over every feasible set, None when it has none."""
    try:
        bound, _branch = run.model.node_bound(0, run.candidates, run.energy, run.cap_j)
    except PlannerError:
        return None
    return bound


def _polish(run: _Run, mask: int, loss: float) -> tuple[int, float]:
    """1-opt descent for a non-monotone loss: apply the best single removal or feasible addition
    while it lowers the loss (at most 2 · candidates rounds, each one vectorised batch; the
    time limit stops it between rounds)."""
    cand = members(run.candidates)
    energy = run.energy
    for _ in range(2 * len(cand)):
        if run.expired():
            break
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
    time_limit_s: float | None = None,
    start: int = 0,
    clock: Clock = time.perf_counter,
) -> PlanResult:
    """Optimal for any loss model that provides a valid :meth:`LossModel.node_bound`.

    Depth-first branch and bound over include/exclude decisions. A node fixes a set I of
    included experts and an allowed set A ⊇ I; it stands for every T with I ⊆ T ⊆ A. Children:
    include the expert the bound suggests (best gain per joule; explored first) or exclude it.
    Every include child's I is evaluated as a candidate, so every feasible set is either
    evaluated or ruled out. Pruning: experts that no longer fit the energy left are dropped from
    A, and a node whose lower bound reaches the incumbent is cut. A node with at most
    ``enumerate_below`` undecided experts is finished by :meth:`LossModel.best_extension`
    (enumeration of its subsets; for a :class:`LossTable` from tables of subset sums, well
    under a microsecond a subset per 256 samples) instead: a bound costs as much as a few
    thousand enumerated subsets. The incumbent starts from :func:`greedy` and ``start`` (a
    feasible set known to be good, e.g. the plan of a smaller budget), the better of the two.

    With ``max_nodes`` or ``time_limit_s`` (seconds on ``clock``) the search may stop early
    (``capped`` / ``timed_out``): the result is the best set found, ``bound`` the least lower
    bound over the nodes still open (each carries the bound of the node it came from) and
    ``gap`` the loss minus it.

    Cost: the bounds are per-sample relaxations (each calibration sample may pick its own best
    experts), so they bite only deep in the tree, and on unstructured data (gate values and
    target probabilities uniformly random) hardly at all; in the worst case the work is that
    of :func:`exhaustive` over the candidate experts, i.e. 2^k evaluations for k candidates.
    The candidate filter (latency budget, per-expert energy) is what keeps k small in practice.
    """
    if enumerate_below < 0:
        raise PlannerError("enumerate_below must be >= 0")
    run = _Run(problem, "exact", max_latency_s, time_limit_s=time_limit_s, clock=clock)
    cand = run.candidates
    if cand == 0:
        return run.result(0, optimal=True)
    inc_mask, inc_loss = _greedy_search(run)
    if start and not start & ~cand and run.feasible(start):
        start_loss = run.loss(start)
        if start_loss < inc_loss:
            inc_mask, inc_loss = start, start_loss
    energy = run.energy
    static_order: list[int] | None = None
    # (include, allowed, energy of include, lower bound inherited from the parent)
    stack: list[tuple[int, int, float, float]] = [(0, cand, 0.0, -math.inf)]
    unfinished: list[float] = []  # bounds of nodes left half-done by the time limit
    nodes = 0
    capped = False
    while stack:
        if max_nodes is not None and nodes >= max_nodes:
            capped = True
            break
        if run.expired():
            break
        inc, allowed, e_inc, node_lb = stack.pop()
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
            node_lb = max(node_lb, bound)
        if len(und) <= enumerate_below:
            ext = run.model.best_extension(inc, und, energy, left, expired=run.expired)
            run.uncached_evaluations += ext.evaluated
            if ext.mask and ext.loss < inc_loss:
                inc_mask, inc_loss = ext.mask, ext.loss
            if not ext.complete:
                unfinished.append(node_lb)
                break
            continue
        if branch not in und:
            if static_order is None:
                singles = run.losses([1 << n for n in members(cand)])
                static_order = [members(cand)[k] for k in np.argsort(singles, kind="stable")]
            branch = next(n for n in static_order if n in und)
        stack.append((inc, allowed & ~(1 << branch), e_inc, node_lb))
        child = inc | (1 << branch)
        c_loss = run.loss(child)
        if c_loss < inc_loss:
            inc_mask, inc_loss = child, c_loss
        stack.append((child, allowed, e_inc + float(energy[branch]), node_lb))
    open_bounds = [*unfinished, *(entry[3] for entry in stack)]
    finished = not open_bounds and not capped
    bound = inc_loss
    if open_bounds:
        least = min(open_bounds)
        if least == -math.inf:  # the root itself is still open
            root = _root_bound(run)
            least = -math.inf if root is None else root
        bound = min(bound, least)
    return run.result(
        inc_mask,
        loss=None,  # recomputed by the loss model: enumeration sums in another order
        nodes=nodes,
        optimal=finished,
        capped=capped,
        bound=bound if math.isfinite(bound) else None,
    )


def exhaustive(
    problem: Problem,
    max_latency_s: float | None = None,
    *,
    max_experts: int = EXHAUSTIVE_MAX_EXPERTS,
) -> PlanResult:
    """Every non-empty subset of the candidate experts (:meth:`LossModel.best_extension`).

    Raises :class:`PlannerError` when more than ``max_experts`` experts meet the budgets on their
    own. Losses are computed (uncached) only for feasible subsets.
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
    ext = run.model.best_extension(0, idx, run.energy, run.cap_j)
    run.uncached_evaluations += ext.evaluated
    return run.result(ext.mask, nodes=(1 << k) - 1, optimal=True)


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
    time_limit_s: float | None = None,
    start: int = 0,
    clock: Clock = time.perf_counter,
) -> PlanResult:
    """Run one method under one latency budget (None: the joint budget, all applications).
    ``time_limit_s`` binds ``smo`` and ``exact`` (the others take milliseconds); ``start`` is
    a known good set for ``exact``'s incumbent."""
    if method == "smo":
        return smo(
            problem,
            max_latency_s,
            epsilon=epsilon,
            max_expansions=max_expansions,
            time_limit_s=time_limit_s,
            clock=clock,
        )
    if method == "exact":
        return exact(
            problem,
            max_latency_s,
            max_nodes=max_nodes,
            time_limit_s=time_limit_s,
            start=start,
            clock=clock,
        )
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
    time_limit_s: float | None = None,
    clock: Clock = time.perf_counter,
) -> PlanSet:
    """The joint plan (every application's budget at once, problem 16) and one plan per
    application under its own latency budget and the shared energy budget.

    Budgets that admit the same candidate experts are one problem, solved once. The others are
    solved from the tightest budget up, and each plan is a starting incumbent for the looser
    ones (their candidates include its experts). ``time_limit_s`` is for the whole set: each
    solve gets an equal share of the time still left, so a small problem that finishes early
    leaves its time to the larger ones."""
    budgets: dict[str | None, float] = {None: problem.joint_latency_s}
    budgets.update(problem.applications)
    by_candidates: dict[int, list[str | None]] = {}
    for key, budget in sorted(budgets.items(), key=lambda kv: kv[1]):
        by_candidates.setdefault(problem.candidates(budget), []).append(key)
    t0 = clock()
    solved: dict[str | None, PlanResult] = {}
    done: list[tuple[int, PlanResult]] = []
    for left, (cand, keys) in enumerate(by_candidates.items()):
        share = None
        if time_limit_s is not None:
            share = max(0.0, (t0 + time_limit_s - clock()) / (len(by_candidates) - left))
        start = min(
            ((r.loss, r.mask) for c, r in done if r.loss is not None and not c & ~cand),
            default=(math.inf, 0),
        )[1]
        first = solve(
            problem,
            method,
            budgets[keys[0]],
            seed=seed,
            epsilon=epsilon,
            max_expansions=max_expansions,
            max_nodes=max_nodes,
            time_limit_s=share,
            start=start,
            clock=clock,
        )
        done.append((cand, first))
        for key in keys:
            solved[key] = dataclasses.replace(first, max_latency_s=budgets[key])
    return PlanSet(
        joint=solved[None],
        per_application={app: solved[app] for app in problem.applications},
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
    time_limit_s: float | None = None,
) -> dict[str, PlanResult]:
    """Per-application plans from live telemetry, for the coordinator.

    ``latency_s`` and ``energy_j`` are per generated token, in the order of ``names``; ``loss``
    must cover the same experts in the same order (:meth:`LossTable.select` re-orders a table);
    None plans with :meth:`LossTable.prior`. Pass the same ``loss`` object on every replan to
    reuse its cache. ``time_limit_s`` bounds the whole call (see :func:`plan_all`).
    """
    problem = Problem.create(names, latency_s, energy_j, app_budgets_s, max_energy_j, loss)
    plans = plan_all(
        problem,
        method,
        seed,
        epsilon,
        max_expansions=max_expansions,
        time_limit_s=time_limit_s,
    )
    return plans["per_application"]
