"""Schema-valid but hostile values from the network, each found by an adversarial review:
telemetry with inf/NaN or a huge latency, more agents than the planner takes, distributions that
cannot be fused, topics mosquitto forwards but refuses to publish to. None may crash the
coordinator, stall a request, or reach a phone as an undecodable final."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest

from moe2.coordinator import planner as pl
from moe2.coordinator.generation import (
    ExpertState,
    GenerationSettings,
    _deadline,
    invalid_distribution,
)
from moe2.coordinator.liveplan import LivePlanner
from moe2.coordinator.registry import Registry, StatusEvent, TelemetryEvent, apply
from moe2.shared import wire
from moe2.shared.topics import publishable_topic

N_VOCAB = 512


def _status(agent_id: str) -> wire.AgentStatus:
    return wire.AgentStatus(agent_id=agent_id, state="online", vocab_fp="fp", n_ctx=512,
                            n_vocab=N_VOCAB)


def _telemetry(agent_id: str, ts: float, *, latency_s: float = 0.01, jpt: float = 0.1,
               bins: list[wire.LatencyBin] | None = None) -> wire.Telemetry:
    return wire.Telemetry(agent_id=agent_id, ts=ts, power_w=5.0, energy_j=1.0, tokens_total=10,
                          tokens_per_s=10.0, joules_per_token=jpt, step_latency_s=latency_s,
                          open_sessions=0, meter="estimated", latency_by_ctx=bins or [])


def _fleet(lp: LivePlanner | None, names: list[str],
           telemetry: dict[str, list[wire.Telemetry]] | None = None) -> Registry:
    reg = Registry()
    for n in names:
        before, reg = reg, apply(reg, StatusEvent(_status(n), 0.0))
        if lp is not None:
            lp.on_registry(before, reg)
    for ts in (telemetry or {}).values():
        for t in ts:
            before, reg = reg, apply(reg, TelemetryEvent(t, t.ts))
            if lp is not None:
                lp.on_registry(before, reg)
    return reg


@pytest.mark.parametrize("field", ["step_latency", "energy", "bin"])
@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0])
def test_non_finite_telemetry_is_not_planned_on(field: str, bad: float) -> None:
    lp = LivePlanner({"chat": 0.05}, max_energy_j=1.0)
    ts = [_telemetry("b", float(i), latency_s=bad if field == "step_latency" else 0.01,
                     jpt=bad if field == "energy" else 0.1,
                     bins=[wire.LatencyBin(ctx_upto=1000, latency_s=bad, n=5)]
                     if field == "bin" else None) for i in range(1, 4)]
    lp._registry = _fleet(lp, ["a", "b"], {"b": ts})
    plan = lp.replan()  # raised PlannerError (and ended the coordinator) before
    assert plan is not None and sorted(plan.apps["chat"].experts or []) == ["a", "b"]
    assert all(math.isfinite(x) for x in lp.profiles["b"].estimate())


def test_more_agents_than_the_planner_takes_are_planned_over_the_fastest() -> None:
    names = [f"e{i:02d}" for i in range(pl.MAX_EXPERTS + 6)]
    lp = LivePlanner({}, max_energy_j=None)
    slow = {n: [_telemetry(n, 1.0, latency_s=0.5)] for n in names[:6]}
    lp._registry = _fleet(lp, names, slow)
    plan = lp.replan()
    assert plan is not None
    chosen = plan.joint.experts or []
    assert len(chosen) == pl.MAX_EXPERTS
    assert not set(chosen) & set(names[:6])  # the six slow ones are left out


class _FailingOnce(LivePlanner):
    def __init__(self) -> None:
        super().__init__({}, max_energy_j=None, interval_s=0.01)
        self.failures = 0

    def solve(self, prep: Any) -> wire.PlanMsg:
        if self.failures == 0:
            self.failures += 1
            raise pl.PlannerError("boom")
        return super().solve(prep)


def test_a_failing_replan_keeps_the_planner_running() -> None:
    lp = _FailingOnce()
    published: list[wire.PlanMsg] = []

    registry = _fleet(None, ["a"])

    async def publish(plan: wire.PlanMsg) -> None:
        published.append(plan)

    async def main() -> None:
        task = asyncio.create_task(lp.run(lambda: registry, publish))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if published:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert lp.failures == 1
    assert published and published[0].joint.experts == ["a"]


@pytest.mark.parametrize("reported_s", [1e9, math.inf, math.nan, -3.0])
def test_step_deadline_is_bounded_whatever_latency_an_agent_reports(reported_s: float) -> None:
    reg = _fleet(None, ["a"], {"a": [_telemetry("a", 1.0, latency_s=reported_s)]})
    s = GenerationSettings(step_deadline_min_s=2.0, step_deadline_factor=20.0,
                           step_deadline_max_s=30.0)
    deadline = _deadline(reg, [ExpertState("a", 1.0, "s")], s)
    assert 2.0 <= deadline <= 30.0


def _dist(probs: list[float], ids: list[int] | None = None, *, rest: float = 0.0,
          energy_j: float = 0.1, latency_s: float = 0.01) -> wire.Distribution:
    return wire.Distribution(
        session_id="s", seq=1, probs=np.asarray(probs, "<f4").tobytes(),
        ids=b"" if ids is None else np.asarray(ids, "<i4").tobytes(), rest_mass=rest,
        n_past=3, n_evaluated=1, energy_j=energy_j, latency_s=latency_s)


def test_a_sound_distribution_is_accepted() -> None:
    assert invalid_distribution(_dist([0.5, 0.3], [7, 2], rest=0.2), N_VOCAB) is None
    full = np.full(N_VOCAB, 1.0 / N_VOCAB)
    assert invalid_distribution(_dist(list(full)), N_VOCAB) is None


@pytest.mark.parametrize(("dist", "why"), [
    (_dist([0.5, math.nan], [1, 2]), "not a distribution"),
    (_dist([0.5, math.inf], [1, 2]), "not a distribution"),
    (_dist([0.5, -0.1], [1, 2]), "not a distribution"),
    (_dist([0.9, 0.9], [1, 2]), "not a distribution"),
    (_dist([], []), "no probabilities"),
    (_dist([0.5, 0.5], [1, N_VOCAB]), "outside the vocabulary"),
    (_dist([0.5, 0.5], [1, -1]), "outside the vocabulary"),
    (_dist([0.5, 0.5], [3, 3]), "repeated"),
    (_dist([1.0 / 8] * 8), "full distribution of 8"),
    (_dist([0.5], [1], rest=math.nan), "rest mass"),
    (_dist([0.5], [1], rest=1.5), "rest mass"),
    (_dist([0.5], [1], rest=0.5, energy_j=math.nan), "energy or latency"),
    (_dist([0.5], [1], rest=0.5, energy_j=math.inf), "energy or latency"),
    (_dist([0.5], [1], rest=0.5, latency_s=-1.0), "energy or latency"),
    (_dist([0.0, 0.0], [1, 2]), "sum to 0"),  # fusion divided by zero on it
    (_dist([0.0] * N_VOCAB), "sum to 0"),
    (_dist([0.2, 0.1], [1, 2], rest=0.3), "sum to 0.6"),
])
def test_distributions_that_cannot_be_fused_are_named(dist: wire.Distribution, why: str) -> None:
    problem = invalid_distribution(dist, N_VOCAB)
    assert problem is not None and why in problem


@pytest.mark.parametrize(("levels", "ok"), [(200, True), (201, False)])
def test_topics_deeper_than_mosquitto_publishes_are_not_publishable(levels: int,
                                                                     ok: bool) -> None:
    """mosquitto 2.0 forwards such a Response Topic but disconnects whoever publishes to it."""
    assert publishable_topic("x" + "/x" * levels) is ok


def test_vocabularies_must_name_their_own_agent_and_be_bounded() -> None:
    from moe2.coordinator.gating import UniformGate
    from moe2.coordinator.service import MAX_VOCAB_PIECES, Coordinator
    from moe2.shared.config import CoordinatorConfig
    from moe2.shared.topics import Topics
    from tests.unit.test_hostile_messages import _message, _no_client

    tp = Topics()

    async def main() -> Coordinator:
        coord = Coordinator(CoordinatorConfig(id="c0"), UniformGate(), _no_client)
        for topic_agent, vocab in [
            ("a0", wire.Vocab(agent_id="a1", vocab_fp="fp-other", pieces=[b"x"])),
            ("a0", wire.Vocab(agent_id="a0", vocab_fp="fp-empty", pieces=[])),
            ("a0", wire.Vocab(agent_id="a0", vocab_fp="fp-huge",
                              pieces=[b""] * (MAX_VOCAB_PIECES + 1))),
            ("a0", wire.Vocab(agent_id="a0", vocab_fp="fp-ok", pieces=[b"a", b"b"])),
        ]:
            coord._on_message(_message(tp.agent_vocab(topic_agent).topic, wire.encode(vocab),
                                       None, None, None, True))
        return coord

    coord = asyncio.run(main())
    assert set(coord.registry.vocabs) == {"fp-ok"}
