"""Live replanning: the SMO planner rerun from the fleet's telemetry.

Per-agent profiles are robust running estimates (median of the last reports) of the per-token
step latency -- taken at the expected context length where the agent measured it -- and of the
joules per generated token. A replan happens every ``interval_s``, and at once when an agent
joins or leaves or a profile moves by more than ``change_fraction``. The result is published
retained on the plan topic, and requests of each application class use that class's set.

Units: latency budgets are seconds per generated token (per application); the energy budget is
joules per generated token, or a per-request budget divided by ``expected_tokens``.

Latency of a set = its slowest member's step latency + the step overhead (paper eq. 4-8's
network term): what a fused step costs beyond that decode -- MQTT both ways and the message
handling in agents and coordinator -- measured from the steps this coordinator serves (median
of the last ones, 0 before the first), or fixed by ``planner.step_overhead_s``. Agents' own
telemetry covers only their decode window, so without it a tight budget would be overrun.

Loss: from a calibration file (``planner.calibration``, written by ``moe2 calibrate``) when it
covers every expert considered; otherwise the documented prior of
:meth:`moe2.coordinator.planner.LossTable.prior` (every expert alike: more experts, lower loss).
Agents without telemetry yet are planned with latency 0 and energy 0 (optimistic until measured)
so a new fleet serves at once; the first telemetry triggers a replan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from moe2.coordinator import planner as pl
from moe2.coordinator.calibration import CalibrationError, load_calibration
from moe2.coordinator.fleetcheck import broker_stall
from moe2.coordinator.gating import Gate, UniformGate
from moe2.coordinator.registry import AgentView, Registry
from moe2.shared import wire
from moe2.shared.config import CoordinatorConfig

log = logging.getLogger(__name__)

DEFAULT_APP = "default"


class Planner(Protocol):
    """What the coordinator needs of a planner (:class:`LivePlanner` is the real one)."""

    def allowed(self, app: str) -> Sequence[str] | None:
        """The expert set ``app`` may use; None before the first plan (everyone)."""
        ...

    def on_registry(self, before: Registry, after: Registry) -> None:
        """The fleet view changed (joins, leaves, telemetry)."""
        ...

    def record_step_overhead(self, overhead_s: float, experts: int = 1) -> None:
        """One served step's messaging overhead (seconds) and how many experts it fused."""
        ...

    async def run(self, registry: Callable[[], Registry],
                  publish: Callable[[wire.PlanMsg], Awaitable[None]]) -> None:
        """Plan until cancelled, publishing each new plan."""
        ...


class StepOverhead:
    """Running median of the per-step overhead samples (seconds); 0.0 before the first."""

    def __init__(self, window: int = 256) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def record(self, overhead_s: float) -> None:
        if math.isfinite(overhead_s) and overhead_s >= 0:
            self._samples.append(overhead_s)

    def estimate_s(self) -> float:
        return statistics.median(self._samples) if self._samples else 0.0

    def __len__(self) -> int:
        return len(self._samples)


@dataclass
class Profile:
    latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    energy_j: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    last_ts: float = -1.0

    def estimate(self) -> tuple[float, float]:
        lat = statistics.median(self.latency_s) if self.latency_s else 0.0
        en = statistics.median(self.energy_j) if self.energy_j else 0.0
        return lat, en


def latency_at(view: AgentView, context_tokens: int) -> float | None:
    """The agent's measured per-token latency at ``context_tokens`` of history (the smallest
    bin covering it; the largest measured bin beyond), else its overall step latency."""
    t = view.telemetry
    if t is None:
        return None
    # telemetry is network input: a bin with NaN/inf/negative latency is ignored, not planned on
    bins = sorted((b for b in t.latency_by_ctx if finite_positive(b.latency_s)),
                  key=lambda b: b.ctx_upto)
    for b in bins:
        if b.ctx_upto >= context_tokens and b.n > 0:
            return b.latency_s
    if bins:
        return bins[-1].latency_s
    return view.step_latency_s()  # None unless finite and positive, as the bins above


def finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@dataclass(frozen=True)
class Calibration:
    """The planner's calibration: one row per answer token, the prompt's gating values and
    every expert's teacher-forced probability (paper eq. 13-15)."""

    names: tuple[str, ...]
    gates: np.ndarray
    target_probs: np.ndarray

    @staticmethod
    def from_file(path: str, gate: Gate) -> Calibration:
        """What ``moe2 calibrate`` wrote, weighed by this coordinator's gate (its validation
        split, else every row). :class:`CalibrationError` when the file is not one or covers
        experts the gate does not know."""
        cal = load_calibration(path)
        if gate.kind != "uniform":
            unknown = sorted(set(cal.experts) - set(gate.experts))
            if unknown:
                raise CalibrationError(
                    f"calibration {path} covers experts the gate does not know: "
                    f"{', '.join(unknown)} (the gate knows {', '.join(gate.experts)}); "
                    "calibrate and train the gate on the same experts")
        records = cal.records()
        if not records:
            raise CalibrationError(f"calibration {path} has no rows")
        texts = [r.prompt for r in records]
        batch = getattr(gate, "values_batch", None)
        if gate.kind == "uniform":
            values: list[Mapping[str, float]] = [dict.fromkeys(cal.experts, 1.0)] * len(texts)
        elif batch is not None:
            values = list(batch(texts))
        else:
            values = [gate.values(t) for t in texts]
        gates, probs = cal.planner_rows(values)
        return Calibration(cal.experts, gates, probs)

    def loss_for(self, names: Sequence[str]) -> pl.LossTable | None:
        idx = {n: i for i, n in enumerate(self.names)}
        if any(n not in idx for n in names):
            return None
        cols = [idx[n] for n in names]
        return pl.LossTable(self.gates[:, cols], self.target_probs[:, cols])


@dataclass(frozen=True)
class _Prepared:
    names: list[str]
    est: dict[str, tuple[float, float]]
    loss: pl.LossModel
    overhead_s: float
    warnings: list[str] = field(default_factory=list)
    families: dict[str, list[str]] = field(default_factory=dict)


class LivePlanner:
    def __init__(
        self,
        apps: Mapping[str, float],
        *,
        method: pl.Method = "smo",
        max_energy_j: float | None = None,
        interval_s: float = 10.0,
        change_fraction: float = 0.2,
        calibration: Calibration | None = None,
        expected_context_tokens: int = 128,
        epsilon: float = pl.DEFAULT_EPSILON,
        coordinator_id: str = "coordinator",
        step_overhead_s: float | None = None,
        time_limit_s: float | None = 1.0,
        clock: Any = time.monotonic,
        wall: Any = time.time,
        warnings: Callable[[Registry], list[str]] | None = None,
    ) -> None:
        self.apps = dict(apps) or {DEFAULT_APP: math.inf}
        #: the operator warnings the plan message carries (see coordinator.fleetcheck)
        self.warnings = warnings or (lambda reg: [])
        self.method = method
        self.max_energy_j = max_energy_j
        self.interval_s = interval_s
        self.change_fraction = change_fraction
        self.calibration = calibration
        self.expected_context_tokens = expected_context_tokens
        self.epsilon = epsilon
        self.coordinator_id = coordinator_id
        self.fixed_step_overhead_s = step_overhead_s
        #: seconds one replan may search (every application together)
        self.time_limit_s = time_limit_s
        self.step_overhead = StepOverhead()
        #: the overhead of steps that fused two or more experts (where a broker stall shows)
        self.fused_overhead = StepOverhead()
        self._stall_warned = False
        self.clock = clock
        self.wall = wall
        self.profiles: dict[str, Profile] = {}
        self.plan: wire.PlanMsg | None = None
        self.replans = 0
        self._used: dict[str, tuple[float, float]] = {}
        self._trigger = asyncio.Event()
        self._registry: Registry = Registry()
        self._loss_cache: dict[tuple[str, ...], pl.LossModel] = {}
        self._over_cap_warned = 0

    @staticmethod
    def from_config(cfg: CoordinatorConfig,
                    warnings: Callable[[Registry], list[str]] | None = None,
                    gate: Gate | None = None) -> LivePlanner:
        p = cfg.planner
        energy = p.max_energy_j
        if p.max_request_energy_j is not None:
            per_token = p.max_request_energy_j / max(1, p.expected_tokens)
            energy = per_token if energy is None else min(energy, per_token)
        calib = (Calibration.from_file(p.calibration, gate or UniformGate())
                 if p.calibration else None)
        return LivePlanner(
            {name: a.max_latency_s for name, a in cfg.apps.items()}, method=p.method,
            max_energy_j=energy, interval_s=p.interval_s, change_fraction=p.change_fraction,
            calibration=calib, epsilon=p.epsilon, coordinator_id=cfg.id,
            step_overhead_s=p.step_overhead_s, time_limit_s=p.time_limit_s, warnings=warnings,
        )

    # ------------------------------------------------------------------ inputs
    def record_step_overhead(self, overhead_s: float, experts: int = 1) -> None:
        """One served step's overhead (the coordinator's request runner calls this)."""
        self.step_overhead.record(overhead_s)
        if experts >= 2:
            self.fused_overhead.record(overhead_s)

    def overhead_warnings(self, slowest_decode_s: float | None = None) -> list[str]:
        """What the measured step overhead says about the message path (a broker stall);
        logged when it first appears, carried by every plan while it lasts."""
        found = broker_stall(self.fused_overhead.estimate_s(), len(self.fused_overhead),
                             slowest_decode_s)
        if found and not self._stall_warned:
            log.warning("coordinator %s: %s", self.coordinator_id, found[0])
        self._stall_warned = bool(found)
        return found

    def step_overhead_s(self) -> float:
        if self.fixed_step_overhead_s is not None:
            return self.fixed_step_overhead_s
        return self.step_overhead.estimate_s()

    def on_registry(self, before: Registry, after: Registry) -> None:
        self._registry = after
        if set(before.agents) != set(after.agents):
            self._trigger.set()
            return
        for agent_id, view in after.agents.items():
            t = view.telemetry
            if t is None:
                continue
            prof = self.profiles.setdefault(agent_id, Profile())
            if t.ts == prof.last_ts:
                continue
            prof.last_ts = t.ts
            lat = latency_at(view, self.expected_context_tokens)
            if lat is not None and finite_positive(lat):
                prof.latency_s.append(lat)
            if finite_positive(t.joules_per_token):
                prof.energy_j.append(t.joules_per_token)
            if self._moved(agent_id, prof.estimate()):
                self._trigger.set()

    def _moved(self, agent_id: str, now: tuple[float, float]) -> bool:
        used = self._used.get(agent_id)
        if used is None:
            return True
        for a, b in zip(used, now, strict=True):
            if a == 0.0 and b == 0.0:
                continue
            if abs(b - a) > self.change_fraction * max(abs(a), 1e-12):
                return True
        return False

    # ------------------------------------------------------------------ decisions
    def allowed(self, app: str) -> Sequence[str] | None:
        """The set for ``app``; None before the first plan (everyone may serve)."""
        plan = self.plan
        if plan is None:
            return None
        ap = plan.apps.get(app, plan.joint)
        return ap.experts or []

    def compute(self, reg: Registry) -> wire.PlanMsg | None:
        prep = self.prepare(reg)
        if prep is None:
            return None
        plan = self.solve(prep)
        self.adopt(prep)
        return plan

    def prepare(self, reg: Registry) -> _Prepared | None:
        """The planning problem from the current state (event-loop thread: it reads and
        updates the profiles that telemetry updates)."""
        views = reg.online()
        # Drop the state of agents that left.
        for gone in set(self.profiles) - {v.agent_id for v in views}:
            self.profiles.pop(gone, None)
        if not views:
            return None
        names = [v.agent_id for v in views]
        est = {n: self.profiles.get(n, Profile()).estimate() for n in names}
        if len(names) > pl.MAX_EXPERTS:
            # The planner's subset lattice stops at MAX_EXPERTS: plan over the fastest ones
            # (a larger site needs more coordinators, each with its own agents' root).
            names = sorted(names, key=lambda n: (est[n][0], n))[:pl.MAX_EXPERTS]
            if self._over_cap_warned != len(views):
                self._over_cap_warned = len(views)
                log.warning("%d agents online; planning over the %d fastest (the planner's "
                            "limit)", len(views), pl.MAX_EXPERTS)
        key = tuple(names)
        loss = self._loss_cache.get(key)
        if loss is None:
            table = self.calibration.loss_for(names) if self.calibration else None
            loss = table if table is not None else pl.LossTable.prior(len(names))
            self._loss_cache = {key: loss}
        decode = [est[n][0] for n in names if est[n][0] > 0]
        warnings = [*self.warnings(reg), *self.overhead_warnings(max(decode, default=None))]
        return _Prepared(names, est, loss, self.step_overhead_s(), warnings, reg.families())

    def solve(self, prep: _Prepared) -> wire.PlanMsg:
        """Pure and CPU-bound (the coordinator runs it in a worker thread)."""
        names, est, overhead_s = prep.names, prep.est, prep.overhead_s
        problem = pl.Problem.create(
            names, [est[n][0] + overhead_s for n in names], [est[n][1] for n in names], self.apps,
            math.inf if self.max_energy_j is None else self.max_energy_j, prep.loss)
        plans = pl.plan_all(problem, self.method, seed=0, epsilon=self.epsilon,
                            time_limit_s=self.time_limit_s)
        stopped = [a for a, r in plans["per_application"].items() if r.timed_out]
        if stopped:
            log.info("planning stopped at its %.3g s time limit for %s; the gaps to the optimum "
                     "are at most %s nats per token", self.time_limit_s, ", ".join(stopped),
                     ", ".join("unknown" if (g := plans["per_application"][a].gap) is None
                               else f"{g:.3g}" for a in stopped))

        def ap(r: pl.PlanResult, budget: float | None) -> wire.AppPlan:
            return wire.AppPlan(
                experts=None if r.subset is None else list(r.subset), feasible=r.feasible,
                loss=r.loss, latency_s=r.latency_s, energy_j=r.energy_j,
                max_latency_s=budget if budget is not None and math.isfinite(budget) else None,
                gap=r.gap)

        return wire.PlanMsg(
            coordinator_id=self.coordinator_id, ts=self.wall(), method=self.method,
            max_energy_j=self.max_energy_j,
            apps={a: ap(r, self.apps[a]) for a, r in plans["per_application"].items()},
            joint=ap(plans["joint"], problem.joint_latency_s),
            loss_source="calibration" if isinstance(prep.loss, pl.LossTable) else "prior",
            step_overhead_s=overhead_s, warnings=prep.warnings, families=prep.families)

    def adopt(self, prep: _Prepared) -> None:
        self._used = prep.est
        self.replans += 1

    def replan(self) -> wire.PlanMsg | None:
        return self._take(self.compute(self._registry))

    async def replan_off_loop(self) -> wire.PlanMsg | None:
        """:meth:`replan` with the search in a worker thread: with 64 agents one plan takes
        a few hundred milliseconds that the event loop must not stall for."""
        prep = self.prepare(self._registry)
        if prep is None:
            return self._take(None)
        plan = await asyncio.to_thread(self.solve, prep)
        self.adopt(prep)
        return self._take(plan)

    def _take(self, plan: wire.PlanMsg | None) -> wire.PlanMsg | None:
        old, self.plan = self.plan, plan
        if plan is not None and (old is None or old.apps != plan.apps):
            log.info("plan: %s", ", ".join(
                f"{a}={p.experts if p.feasible else 'INFEASIBLE'}" for a, p in plan.apps.items()))
        return plan

    # ------------------------------------------------------------------ loop
    async def run(self, registry: Callable[[], Registry],
                  publish: Callable[[wire.PlanMsg], Awaitable[None]]) -> None:
        """Replan every ``interval_s`` and on each trigger, from the coordinator's registry
        view; ``publish`` is the plan sink (the retained plan topic)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._trigger.wait(), timeout=self.interval_s)
            self._trigger.clear()
            self._registry = registry()
            try:
                plan = await self.replan_off_loop()
            except Exception:  # a bad input must not end planning (or the process)
                log.exception("replanning failed; the previous plan stays in force")
                continue
            if plan is not None:
                await publish(plan)
