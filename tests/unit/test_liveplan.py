"""Issue 4 live behaviour: plans follow telemetry, membership and application classes."""

from __future__ import annotations

from typing import Any

import pytest

from moe2.coordinator.liveplan import LivePlanner
from moe2.coordinator.registry import Registry, StatusEvent, TelemetryEvent, apply
from moe2.shared import wire


def telemetry(agent_id: str, latency_s: float, ts: float, jpt: float = 0.1) -> wire.Telemetry:
    return wire.Telemetry(agent_id=agent_id, ts=ts, power_w=5.0, energy_j=1.0, tokens_total=10,
                          tokens_per_s=10.0, joules_per_token=jpt, step_latency_s=latency_s,
                          open_sessions=0, meter="estimated")


def status(agent_id: str) -> wire.AgentStatus:
    return wire.AgentStatus(agent_id=agent_id, state="online", vocab_fp="fp", n_ctx=512,
                            n_vocab=512)


def test_planner_unit_latency_budget_and_recovery() -> None:
    lp = LivePlanner({"chat": 0.05, "batch": 5.0}, max_energy_j=None)
    reg = Registry()
    for a in ("a", "b"):
        before, reg = reg, apply(reg, StatusEvent(status(a), 0.0))
        lp.on_registry(before, reg)
    lp._registry = reg
    plan = lp.replan()
    assert plan is not None and sorted(plan.apps["chat"].experts or []) == ["a", "b"]
    ts = 1.0
    for _ in range(3):
        before, reg = reg, apply(reg, TelemetryEvent(telemetry("b", 0.2, ts), ts))
        lp.on_registry(before, reg)
        ts += 1
    lp._registry = reg
    plan = lp.replan()
    assert plan is not None
    assert plan.apps["chat"].experts == ["a"]
    assert sorted(plan.apps["batch"].experts or []) == ["a", "b"]
    for _ in range(5):
        before, reg = reg, apply(reg, TelemetryEvent(telemetry("b", 0.01, ts), ts))
        lp.on_registry(before, reg)
        ts += 1
    plan = lp.replan()
    assert plan is not None and sorted(plan.apps["chat"].experts or []) == ["a", "b"]


def _planner_with(latency_b_s: float, **kwargs: Any) -> tuple[LivePlanner, Registry]:
    lp = LivePlanner({"chat": 0.05}, max_energy_j=None, **kwargs)
    reg = Registry()
    for a in ("a", "b"):
        before, reg = reg, apply(reg, StatusEvent(status(a), 0.0))
        lp.on_registry(before, reg)
    for ts in (1.0, 2.0, 3.0):
        for a, lat in (("a", 0.01), ("b", latency_b_s)):
            before, reg = reg, apply(reg, TelemetryEvent(telemetry(a, lat, ts), ts))
            lp.on_registry(before, reg)
    lp._registry = reg
    return lp, reg


def test_step_overhead_counts_against_the_latency_budget() -> None:
    """Paper eq. 4-8: a set's delay is its slowest member's step plus the messaging; b's 0.03 s
    fits a 0.05 s budget alone, not with 0.03 s of overhead on top."""
    lp, _ = _planner_with(0.03)
    plan = lp.replan()
    assert plan is not None and sorted(plan.apps["chat"].experts or []) == ["a", "b"]
    assert plan.step_overhead_s == 0.0  # nothing served yet
    assert plan.apps["chat"].latency_s == pytest.approx(0.03)

    fixed, _ = _planner_with(0.03, step_overhead_s=0.03)
    plan = fixed.replan()
    assert plan is not None and plan.apps["chat"].experts == ["a"]
    assert plan.step_overhead_s == pytest.approx(0.03)
    assert plan.apps["chat"].latency_s == pytest.approx(0.04)

    measured, _ = _planner_with(0.03)
    for s in (0.02, 0.03, 0.5, 0.025, 0.03):  # one outlier: the median ignores it
        measured.record_step_overhead(s)
    measured.record_step_overhead(float("nan"))
    measured.record_step_overhead(-1.0)
    plan = measured.replan()
    assert plan is not None and plan.apps["chat"].experts == ["a"]
    assert plan.step_overhead_s == pytest.approx(0.03)


def test_step_overhead_is_the_time_beyond_the_slowest_decode() -> None:
    from moe2.coordinator.generation import step_overhead_s

    assert step_overhead_s(0.010, 0.007) == pytest.approx(0.003)
    assert step_overhead_s(0.005, 0.007) == 0.0  # clocks apart: never negative


def test_energy_budget_per_request_is_converted_to_per_token() -> None:
    from moe2.shared.config import CoordinatorConfig, PlannerSection

    cfg = CoordinatorConfig(planner=PlannerSection(max_request_energy_j=6.4, expected_tokens=64))
    assert LivePlanner.from_config(cfg).max_energy_j == pytest.approx(0.1)




def test_the_replan_time_limit_comes_from_the_config_and_plans_carry_the_gap() -> None:
    from moe2.shared.config import CoordinatorConfig, PlannerSection

    assert LivePlanner.from_config(CoordinatorConfig()).time_limit_s == 1.0  # the default
    cfg = CoordinatorConfig(planner=PlannerSection(method="exact", time_limit_s=0.25))
    assert LivePlanner.from_config(cfg).time_limit_s == 0.25
    lp, _ = _planner_with(0.01, method="exact")
    plan = lp.replan()
    assert plan is not None
    assert plan.apps["chat"].gap == 0.0  # two experts: exact proves its plan at once
