"""``moe2 monitor``: the pure snapshot logic, and ``--once --json`` against a real agent."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console

from moe2.shared import wire
from moe2.shared.topics import Topics
from moe2.tools.ops import monitor as mon

T = Topics()


def status(aid: str, state: str = "online", **kw: Any) -> wire.AgentStatus:
    return wire.AgentStatus(agent_id=aid, state=state, model="tiny-0", quant="F32",  # type: ignore[arg-type]
                            device="cpu", meter="estimated", max_sessions=4, **kw)


def telemetry(aid: str, energy_j: float = 1.5, **kw: Any) -> wire.Telemetry:
    fields: dict[str, Any] = {
        "agent_id": aid, "ts": 100.0, "power_w": 10.0, "energy_j": energy_j,
        "tokens_total": 7, "tokens_per_s": 3.5, "joules_per_token": 0.2,
        "step_latency_s": 0.004, "open_sessions": 1, "meter": "estimated"}
    fields.update(kw)
    return wire.Telemetry(**fields)


def app_plan(experts: list[str] | None) -> wire.AppPlan:
    return wire.AppPlan(experts=experts, feasible=experts is not None, loss=1.0, latency_s=0.01,
                        energy_j=0.5)


def plan(apps: dict[str, list[str] | None], joint: list[str] | None) -> wire.PlanMsg:
    return wire.PlanMsg(coordinator_id="c0", ts=1000.0, method="smo", max_energy_j=2.0,
                        apps={k: app_plan(v) for k, v in apps.items()}, joint=app_plan(joint))


# --------------------------------------------------------------------------- pure


def test_event_for_decodes_each_topic_and_ignores_the_rest() -> None:
    st = status("e0")
    ev = mon.event_for(T, T.agent_status("e0").topic, wire.encode(st), 5.0)
    assert ev == mon.StatusSeen(st)
    assert mon.event_for(T, T.agent_status("e0").topic, b"", 5.0) == mon.StatusCleared("e0")
    tel = telemetry("e0")
    assert mon.event_for(T, T.agent_telemetry("e0").topic, wire.encode(tel), 5.0) == \
        mon.TelemetrySeen(tel, 5.0)
    # a payload naming another agent than its topic is not trusted
    assert mon.event_for(T, T.agent_telemetry("e1").topic, wire.encode(tel), 5.0) is None
    assert mon.event_for(T, T.agent_status("e1").topic, wire.encode(st), 5.0) is None
    assert mon.event_for(T, T.agent_status("e0").topic, b"\xc1garbage", 5.0) is None
    assert mon.event_for(T, T.agent_telemetry("e0").topic, wire.encode(st), 5.0) is None
    p = plan({"chat": ["e0"]}, ["e0"])
    assert mon.event_for(T, T.plan.topic, wire.encode(p), 5.0) == mon.PlanSeen(p)
    assert mon.event_for(T, T.plan.topic, b"", 5.0) == mon.PlanSeen(None)
    cs = wire.CoordinatorStatus(coordinator_id="c0", state="online")
    assert mon.event_for(T, T.coordinator_status("c0").topic, wire.encode(cs), 5.0) == \
        mon.CoordinatorSeen(cs)
    assert mon.event_for(T, T.coordinator_status("c1").topic, wire.encode(cs), 5.0) is None
    assert mon.event_for(T, T.agent_vocab("e0").topic, b"x", 5.0) is None
    assert set(mon.subscriptions(T)) == {T.all_agent_status, T.all_agent_telemetry,
                                         T.plan.topic, T.all_coordinator_status}


def test_apply_builds_rows_and_keeps_offline_agents() -> None:
    s0 = mon.MonitorState()
    s1 = mon.apply(s0, mon.StatusSeen(status("e0")))
    assert s0.agents == {}, "apply returns a new state"
    assert s1.agents["e0"].online
    s2 = mon.apply(s1, mon.TelemetrySeen(telemetry("e0"), 10.0))
    s3 = mon.apply(s2, mon.TelemetrySeen(telemetry("e0", energy_j=3.0), 11.0))
    row = s3.agents["e0"]
    assert (row.telemetry_count, row.telemetry_at_s) == (2, 11.0)
    assert row.telemetry is not None
    assert row.telemetry.energy_j == 3.0
    s4 = mon.apply(s3, mon.StatusSeen(status("e0", "offline")))
    assert not s4.agents["e0"].online
    assert s4.agents["e0"].telemetry is not None, "the last telemetry stays visible"
    assert mon.apply(s4, mon.StatusCleared("e0")).agents == {}
    # telemetry before the retained status: the agent is evidently up
    s5 = mon.apply(s0, mon.TelemetrySeen(telemetry("e9"), 1.0))
    assert s5.agents["e9"].online
    assert s5.agents["e9"].status is None


def test_once_complete_waits_for_telemetry_from_every_online_agent() -> None:
    s = mon.MonitorState()
    assert not mon.once_complete(s)
    s = mon.apply(s, mon.StatusSeen(status("e0")))
    s = mon.apply(s, mon.StatusSeen(status("e1", "offline")))
    assert not mon.once_complete(s)
    s = mon.apply(s, mon.TelemetrySeen(telemetry("e0"), 1.0))
    assert mon.once_complete(s), "offline agents send no telemetry and are not waited for"
    s = mon.apply(s, mon.StatusSeen(status("e2")))
    assert not mon.once_complete(s)


def test_plan_membership_is_the_union_over_apps_and_joint() -> None:
    p = plan({"chat": ["e0", "e1"], "code": ["e1"], "none": None}, ["e2"])
    assert mon.plan_apps(p) == {"e0": ["chat"], "e1": ["chat", "code"], "e2": ["joint"]}
    assert mon.plan_apps(None) == {}


def test_snapshot_and_render() -> None:
    s = mon.MonitorState()
    for ev in (mon.StatusSeen(status("e0")), mon.StatusSeen(status("e1", "offline")),
               mon.TelemetrySeen(telemetry("e0", energy_j=42.5, spec_hits=3, spec_misses=1,
                                           spec_wasted_j=0.25), 100.0),
               mon.PlanSeen(plan({"chat": ["e0"]}, ["e0"])),
               mon.CoordinatorSeen(wire.CoordinatorStatus(coordinator_id="c0", state="online"))):
        s = mon.apply(s, ev)
    snap = mon.snapshot(s, 102.5)
    json.dumps(snap)  # plain JSON
    e0, e1 = snap["agents"]
    assert e0 == {
        "id": "e0", "online": True, "model": "tiny-0", "quant": "F32", "device": "cpu",
        "meter": "estimated", "power_w": 10.0, "energy_j": 42.5, "joules_per_token": 0.2,
        "tokens_per_s": 3.5, "tokens_total": 7, "step_latency_s": 0.004, "open_sessions": 1,
        "max_sessions": 4, "temperature_c": None, "n_ctx": 0, "vocab_fp": "", "n_vocab": 0,
        "version": "", "spec_hits": 3, "spec_misses": 1, "spec_wasted_j": 0.25,
        "spec_hit_rate": 0.75,
        "in_plan": True, "plan_apps": ["chat", "joint"], "telemetry_age_s": 2.5,
    }
    assert e1["online"] is False
    assert e1["energy_j"] is None
    assert e1["in_plan"] is False
    assert snap["plan"]["apps"]["chat"]["experts"] == ["e0"]
    assert snap["coordinators"] == [{"id": "c0", "state": "online", "gate": "uniform",
                                     "version": ""}]
    assert snap["complete"] is True
    console = Console(record=True, width=220, file=io.StringIO())
    console.print(mon.render(s, 102.5))
    text = console.export_text()
    for needle in ("e0", "e1", "online", "offline", "42.5", "10.0", "3.5", "4.00", "1/4", "75%",
                   "chat,joint", "plan by c0", "chat=[e0]", "coordinators: c0 online"):
        assert needle in text, needle
    console = Console(record=True, width=220, file=io.StringIO())
    console.print(mon.render(mon.MonitorState(), 0.0))
    assert "no" in console.export_text()
