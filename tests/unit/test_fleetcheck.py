"""Issue 11: what a new operator hits in the first hour -- each must fail loudly and at once.

Against real processes: a secured mosquitto written by ``moe2 broker-config``, ``moe2 ask``,
agents and coordinators started as an operator would start them.
"""

from __future__ import annotations

from moe2.coordinator.fleetcheck import gate_coverage

#: a hung command is a failed test; the commands here must answer at once
COMMAND_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- gate vs fleet


def test_gate_coverage_names_the_mismatch() -> None:
    assert gate_coverage([], ["a"]) == []  # a uniform gate knows no names: weighs everyone
    assert gate_coverage(["a", "b"], []) == []  # nobody online yet
    assert gate_coverage(["a", "b"], ["a", "b"]) == []
    [none] = gate_coverage(["x", "y"], ["a", "b"])
    assert "none of the online agents" in none and "no_experts" in none
    assert "x, y" in none and "a, b" in none
    [part] = gate_coverage(["a", "x"], ["a", "b"])
    assert "b" in part and "never used" in part
    [fallback] = gate_coverage(["x"], ["a"], unknown_expert_weight=0.5)
    assert "fallback weight" in fallback


def test_a_broker_stall_is_recognised_from_the_fused_step_overhead() -> None:
    from moe2.coordinator.fleetcheck import STALL_MIN_STEPS, broker_stall

    [warning] = broker_stall(0.041, 200, 0.0035)
    assert "set_tcp_nodelay true" in warning and "41 ms" in warning and "3.5 ms" in warning
    assert broker_stall(0.002, 200, 0.0035) == []  # a normal step
    assert broker_stall(0.9, 200) == []  # something else (a far broker, a hung agent)
    assert broker_stall(0.041, STALL_MIN_STEPS - 1) == []  # too few steps to say


def test_the_planner_carries_the_stall_warning_from_fused_steps_only() -> None:
    from moe2.coordinator.liveplan import LivePlanner
    from moe2.coordinator.registry import Registry, StatusEvent, apply
    from moe2.shared import wire

    lp = LivePlanner({"chat": 1.0})
    reg = Registry()
    for a in ("a", "b"):
        before, reg = reg, apply(reg, StatusEvent(wire.AgentStatus(
            agent_id=a, state="online", vocab_fp="fp", n_ctx=512, n_vocab=512), 0.0))
        lp.on_registry(before, reg)
    for _ in range(100):
        lp.record_step_overhead(0.042, 1)  # one expert a step: no second reply to hold
    plan = lp.replan()
    assert plan is not None and plan.warnings == []
    for _ in range(100):
        lp.record_step_overhead(0.042, 2)
    plan = lp.replan()
    assert plan is not None
    [warning] = plan.warnings
    assert "set_tcp_nodelay true" in warning
    for _ in range(256):
        lp.record_step_overhead(0.002, 2)  # the broker was fixed
    plan = lp.replan()
    assert plan is not None and plan.warnings == []
