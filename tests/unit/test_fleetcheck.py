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
