"""A planning problem (experts, budgets, loss) and what a method returns for it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from moe2.coordinator.planner.base import (
    _ENERGY_RTOL,
    MAX_EXPERTS,
    FloatArray,
    PlannerError,
    mask_of,
    members,
)
from moe2.coordinator.planner.loss import LossModel, LossTable

logger = logging.getLogger(__name__)

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
    model is monotone. ``bound``: a proven lower bound on the optimal loss when known, and
    ``gap`` = ``loss`` − ``bound`` ≥ 0 (nats per token; 0 when ``optimal``): how far from the
    optimum the result can be at most. ``capped``: a node/expansion cap stopped the search and
    the result is the best found so far; ``timed_out``: the time limit did.
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
    gap: float | None = None
    timed_out: bool = False

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
            "gap": self.gap,
            "timed_out": self.timed_out,
            "elapsed_s": self.elapsed_s,
        }


class PlanSet(TypedDict):
    """The joint plan (problem 16) and one plan per application under its own latency budget."""

    joint: PlanResult
    per_application: dict[str, PlanResult]


Clock = Callable[[], float]


class _Run:
    """Book-keeping shared by the solvers: budget, evaluation tracking, the time limit (from
    the injected ``clock``, seconds), the result."""

    def __init__(
        self,
        problem: Problem,
        method: str,
        max_latency_s: float | None,
        *,
        time_limit_s: float | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        if time_limit_s is not None and not time_limit_s >= 0.0:
            raise PlannerError("time_limit_s must be >= 0")
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
        self._clock = clock
        self._t0 = clock()
        self._deadline = math.inf if time_limit_s is None else self._t0 + time_limit_s
        self.timed_out = False

    def expired(self) -> bool:
        """True once the time limit has passed (and from then on)."""
        if not self.timed_out and self._clock() >= self._deadline:
            self.timed_out = True
        return self.timed_out

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
        elapsed = self._clock() - self._t0
        if optimal and ok:
            # proven optimal: the optimum is this loss, whatever float noise the search's own
            # bound carries (a bound 5.6e-17 under it made a gap that is not 0)
            bound = loss
        gap = None
        if ok and bound is not None and loss is not None:
            bound = min(bound, loss)
            gap = loss - bound
        if capped or self.timed_out:
            logger.info(
                "%s stopped at its %s after %d nodes (budget %.4g s): gap %s",
                self.method,
                "cap" if capped else "time limit",
                nodes,
                self.budget_s,
                "unknown" if gap is None else f"{gap:.4g} nats",
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
            gap=gap,
            timed_out=self.timed_out,
        )


